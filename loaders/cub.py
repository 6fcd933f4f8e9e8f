"""CUB-200-2011 part-colour tasks with part locations (paper §4.1, Table 3c, Figure 4c).

Data (``MTL_CUB_ROOT`` or an explicit root, the unpacked ``CUB_200_2011`` directory)::

    images.txt  train_test_split.txt  images/<class>/<file>.jpg
    attributes/image_attribute_labels.txt  parts/parts.txt  parts/part_locs.txt
    attributes.txt (in the root, in attributes/, or beside the root, where the archive puts it)

**Tasks**: one task per colour attribute group ``has_<part>_color::<colour>`` of ``attributes.txt`` whose
region is one annotated part, in file order (13 on CUB): bill (beak), wing (left/right wing), upper tail and
under tail (tail), breast, back, nape, belly, eye (left/right eye), forehead, throat, crown, leg (left/right
leg). ``has_upperparts_color``, ``has_underparts_color`` and ``has_primary_color`` describe regions with no
single part and are left out. The class is the colour's index in its group (file order; 15 colours).

**Labels** come from ``image_attribute_labels.txt`` (image, attribute, is_present, certainty, time; extra
trailing fields, present on a few lines, are ignored). A task's label is the one colour marked present;
an image with no or several present colours for the group gets -1 (invalid, ignored by loss and metrics).
Certainty is not used.

**Locations** (``parts/part_locs.txt``: image, part, x, y, visible): the task's part, or for paired parts
the first visible of (left, right); -1 when not visible. They feed the localisation loss (paper §4.2).

**Splits**: ``test`` is the official test set (``train_test_split.txt`` = 0); ``train`` / ``val`` split the
official training set with a seeded held-out ``val_fraction``. Images are the full photographs (no
bounding-box crop), resized to ``size`` x ``size``.
"""
from pathlib import Path

import numpy as np

from .image_sets import TaskImageSet, check_images, find_file, held_out_split, resolve_root

ENV = "MTL_CUB_ROOT"
LAYOUT = ("the unpacked CUB_200_2011 directory (images.txt, train_test_split.txt, images/, "
          "attributes/image_attribute_labels.txt, attributes.txt, parts/parts.txt, parts/part_locs.txt) from "
          "https://www.vision.caltech.edu/datasets/cub_200_2011/")
COLOR_PARTS = {
    "has_bill_color": ("beak",),
    "has_wing_color": ("left wing", "right wing"),
    "has_upper_tail_color": ("tail",),
    "has_breast_color": ("breast",),
    "has_back_color": ("back",),
    "has_under_tail_color": ("tail",),
    "has_nape_color": ("nape",),
    "has_belly_color": ("belly",),
    "has_eye_color": ("left eye", "right eye"),
    "has_forehead_color": ("forehead",),
    "has_throat_color": ("throat",),
    "has_crown_color": ("crown",),
    "has_leg_color": ("left leg", "right leg"),
}
ATTRIBUTE_FILES = ("attributes.txt", "attributes/attributes.txt", "../attributes.txt")
NUM_CLASSES = 15  # colours per group on CUB
SPLITS = ("train", "val", "test")


def _rows(path):
    """Whitespace-split non-empty lines of a text file."""
    return [line.split() for line in Path(path).read_text().splitlines() if line.strip()]


def color_tasks(attributes_file):
    """Returns ``[(group, [(attribute id, colour), ...]), ...]`` for the colour groups of COLOR_PARTS, in file order."""
    groups = {}
    for fields in _rows(attributes_file):
        group, _, value = fields[1].partition("::")
        if group in COLOR_PARTS:
            groups.setdefault(group, []).append((int(fields[0]), value))
    if not groups:
        raise ValueError(f"{attributes_file}: no colour attribute group of {', '.join(COLOR_PARTS)}")
    return list(groups.items())


def read_present(path, attribute_ids):
    """{(image id, attribute id): True} for the present attributes among ``attribute_ids``."""
    wanted, present = set(attribute_ids), set()
    with open(path) as fh:
        for line in fh:
            fields = line.split()
            if len(fields) >= 3 and fields[2] == "1" and int(fields[1]) in wanted:
                present.add((int(fields[0]), int(fields[1])))
    return present


