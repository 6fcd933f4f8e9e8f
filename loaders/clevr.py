"""CLEVR v1.0 'by reference' tasks (paper §4.1, Table 3a, Table 6a).

Data (``MTL_CLEVR_ROOT`` or an explicit root, the unpacked ``CLEVR_v1.0`` directory)::

    scenes/CLEVR_train_scenes.json   scenes/CLEVR_val_scenes.json
    images/train/CLEVR_train_000000.png ...   images/val/CLEVR_val_000000.png ...

Only the scene graphs are read (object attributes, ``pixel_coords``, ``relationships``); the questions
are not needed. ``loaders.clevr_like`` writes a stand-in in the same format.

**Tasks.** A task asks for one attribute (``query``: color, material, shape or size) of the object in a
``relation`` to a referred object described by one to three *other* attributes (``refer``), e.g. "What is
the shape of the object left of the large rubber object?". The full set, in the authors' enumeration order
(their loader's ``task_tensor``), has 329 (referring description, queried attribute) pairs: 45 with one
referring attribute, 144 with two, 140 with three, the queried attribute always different from the
referring ones. Each pair comes with 5 relations (``self``: the referred object itself, and ``left``,
``right``, ``behind``, ``front``): 329 x 5 = 1645 tasks, the largest set of Table 6a. (The paper names only
the four spatial relations, but 1645 factors only as 329 x 5, and the authors' ``get_answer_all`` computes
exactly these five answers per pair: the referred object's own attribute and its four neighbours'.)

- 40 tasks: the authors' 10 referring descriptions x the 4 spatial relations (their ``get_answer_loc``).
- 80, 160 (any n <= 1316): those 40 plus a seeded random choice of n - 40 other spatial tasks; the same seed
  gives nested sets (40 in 80 in 160).
- 1645: all tasks.

The sets are stored, one task per line, in ``loaders/clevr_tasks_<n>.json`` (rewrite them with
``python -m loaders.clevr --write-task-files``); ``task_set(n)`` reads such a file when present.

**Relations** (``relation_rule``):

- ``pixel_cone`` (default, the authors' loader): in image coordinates (x right, y down, CLEVR's
  ``pixel_coords``), object j is *left* of the referred object r when x_j < x_r and |y_j - y_r| < |x_j - x_r| / 2
  (a cone of half-angle atan(1/2) around the direction), *right* when x_j > x_r and the same, *behind* (up in
  the image) when y_j < y_r and |x_j - x_r| < |y_j - y_r| / 2, *front* (down) when y_j > y_r and the same.
  The answer is the candidate nearest to r in L1 pixel distance. (The authors name their slots right, left,
  up, down, and their "right" slot holds the image-left neighbour; only the names differ.)
- ``scene``: the candidates are CLEVR's own ``relationships[rel][r]`` (objects j with
  (coords_j - coords_r) . direction_rel > 0.2 in 3-D), the answer again the nearest in L1 pixel distance.

**Validity.** A task is valid for an image when exactly one object matches ``refer`` and the answer object
exists and is unique (no tie for the nearest; the authors' argmax would take the first). Otherwise the label
is -1. Labels index the queried attribute's classes in the authors' order (``CLASSES``); 8 classes at most.
Locations are the answer object's ``pixel_coords`` (the authors' localisation target; ``locate='referred'``
gives the referred object's), rescaled to the model input.

**Splits.** ``train``: CLEVR train minus a seeded held-out ``val_fraction``; ``val``: that held-out part;
``test``: CLEVR val (CLEVR's test split has no scene graphs; the paper reports on CLEVR val).
"""
import argparse
import itertools
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .image_sets import ImageTaskSet, check_images, find_file, held_out_split, resolve_root

ENV = "MTL_CLEVR_ROOT"
LAYOUT = ("scenes/CLEVR_{train,val}_scenes.json and images/{train,val}/*.png (the unpacked CLEVR_v1.0 "
          "directory from https://cs.stanford.edu/people/jcjohns/clevr/, or a stand-in written by "
          "`python -m loaders.clevr_like --out DIR`)")

# Attribute classes in the authors' order (their loader's `classes`).
CLASSES = {
    "color": ("cyan", "blue", "yellow", "purple", "red", "green", "gray", "brown"),
    "material": ("rubber", "metal"),
    "shape": ("sphere", "cube", "cylinder"),
    "size": ("large", "small"),
}
ATTRIBUTES = tuple(CLASSES)
NUM_CLASSES = max(len(values) for values in CLASSES.values())
RELATIONS = ("self", "left", "right", "behind", "front")
SPATIAL_RELATIONS = RELATIONS[1:]
RULES = ("pixel_cone", "scene")
TASK_SET_SIZES = (40, 80, 160, 1645)
TASK_DIR = Path(__file__).resolve().parent

