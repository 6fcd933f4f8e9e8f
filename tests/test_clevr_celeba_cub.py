"""CLEVR / CELEB-A / CUB-200 loaders on tiny fixtures in the real formats, the CLEVR-like generator, the
larger ControlNets and baselines, and the localisation losses (paper §4.1-4.2, Tables 3 and 6a)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import losses
from experiments import td_maps
from loaders import celeba, clevr, clevr_like, cub
from loaders.image_sets import MissingDatasetError, held_out_split, normalize_rgb, stack
from losses import per_task_cross_entropy
from models.backbones import build_backbone
from models.controlnet_backbones import BackboneControlNet
from models.modulation_backbones import ChannelModulatedBackbone, MultiBranchBackbone, TaskRoutedBackbone

torch.set_num_threads(1)


def write_image(path, width, height, seed=0, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


# ------------------------------------------------------------------------------------------------
# CLEVR: tasks
# ------------------------------------------------------------------------------------------------

def test_full_task_set_is_329_descriptions_times_5_relations():
    tasks = clevr.all_tasks()
    assert len(tasks) == 1645 == len(set(tasks))
    descriptions = {(t.refer, t.query) for t in tasks}
    assert len(descriptions) == 329
    by_size = [sum(len(refer) == k for refer, _ in descriptions) for k in (1, 2, 3)]
    assert by_size == [45, 144, 140]
    assert all(t.query not in dict(t.refer) for t in tasks)
    assert [t.relation for t in tasks[:5]] == list(clevr.RELATIONS)


def test_task_sets_are_the_authors_40_then_nested_seeded_extensions():
    forty = clevr.make_task_set(40)
    assert forty[0] == clevr.Task.make({"color": "purple"}, "left", "shape")
    assert forty[0].question() == "What is the shape of the object left of the purple object?"
    assert forty[-1].question() == "What is the color of the object in front of the large sphere?"
    eighty, big = clevr.make_task_set(80), clevr.make_task_set(160)
    assert eighty[:40] == forty and big[:80] == eighty and len(set(big)) == 160
    assert all(t.relation != "self" for t in big)
    assert clevr.make_task_set(80, seed=1)[40:] != eighty[40:]
    assert clevr.make_task_set(1645) == clevr.all_tasks()
    with pytest.raises(ValueError):
        clevr.make_task_set(1400)


def test_stored_task_files_match_the_generator_and_round_trip(tmp_path):
    for n in clevr.TASK_SET_SIZES:
        assert clevr.read_task_file(clevr.task_file(n)) == clevr.make_task_set(n), n
    tasks = clevr.make_task_set(40, seed=3)
    path = clevr.task_file(40, 3, tmp_path)
    clevr.write_task_file(path, tasks, seed=3)
    assert clevr.read_task_file(path) == tasks
    assert json.loads(path.read_text())["tasks"][0]["question"].startswith("What is the shape")


# ------------------------------------------------------------------------------------------------
# CLEVR: validity rules on hand-built scenes
# ------------------------------------------------------------------------------------------------

def obj(shape, size, color, material, x, y):
    return {"shape": shape, "size": size, "color": color, "material": material, "rotation": 0.0,
            "3d_coords": [x / 10, -y / 10, 0.7], "pixel_coords": [x, y, 10.0]}


def scene_a(relationships=None):
    """0: large red rubber cube (30, 20); 1: small blue metal sphere, left of it; 2: large purple rubber
    cylinder, right of it; 3: small red metal cube, behind it (up in the image). Nothing in front of 0."""
    objects = [obj("cube", "large", "red", "rubber", 30, 20), obj("sphere", "small", "blue", "metal", 10, 21),
               obj("cylinder", "large", "purple", "rubber", 50, 20), obj("cube", "small", "red", "metal", 31, 5)]
    empty = {rel: [[] for _ in objects] for rel in clevr.SPATIAL_RELATIONS}
    return {"objects": objects, "relationships": relationships or empty}


def labels_of(scene, *tasks, rule="pixel_cone"):
    return clevr.scene_targets(scene, clevr.TaskTable.of(list(tasks)), rule)


def test_pixel_cone_neighbours_are_the_nearest_in_a_cone():
    table = clevr.neighbours(scene_a())
    assert table[:, 0].tolist() == [0, 1, 2, 3, -1]       # self, left, right, behind, front of object 0
    assert table[1, 2] == 0                                 # left of the cylinder: the cube, not the sphere
    assert table[4, 3] == 0                                 # in front of the small cube: the large cube
    assert table[3, 1] == -1                                # object 3 is outside the cone above object 1


def test_labels_answer_and_referred_objects():
    T = clevr.Task.make
    tasks = [T({"color": "purple"}, "left", "shape"),                    # cube -> shape 1
             T({"color": "red"}, "left", "size"),                        # red is not unique -> -1
             T({"color": "red", "material": "metal"}, "front", "size"),  # the large cube -> large 0
             T({"shape": "sphere"}, "self", "color"),                    # the blue sphere itself -> 1
             T({"shape": "cube", "size": "large"}, "front", "color"),    # nothing in front -> -1
             T({"color": "green"}, "right", "shape")]                    # no green object -> -1
    labels, answer, referred = labels_of(scene_a(), *tasks)
    assert labels.tolist() == [1, -1, 0, 1, -1, -1]
    assert answer.tolist() == [0, -1, 0, 1, -1, -1]
    assert referred.tolist() == [2, -1, 3, 1, -1, -1]


def test_a_tie_for_the_nearest_object_is_invalid():
    objects = [obj("cube", "large", "red", "rubber", 30, 20), obj("sphere", "small", "blue", "metal", 20, 22),
               obj("cylinder", "small", "green", "metal", 20, 18)]
    scene = {"objects": objects, "relationships": {}}
    task = clevr.Task.make({"color": "red"}, "left", "shape")
    assert labels_of(scene, task)[0].tolist() == [-1]
    objects[2]["pixel_coords"] = [19, 18, 10.0]  # now the sphere is strictly nearer
    assert labels_of(scene, task)[0].tolist() == [clevr.CLASSES["shape"].index("sphere")]


def test_scene_rule_uses_clevr_relationship_lists():
    relationships = {rel: [[] for _ in range(4)] for rel in clevr.SPATIAL_RELATIONS}
    relationships["behind"][0] = [2, 3]   # j in relationships[rel][i]: j is `rel` of i
    relationships["left"][0] = [1]
    scene = scene_a(relationships)
    table = clevr.neighbours(scene, "scene")
    assert table[3, 0] == 3 and table[1, 0] == 1 and table[2, 0] == -1
    with pytest.raises(ValueError):
        clevr.neighbours(scene, "bogus")


# ------------------------------------------------------------------------------------------------
# CLEVR: files
# ------------------------------------------------------------------------------------------------

def write_clevr(root, scenes_per_split, width=60, height=40):
    for split, scenes in scenes_per_split.items():
        for i, scene in enumerate(scenes):
            scene.update(split=split, image_index=i, image_filename=f"CLEVR_{split}_{i:06d}.png")
            write_image(root / "images" / split / scene["image_filename"], width, height, seed=i)
        (root / "scenes").mkdir(parents=True, exist_ok=True)
        content = {"info": {"split": split, "version": "1.0"}, "scenes": scenes}
        (root / "scenes" / f"CLEVR_{split}_scenes.json").write_text(json.dumps(content))


def test_clevr_loader_reads_the_real_layout(tmp_path, monkeypatch):
    write_clevr(tmp_path, {"train": [scene_a() for _ in range(5)], "val": [scene_a(), scene_a()]})
    monkeypatch.setenv("MTL_CLEVR_ROOT", str(tmp_path))
    data = clevr.load_clevr("clevr_40", {"input_size": 30, "val_fraction": 0.2})
    assert {k: len(v) for k, v in data.items()} == {"train": 4, "val": 1, "test": 2}
    image, labels, locations = data["test"][0]
    assert image.shape == (3, 30, 30) and image.dtype == torch.uint8 and labels.shape == (40,)
    # task 0: shape of the object left of the purple object = the large cube at (30, 20) -> (15, 15) at 30x30
    assert labels[0] == 1 and locations[0].tolist() == [15.0, 15.0]
    assert (locations[labels < 0] == -1).all()
    referred = clevr.load_clevr("clevr_40", {"input_size": 30, "locate": "referred"}, root=tmp_path)
    assert referred["test"][0][2][0].tolist() == [25.0, 15.0]          # the purple cylinder at (50, 20)
    images, all_labels, _ = stack(data["train"])
    assert images.shape == (4, 3, 30, 30) and torch.equal(all_labels, data["train"].labels.long())


def test_missing_clevr_gives_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MTL_CLEVR_ROOT", raising=False)
    with pytest.raises(MissingDatasetError, match="MTL_CLEVR_ROOT"):
        clevr.load_clevr("clevr_40", {})
    with pytest.raises(MissingDatasetError, match=r"scenes/CLEVR_train_scenes\.json.*images/\{train,val\}"):
        clevr.load_clevr("clevr_40", {}, root=tmp_path)
    write_clevr(tmp_path, {"train": [scene_a()], "val": [scene_a()]})
    (tmp_path / "images" / "val" / "CLEVR_val_000000.png").unlink()
    with pytest.raises(MissingDatasetError, match="1 CLEVR val images are missing"):
        clevr.load_clevr("clevr_40", {}, root=tmp_path)


# ------------------------------------------------------------------------------------------------
# CLEVR-like generator
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("clevr_like")
    clevr_like.main(["--out", str(root), "--train", "4", "--val", "2", "--size", "48", "--seed", "5"])
    return root


def test_generator_writes_clevr_schema(generated):
    content = json.loads((generated / "scenes" / "CLEVR_train_scenes.json").read_text())
    assert set(content) == {"info", "scenes"} and len(content["scenes"]) == 4
    for index, scene in enumerate(content["scenes"]):
        assert set(scene) == {"split", "image_index", "image_filename", "objects", "relationships", "directions"}
        assert scene["image_index"] == index and scene["image_filename"] == f"CLEVR_train_{index:06d}.png"
        assert 3 <= len(scene["objects"]) <= 10
        assert set(scene["relationships"]) == {"left", "right", "front", "behind"}
        with Image.open(generated / "images" / "train" / scene["image_filename"]) as img:
            assert img.size == (48, 32) and img.mode == "RGB"
        coords = np.array([o["3d_coords"] for o in scene["objects"]])
        for i, o in enumerate(scene["objects"]):
            assert set(o) == {"shape", "size", "color", "material", "3d_coords", "pixel_coords", "rotation"}
            assert o["color"] in clevr.CLASSES["color"] and o["shape"] in clevr.CLASSES["shape"]
            assert o["material"] in clevr.CLASSES["material"] and o["size"] in clevr.CLASSES["size"]
            assert 0 <= o["pixel_coords"][0] < 48 and 0 <= o["pixel_coords"][1] < 32
            left = set(np.flatnonzero(coords[:, 0] < coords[i, 0] - 0.2).tolist())
            assert set(scene["relationships"]["left"][i]) == left


def test_generator_is_deterministic(generated, tmp_path):
    clevr_like.generate(tmp_path, {"train": 2}, size=48, seed=5)
    assert (tmp_path / "images/train/CLEVR_train_000001.png").read_bytes() == \
        (generated / "images/train/CLEVR_train_000001.png").read_bytes()
    first = json.loads((generated / "scenes/CLEVR_train_scenes.json").read_text())["scenes"][:2]
    assert json.loads((tmp_path / "scenes/CLEVR_train_scenes.json").read_text())["scenes"] == first
    other, _ = clevr_like.make_scene(6, "train", 0, 48, 32)
    assert other["objects"] != first[0]["objects"]


def test_metal_is_shinier_than_rubber():
    def brightest(material):
        ball = {"shape": "sphere", "size": "large", "color": "blue", "material": material,
                "3d_coords": [0.0, 0.0, 0.7], "rotation": 0.0}
        image, visible = clevr_like.render([ball], 96, 64)
        assert visible[0] == 1.0
        return image.max(axis=2).max()
    assert brightest("metal") >= 245 > brightest("rubber") + 20


def test_generated_scenes_run_through_the_clevr_loader_and_a_training_step(generated):
    data = clevr.load_clevr("clevr_1645", {"input_size": 64, "val_fraction": 0.25}, root=generated)
    assert {k: len(v) for k, v in data.items()} == {"train": 3, "val": 1, "test": 2}
    images, labels, locations = stack(data["train"])
    assert labels.shape == (3, 1645) and (labels >= 0).any()
    valid = labels >= 0
    assert ((locations[valid] >= 0) & (locations[valid] < 64)).all()
    # the 'self' tasks of a unique object are always valid
    self_valid = valid[:, [i for i, t in enumerate(clevr.task_set(1645)) if t.relation == "self"]]
    assert self_valid.any()
    torch.manual_seed(0)
    model = BackboneControlNet(1645, "vgg11_clevr", width=1 / 8, input_size=64)
    tasks = valid.float().argmax(dim=1)
    out = model.streams(normalize_rgb(images), tasks)
    rows = torch.arange(len(tasks))
    loss = F.cross_entropy(out.bu2_logits, labels[rows, tasks]) + \
        losses.spatial_classification_loss(out.td_map, locations[rows, tasks])
    loss.backward()
    assert torch.isfinite(loss)


# ------------------------------------------------------------------------------------------------
# CELEB-A
# ------------------------------------------------------------------------------------------------

def write_celeba(root, distributed=False):
    names = [f"{i:06d}.jpg" for i in range(1, 6)]
    rng = np.random.default_rng(0)
    values = rng.choice([-1, 1], size=(5, 40))
    attr = [str(len(names)), " ".join(f"Attr_{k}" for k in range(40))]
    attr += [name + "  " + " ".join(f"{v:2d}" for v in row) for name, row in zip(names, values)]
    prefix = ("Anno/", "Eval/", "Img/") if distributed else ("", "", "")
    (root / prefix[0]).mkdir(parents=True, exist_ok=True)
    (root / prefix[1]).mkdir(parents=True, exist_ok=True)
    (root / (prefix[0] + "list_attr_celeba.txt")).write_text("\n".join(attr) + "\n")
    codes = [0, 0, 1, 2, 0]
    (root / (prefix[1] + "list_eval_partition.txt")).write_text("".join(f"{n} {c}\n" for n, c in zip(names, codes)))
    for i, name in enumerate(names):
        write_image(root / (prefix[2] + "img_align_celeba") / name, 18, 22, seed=i, fmt="JPEG")
    return names, values


@pytest.mark.parametrize("distributed", [False, True])
def test_celeba_labels_and_splits(tmp_path, distributed):
    names, values = write_celeba(tmp_path, distributed)
    data = celeba.load_celeba("celeba", {"input_size": 16}, root=tmp_path)
    assert [len(data[s]) for s in celeba.SPLITS] == [3, 1, 1]
    assert [p.name for p in data["train"].paths] == [names[0], names[1], names[4]]
    assert torch.equal(data["train"].labels, torch.from_numpy((values[[0, 1, 4]] > 0).astype(np.int64)))
    image, labels, locations = data["test"][0]
    assert image.shape == (3, 16, 16) and labels.shape == (40,) and (locations == -1).all()
    assert set(labels.tolist()) <= {0, 1}


def test_celeba_rejects_malformed_and_missing_files(tmp_path, monkeypatch):
    write_celeba(tmp_path)
    path = tmp_path / "list_attr_celeba.txt"
    path.write_text(path.read_text().replace(" 1", " 2", 1))
    with pytest.raises(ValueError, match="line 3"):
        celeba.celeba(tmp_path)
    monkeypatch.delenv("MTL_CELEBA_ROOT", raising=False)
    with pytest.raises(MissingDatasetError, match="MTL_CELEBA_ROOT"):
        celeba.load_celeba("celeba", {})
    with pytest.raises(MissingDatasetError, match="list_attr_celeba.txt"):
        celeba.celeba(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------------
# CUB-200-2011
# ------------------------------------------------------------------------------------------------

PARTS = ["back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg", "left wing", "nape",
         "right eye", "right leg", "right wing", "tail", "throat"]
ATTRIBUTES = ["has_bill_shape::curved", "has_wing_color::blue", "has_wing_color::brown", "has_wing_color::black",
              "has_bill_shape::hooked", "has_crown_color::blue", "has_crown_color::red", "has_primary_color::blue",
              "has_eye_color::black", "has_eye_color::red"]


def write_cub(root, attributes_at="attributes/attributes.txt"):
    root.mkdir(parents=True, exist_ok=True)
    files = ["001.Albatross/a_1.jpg", "001.Albatross/a_2.jpg", "002.Auklet/b_1.jpg", "002.Auklet/b_2.jpg"]
    (root / "images.txt").write_text("".join(f"{i} {f}\n" for i, f in enumerate(files, 1)))
    (root / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n4 1\n")
    for i, f in enumerate(files):
        write_image(root / "images" / f, 40, 20, seed=i, fmt="JPEG")
    (root / attributes_at).parent.mkdir(parents=True, exist_ok=True)
    (root / attributes_at).write_text("".join(f"{k} {a}\n" for k, a in enumerate(ATTRIBUTES, 1)))
    present = {1: [2, 9], 2: [2, 4, 7], 3: [1, 6, 10], 4: []}       # image -> present attribute ids
    lines = []
    for image in range(1, 5):
        for attribute in range(1, len(ATTRIBUTES) + 1):
            lines.append(f"{image} {attribute} {int(attribute in present[image])} 3 12.5")
    lines[3] += " 0"   # a few real lines carry an extra field
    (root / "attributes").mkdir(exist_ok=True)
    (root / "attributes" / "image_attribute_labels.txt").write_text("\n".join(lines) + "\n")
    (root / "parts").mkdir(exist_ok=True)
    (root / "parts" / "parts.txt").write_text("".join(f"{k} {p}\n" for k, p in enumerate(PARTS, 1)))
    locs = []
    for image in range(1, 5):
        for k, part in enumerate(PARTS, 1):
            seen = part in ("right wing", "left wing", "crown") and not (image == 1 and part == "left wing")
            locs.append(f"{image} {k} {10.0 * k if seen else 0.0} {5.0 + image if seen else 0.0} {int(seen)}")
    (root / "parts" / "part_locs.txt").write_text("\n".join(locs) + "\n")


def test_cub_part_color_tasks_labels_and_locations(tmp_path):
    write_cub(tmp_path)
    assert cub.task_names(tmp_path) == [("has_wing_color", ["blue", "brown", "black"]),
                                        ("has_crown_color", ["blue", "red"]), ("has_eye_color", ["black", "red"])]
    data = cub.cub(tmp_path, size=20, val_fraction=0.0)
    assert [len(data[s]) for s in ("train", "val", "test")] == [3, 0, 1]
    train = data["train"]                                 # images 1, 3, 4
    # image 1: wing blue; no crown colour; eye black.  image 3: no wing colour; crown blue; eye red.
    # image 4: nothing present.  Image 2 (test): two wing colours -> invalid; crown red.
    assert train.labels.tolist() == [[0, -1, 0], [-1, 0, 1], [-1, -1, -1]]
    assert data["test"].labels.tolist() == [[-1, 1, -1]]
    _, _, locations = train[0]
    # wing: the left wing is hidden on image 1, so the right wing (part 13) at (130, 6) in a 40x20 image
    assert locations[0].tolist() == [130 * 20 / 40, 6 * 20 / 20]
    assert locations[1].tolist() == [50 * 20 / 40, 6.0]    # crown, part 5
    assert locations[2].tolist() == [-1.0, -1.0]           # eyes not visible
    assert train[1][2][0].tolist() == [90 * 20 / 40, 8.0]  # image 3: the left wing (part 9)


def test_cub_attribute_file_beside_the_root_and_held_out_validation(tmp_path):
    write_cub(tmp_path / "CUB_200_2011", attributes_at="../attributes.txt")
    data = cub.load_cub("cub", {"input_size": 20, "val_fraction": 0.34}, root=tmp_path / "CUB_200_2011")
    assert [len(data[s]) for s in ("train", "val", "test")] == [2, 1, 1]
    assert data["train"].num_tasks == 3


def test_missing_cub_names_the_files(tmp_path, monkeypatch):
    monkeypatch.delenv("MTL_CUB_ROOT", raising=False)
    with pytest.raises(MissingDatasetError, match="MTL_CUB_ROOT"):
        cub.load_cub("cub", {})
    with pytest.raises(MissingDatasetError, match="images.txt"):
        cub.cub(tmp_path)


def test_held_out_split_is_seeded_and_disjoint():
    train, val = held_out_split(10, 0.3, seed=1)
    assert len(val) == 3 and sorted(set(train) | set(val)) == list(range(10))
    assert np.array_equal(held_out_split(10, 0.3, seed=1)[1], val)


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------

TINY = [("vgg11_clevr", 64), ("vgg7", 32), ("resnet18", 64)]


def batch(size, classes, num_tasks=3):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, size, size, generator=g)
    tasks = torch.tensor([0, 1, 2, 0]) % num_tasks
    labels = torch.randint(0, classes, (4,), generator=g)
    xy = torch.tensor([[3.0, 5.0], [size - 1.0, 0.0], [-1.0, -1.0], [size / 2, size / 3]])
    return images, tasks, labels, xy


def assert_every_parameter_has_a_gradient(model):
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("backbone,size", TINY)
def test_controlnet_training_step(backbone, size):
    torch.manual_seed(0)
    model = BackboneControlNet(3, backbone, width=1 / 8, input_size=size)
    classes = model.bu.head.out.out_features
    images, tasks, labels, xy = batch(size, classes)
    out = model.streams(images, tasks)
    assert out.bu2_logits.shape == out.bu1_logits.shape == (4, classes)
    assert out.td_map.shape == (4, 1, size, size)
    loss = F.cross_entropy(out.bu2_logits, labels) + losses.spatial_classification_loss(out.td_map, xy)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss.backward()
    assert torch.isfinite(loss)
    assert_every_parameter_has_a_gradient(model)
    optimizer.step()


@pytest.mark.parametrize("backbone,size", TINY)
def test_controlnet_has_no_parameter_the_loss_cannot_train(backbone, size):
    """A parameter whose gradient is only float32 rounding noise (a bias before the TD map's pixel softmax got
    |grad| < 2e-7, exactly 0 on some builds) is never trained; every real one here gets more than 1e-3."""
    torch.manual_seed(0)
    model = BackboneControlNet(3, backbone, width=1 / 8, input_size=size)
    images, tasks, labels, xy = batch(size, model.bu.head.out.out_features)
    out = model.streams(images, tasks)
    (F.cross_entropy(out.bu2_logits, labels) + losses.spatial_classification_loss(out.td_map, xy)).backward()
    untrained = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().max() < 1e-5]
    assert untrained == []


@pytest.mark.parametrize("backbone,size", TINY)
def test_controlnet_bu1_and_bu2_share_weights(backbone, size):
    torch.manual_seed(0)
    model = BackboneControlNet(3, backbone, width=1 / 8, input_size=size).eval()
    for lateral in model.lateral_mul.values():
        torch.nn.init.zeros_(lateral.weight)
        torch.nn.init.ones_(lateral.bias)
    images, tasks, _, _ = batch(size, 2)
    out = model.streams(images, tasks)
    torch.testing.assert_close(out.bu2_logits, out.bu1_logits)
    bu_names = {n for n, _ in model.named_parameters() if n.startswith("bu.")}
    assert bu_names == {f"bu.{n}" for n, _ in build_backbone(backbone, width=1 / 8, input_size=size).named_parameters()}


@pytest.mark.parametrize("cls", [ChannelModulatedBackbone, TaskRoutedBackbone])
@pytest.mark.parametrize("backbone,size", TINY)
def test_modulated_baselines_training_step(cls, backbone, size):
    torch.manual_seed(0)
    model = cls(3, backbone, width=1 / 8, input_size=size, location_head=True)
    classes = model.bu.head.out.out_features
    images, tasks, labels, xy = batch(size, classes)
    assert model(images, tasks).shape == (4, classes)
    logits, where = model(images, tasks, with_location=True)
    loss = F.cross_entropy(logits, labels) + losses.location_regression_loss(where, xy, size)
    loss.backward()
    assert torch.isfinite(loss)
    assert_every_parameter_has_a_gradient(model)


@pytest.mark.parametrize("backbone,size", TINY)
def test_multi_branch_training_step(backbone, size):
    torch.manual_seed(0)
    model = MultiBranchBackbone(3, backbone, width=1 / 8, input_size=size, location_head=True)
    classes = model.branches[0].out.out_features
    images, _, labels, xy = batch(size, classes)
    targets = torch.stack([labels, labels.flip(0), torch.tensor([-1, 0, 1, -1])], dim=1)  # -1: invalid
    assert model(images).shape == (4, 3, classes)
    torch.testing.assert_close(model.heads(model.trunk(images)).shape, model(images).shape)
    assert model.last_shared_layer.weight.dim() == 4
    logits, where = model(images, with_location=True)
    loss = per_task_cross_entropy(logits, targets).sum() + \
        losses.location_regression_loss(where, xy[:, None].expand(-1, 3, -1), size).sum()
    loss.backward()
    assert torch.isfinite(loss)
    assert_every_parameter_has_a_gradient(model)


def test_clevr_controlnet_has_the_papers_parameter_ratio():
    """Table 3a: ControlNet on the CLEVR VGG-11 has x1.56 the parameters of the backbone; ch-mod x1.003."""
    backbone = sum(p.numel() for p in build_backbone("vgg11_clevr").parameters())
    controlnet = sum(p.numel() for p in BackboneControlNet(40, "vgg11_clevr").parameters())
    ch_mod = sum(p.numel() for p in ChannelModulatedBackbone(40, "vgg11_clevr").parameters())
    assert round(controlnet / backbone, 2) == 1.56
    assert round(ch_mod / backbone, 3) == 1.003


def test_input_size_must_match_the_stride():
    with pytest.raises(ValueError, match="multiple"):
        build_backbone("vgg11_clevr", input_size=50)


# ------------------------------------------------------------------------------------------------
# Localisation losses
# ------------------------------------------------------------------------------------------------

def test_blurred_target_is_a_unit_gaussian_at_the_point():
    target = losses.blurred_targets(torch.tensor([[20.7, 12.2]]), 30, 40)[0]
    assert target.shape == (30, 40)
    assert abs(float(target.sum()) - 1.0) < 1e-5
    assert divmod(int(target.argmax()), 40) == (12, 20)
    assert float(target[12, 23] / target[12, 20]) == pytest.approx(float(np.exp(-9 / 18)), rel=1e-4)


def test_spatial_loss_is_minimal_at_the_target_and_skips_missing_points():
    xy = torch.tensor([[20.0, 12.0], [-1.0, -1.0]])
    target = losses.blurred_targets(xy[:1], 30, 40)
    perfect = torch.log(target.clamp_min(1e-30))[:, None].repeat(2, 1, 1, 1)
    assert float(losses.spatial_classification_loss(perfect, xy)) == pytest.approx(0.0, abs=1e-4)
    logits = torch.zeros(2, 1, 30, 40, requires_grad=True)
    loss = losses.spatial_classification_loss(logits, xy)
    loss.backward()
    assert loss.item() > 1.0 and logits.grad[1].abs().sum() == 0
    none = losses.spatial_classification_loss(logits, torch.full((2, 2), -1.0))
    assert none.item() == 0.0
    assert td_maps.map_argmax(perfect)[0].tolist() == [20, 12]