def part_locations(parts_file, locs_file, tasks, image_ids):
    """float32 [N, T, 2]: each task's part location (x, y) in source pixels, -1 where not visible."""
    part_id = {" ".join(fields[1:]): int(fields[0]) for fields in _rows(parts_file)}
    row = {image: i for i, image in enumerate(image_ids)}
    visible = {}
    for fields in _rows(locs_file):
        image, part, x, y, seen = int(fields[0]), int(fields[1]), float(fields[2]), float(fields[3]), fields[4]
        if image in row and float(seen) > 0:
            visible[image, part] = (x, y)
    locations = np.full((len(image_ids), len(tasks), 2), -1.0, dtype=np.float32)
    for t, (group, _) in enumerate(tasks):
        parts = [part_id[name] for name in COLOR_PARTS[group]]
        for image, i in row.items():
            seen = [visible[image, p] for p in parts if (image, p) in visible]
            if seen:
                locations[i, t] = seen[0]
    return locations


def color_labels(present, tasks, image_ids):
    """int64 [N, T]: the index of the single present colour of each task's group, -1 for none or several."""
    labels = np.full((len(image_ids), len(tasks)), -1, dtype=np.int64)
    for t, (_, values) in enumerate(tasks):
        for i, image in enumerate(image_ids):
            hits = [k for k, (attribute, _) in enumerate(values) if (image, attribute) in present]
            if len(hits) == 1:
                labels[i, t] = hits[0]
    return labels


def cub(root=None, size=224, val_fraction=0.1, seed=0):
    """{split: TaskImageSet} for 'train', 'val' and 'test' (see the module docstring)."""
    root = resolve_root(root, ENV, "CUB-200-2011", LAYOUT)
    images = {int(f[0]): f[1] for f in _rows(find_file(root, ["images.txt"], "CUB image list", ENV, LAYOUT))}
    is_train = {int(f[0]): f[1] == "1" for f in _rows(find_file(root, ["train_test_split.txt"], "CUB split",
                                                                    ENV, LAYOUT))}
    tasks = color_tasks(find_file(root, ATTRIBUTE_FILES, "CUB attribute names", ENV, LAYOUT))
    attribute_ids = [a for _, values in tasks for a, _ in values]
    present = read_present(find_file(root, ["attributes/image_attribute_labels.txt"], "CUB attribute labels",
                                     ENV, LAYOUT), attribute_ids)
    image_ids = sorted(images)
    labels = color_labels(present, tasks, image_ids)
    locations = part_locations(find_file(root, ["parts/parts.txt"], "CUB part names", ENV, LAYOUT),
                               find_file(root, ["parts/part_locs.txt"], "CUB part locations", ENV, LAYOUT),
                               tasks, image_ids)
    paths = [root / "images" / images[i] for i in image_ids]
    check_images(paths, "CUB-200-2011", ENV, LAYOUT)
    everything = TaskImageSet(paths, labels, locations, size)
    pool = np.array([i for i, image in enumerate(image_ids) if is_train[image]], dtype=np.int64)
    test = np.array([i for i, image in enumerate(image_ids) if not is_train[image]], dtype=np.int64)
    keep, held = held_out_split(len(pool), val_fraction, seed)
    return {"train": everything.subset(pool[keep]), "val": everything.subset(pool[held]),
            "test": everything.subset(test)}


def task_names(root=None):
    """The task (colour group) names and their colour classes, e.g. [('has_crown_color', ['blue', ...]), ...]."""
    root = resolve_root(root, ENV, "CUB-200-2011", LAYOUT)
    tasks = color_tasks(find_file(root, ATTRIBUTE_FILES, "CUB attribute names", ENV, LAYOUT))
    return [(group, [value for _, value in values]) for group, values in tasks]


def load_cub(setting, params, root=None):
    """LOADERS entry: ``setting`` 'cub' -> {split: TaskImageSet}; params (optional): ``input_size`` (224),
    ``val_fraction`` (0.1), ``data_seed`` (0), ``dataset_root``."""
    return cub(root or params.get("dataset_root"), params.get("input_size", 224), params.get("val_fraction", 0.1),
               params.get("data_seed", 0))