# The authors' 40-task set: 10 (referring description, queried attribute) pairs x 4 spatial relations.
AUTHORS_40 = (
    ({"color": "purple"}, "shape"),
    ({"material": "rubber", "size": "large"}, "shape"),
    ({"material": "rubber", "shape": "cylinder"}, "size"),
    ({"material": "metal", "shape": "cube"}, "size"),
    ({"shape": "sphere", "size": "small"}, "material"),
    ({"color": "green"}, "material"),
    ({"shape": "sphere", "size": "large"}, "material"),
    ({"material": "metal", "shape": "cylinder"}, "color"),
    ({"material": "metal", "size": "small"}, "color"),
    ({"shape": "sphere", "size": "large"}, "color"),
)


class Task(NamedTuple):
    """``refer``: ((attribute, value), ...) in ``ATTRIBUTES`` order; ``relation`` in RELATIONS; ``query``."""
    refer: tuple
    relation: str
    query: str

    @classmethod
    def make(cls, refer, relation, query):
        if relation not in RELATIONS or query not in CLASSES or query in refer or not refer:
            raise ValueError(f"invalid CLEVR task: refer={refer}, relation={relation}, query={query}")
        for attribute, value in refer.items():
            if value not in CLASSES.get(attribute, ()):
                raise ValueError(f"invalid CLEVR task: unknown {attribute} {value!r}")
        return cls(tuple((a, refer[a]) for a in ATTRIBUTES if a in refer), relation, query)

    def question(self):
        words = dict(self.refer)
        adjectives = [words[a] for a in ("size", "color", "material") if a in words]
        noun = " ".join(adjectives + [words.get("shape", "object")])
        if self.relation == "self":
            return f"What is the {self.query} of the {noun}?"
        where = {"left": "left of", "right": "right of", "behind": "behind", "front": "in front of"}[self.relation]
        return f"What is the {self.query} of the object {where} the {noun}?"

    def to_json(self):
        return {"refer": dict(self.refer), "relation": self.relation, "query": self.query, "question": self.question()}


def all_tasks():
    """The 1645 tasks: referring descriptions with 1, 2, then 3 attributes (combinations in ATTRIBUTES order,
    values in class order), each with every other attribute as query, each with the 5 relations."""
    tasks = []
    for k in (1, 2, 3):
        for attributes in itertools.combinations(ATTRIBUTES, k):
            for values in itertools.product(*(CLASSES[a] for a in attributes)):
                for query in ATTRIBUTES:
                    if query not in attributes:
                        tasks += [Task.make(dict(zip(attributes, values)), rel, query) for rel in RELATIONS]
    return tasks


def authors_40():
    return [Task.make(refer, relation, query) for refer, query in AUTHORS_40 for relation in SPATIAL_RELATIONS]


def make_task_set(num_tasks, seed=0):
    """The task set of size ``num_tasks`` (see the module docstring)."""
    everything = all_tasks()
    if num_tasks == len(everything):
        return everything
    base = authors_40()
    taken = set(base)
    spatial = [t for t in everything if t.relation != "self" and t not in taken]
    if not 1 <= num_tasks <= len(base) + len(spatial):
        raise ValueError(f"CLEVR task sets have 1..{len(base) + len(spatial)} spatial tasks or all "
                         f"{len(everything)}; got {num_tasks}")
    order = np.random.default_rng(seed).permutation(len(spatial))
    return (base + [spatial[i] for i in order])[:num_tasks]


def task_file(num_tasks, seed=0, directory=TASK_DIR):
    suffix = "" if seed == 0 else f"_seed{seed}"
    return Path(directory) / f"clevr_tasks_{num_tasks}{suffix}.json"


def write_task_file(path, tasks, seed=0):
    """Human-readable JSON: a header, then one task per line."""
    header = {"num_tasks": len(tasks), "seed": seed, "classes": CLASSES,
              "about": "task = (refer, relation, query); relation rules and validity: loaders/clevr.py"}
    lines = ",\n".join("    " + json.dumps(t.to_json()) for t in tasks)
    fields = "".join(f"  {json.dumps(key)}: {json.dumps(value)},\n" for key, value in header.items())
    text = "{\n" + fields + '  "tasks": [\n' + lines + "\n  ]\n}\n"
    Path(path).write_text(text)


def read_task_file(path):
    with open(path) as fh:
        content = json.load(fh)
    return [Task.make(t["refer"], t["relation"], t["query"]) for t in content["tasks"]]


def task_set(num_tasks, seed=0):
    """The stored task list ``clevr_tasks_<n>.json`` when present, else generated (``make_task_set``)."""
    path = task_file(num_tasks, seed)
    return read_task_file(path) if path.exists() else make_task_set(num_tasks, seed)


# ------------------------------------------------------------------------------------------------
# Labels
# ------------------------------------------------------------------------------------------------

class TaskTable(NamedTuple):
    """A task set as arrays: ``accepts[a]`` [T, classes of a] says which values of attribute a the referring
    description admits (all when it does not use a); ``relation`` [T] and ``query`` [T] are indices."""
    accepts: tuple
    relation: np.ndarray
    query: np.ndarray

    @classmethod
    def of(cls, tasks):
        accepts = tuple(np.ones((len(tasks), len(CLASSES[a])), dtype=bool) for a in ATTRIBUTES)
        for i, task in enumerate(tasks):
            for attribute, value in task.refer:
                row = accepts[ATTRIBUTES.index(attribute)][i]
                row[:] = False
                row[CLASSES[attribute].index(value)] = True
        relation = np.array([RELATIONS.index(t.relation) for t in tasks], dtype=np.int64)
        query = np.array([ATTRIBUTES.index(t.query) for t in tasks], dtype=np.int64)
        return cls(accepts, relation, query)


def object_attributes(scene):
    """[n, 4] class index of each object's color, material, shape, size."""
    return np.array([[CLASSES[a].index(obj[a]) for a in ATTRIBUTES] for obj in scene["objects"]],
                    dtype=np.int64).reshape(-1, len(ATTRIBUTES))


def _nearest(candidates, distance):
    """Per row: the index of the unique nearest candidate, -1 when there is none or a tie."""
    d = np.where(candidates, distance, np.inf)
    best = d.min(axis=1, keepdims=True)
    hits = np.isfinite(best) & (d == best)
    return np.where(hits.sum(axis=1) == 1, hits.argmax(axis=1), -1)


def neighbours(scene, rule="pixel_cone"):
    """[5, n]: for each relation (RELATIONS order) and referred object r, the answer object index or -1."""
    xy = np.array([obj["pixel_coords"][:2] for obj in scene["objects"]], dtype=np.float64).reshape(-1, 2)
    n = len(xy)
    dx = xy[None, :, 0] - xy[:, None, 0]           # [r, j]: x_j - x_r
    dy = xy[None, :, 1] - xy[:, None, 1]
    distance = np.abs(dx) + np.abs(dy)
    if rule == "pixel_cone":
        along_x, along_y = np.abs(dy) < 0.5 * np.abs(dx), np.abs(dx) < 0.5 * np.abs(dy)
        candidates = {"left": (dx < 0) & along_x, "right": (dx > 0) & along_x,
                      "behind": (dy < 0) & along_y, "front": (dy > 0) & along_y}
    elif rule == "scene":
        candidates = {}
        for relation in SPATIAL_RELATIONS:
            mask = np.zeros((n, n), dtype=bool)
            for r, related in enumerate(scene["relationships"][relation]):
                mask[r, list(related)] = True
            candidates[relation] = mask & ~np.eye(n, dtype=bool)
    else:
        raise ValueError(f"unknown relation rule {rule!r}; valid: {', '.join(RULES)}")
    rows = [np.arange(n)] + [_nearest(candidates[rel], distance) for rel in SPATIAL_RELATIONS]
    return np.stack(rows).reshape(len(RELATIONS), n)


def scene_targets(scene, table, rule="pixel_cone"):
    """Returns ``(labels, answer, referred)``, each int64 [T]: the label (-1 = invalid) and the index of the answer
    and of the referred object (-1 where the task is invalid) of every task of ``table`` on one scene."""
    attributes = object_attributes(scene)
    if not len(attributes):
        invalid = np.full(len(table.query), -1, dtype=np.int64)
        return invalid, invalid.copy(), invalid.copy()
    match = table.accepts[0][:, attributes[:, 0]]
    for a in range(1, len(ATTRIBUTES)):
        match = match & table.accepts[a][:, attributes[:, a]]
    unique = match.sum(axis=1) == 1
    referred = np.where(unique, match.argmax(axis=1), -1)
    answer = np.where(unique, neighbours(scene, rule)[table.relation, np.maximum(referred, 0)], -1)
    labels = np.where(answer >= 0, attributes[np.maximum(answer, 0), table.query], -1)
    return labels, answer, np.where(answer >= 0, referred, -1)


# ------------------------------------------------------------------------------------------------
# Data set
# ------------------------------------------------------------------------------------------------

def read_scenes(root, split):
    """The scene list of CLEVR split ``train`` or ``val`` (ordered by ``image_index``)."""
    path = find_file(root, [f"scenes/CLEVR_{split}_scenes.json"], "CLEVR scenes", ENV, LAYOUT)
    with open(path) as fh:
        scenes = json.load(fh)["scenes"]
    return sorted(scenes, key=lambda s: s["image_index"])


class ClevrTaskSet(ImageTaskSet):
    """CLEVR tasks on images: labels int8 [N, T], the located object of each task int8 [N, T] (-1 = none) and
    the objects' pixel coordinates float32 [N, M, 2] (M = the most objects in a scene): 1645 tasks on CLEVR's
    70K training scenes take 0.2 GB rather than 2 GB of dense per-task locations."""

    def __init__(self, paths, labels, located, coords, size):
        super().__init__(paths, labels, size)
        self.located = torch.as_tensor(np.asarray(located, dtype=np.int8))
        self.coords = torch.as_tensor(np.asarray(coords, dtype=np.float32))

    def source_locations(self, index):
        which = self.located[index].long()
        xy = self.coords[index][which.clamp(min=0)]
        return torch.where(which[:, None] >= 0, xy, torch.full_like(xy, -1.0))

    def subset(self, index):
        return ClevrTaskSet([self.paths[i] for i in index], self.labels[index], self.located[index],
                            self.coords[index], self.size)


def clevr_tasks(root, split, tasks, size=224, rule="pixel_cone", locate="answer"):
    """A ``ClevrTaskSet`` over the CLEVR split ``train`` or ``val``, one column per task of ``tasks``."""
    if locate not in ("answer", "referred"):
        raise ValueError(f"locate must be 'answer' or 'referred', got {locate!r}")
    scenes = read_scenes(root, split)
    image_dir = find_file(root, [f"images/{split}"], "CLEVR images", ENV, LAYOUT)
    table = TaskTable.of(tasks)
    labels = np.full((len(scenes), len(tasks)), -1, dtype=np.int8)
    located = np.full((len(scenes), len(tasks)), -1, dtype=np.int8)
    coords = np.full((len(scenes), max([len(s["objects"]) for s in scenes] + [1]), 2), -1.0, dtype=np.float32)
    for i, scene in enumerate(scenes):
        labels[i], answer, referred = scene_targets(scene, table, rule)
        located[i] = answer if locate == "answer" else referred
        for j, obj in enumerate(scene["objects"]):
            coords[i, j] = obj["pixel_coords"][:2]
    paths = [image_dir / scene["image_filename"] for scene in scenes]
    check_images(paths, f"CLEVR {split}", ENV, LAYOUT)
    return ClevrTaskSet(paths, labels, located, coords, size)


def load_clevr(setting, params, root=None):
    """LOADERS entry: ``setting`` 'clevr_<n>' (n in TASK_SET_SIZES, or any valid size) -> {split: ClevrTaskSet}.

    params (all optional): ``input_size`` (224), ``relation_rule`` ('pixel_cone'), ``locate`` ('answer'),
    ``task_seed`` (0), ``val_fraction`` (0.1), ``data_seed`` (0, the held-out split), ``dataset_root``.
    """
    prefix, _, size = setting.partition("_")
    if prefix != "clevr" or not size.isdigit():
        raise ValueError(f"CLEVR settings are 'clevr_<number of tasks>', e.g. clevr_40; got {setting!r}")
    num_tasks = int(size)
    root = resolve_root(root or params.get("dataset_root"), ENV, "CLEVR", LAYOUT)
    tasks = task_set(num_tasks, params.get("task_seed", 0))
    options = dict(tasks=tasks, size=params.get("input_size", 224), rule=params.get("relation_rule", "pixel_cone"),
                   locate=params.get("locate", "answer"))
    train = clevr_tasks(root, "train", **options)
    keep, held = held_out_split(len(train), params.get("val_fraction", 0.1), params.get("data_seed", 0))
    return {"train": train.subset(keep), "val": train.subset(held), "test": clevr_tasks(root, "val", **options)}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the CLEVR task-list files loaders/clevr_tasks_<n>.json.")
    parser.add_argument("--write-task-files", action="store_true", help="(re)write the files for 40/80/160/1645")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.write_task_files:
        parser.print_help()
        return 0
    for n in TASK_SET_SIZES:
        write_task_file(task_file(n, args.seed), make_task_set(n, args.seed), args.seed)
        print(task_file(n, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
