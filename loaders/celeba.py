"""CELEB-A: 40 binary face-attribute tasks (paper §4.1, Table 3b).

Data (``MTL_CELEBA_ROOT`` or an explicit root), either flat (as the brief and torchvision lay it out)::

    list_attr_celeba.txt   list_eval_partition.txt   img_align_celeba/000001.jpg ...

or as distributed (``Anno/list_attr_celeba.txt``, ``Eval/list_eval_partition.txt``,
``Img/img_align_celeba/``).

- ``list_attr_celeba.txt``: the image count, then the 40 attribute names, then one line per image:
  file name and 40 values in {-1, 1}. Task k is attribute k in the file's order; label 1 for 1, 0 for -1.
- ``list_eval_partition.txt``: file name and 0 / 1 / 2 = train / val / test (the official split).
- Images (178 x 218 aligned crops) are resized to ``size`` x ``size`` (default 64, the input size at which a
  VGG-7 ControlNet has about the paper's x1.15 parameters; Sener & Koltun also use 64 x 64). CELEB-A has no
  localisation target here: every location is -1.
"""
from pathlib import Path

import numpy as np

from .image_sets import TaskImageSet, check_images, find_file, resolve_root

ENV = "MTL_CELEBA_ROOT"
LAYOUT = ("list_attr_celeba.txt, list_eval_partition.txt and img_align_celeba/*.jpg (or the distributed "
          "Anno/, Eval/, Img/img_align_celeba/ layout) from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html")
NUM_TASKS = 40
NUM_CLASSES = 2
SPLITS = ("train", "val", "test")


def read_attributes(path):
    """Returns ``(attribute names [40], {file name: int64 [40] labels in {0, 1}})``."""
    lines = [line.split() for line in Path(path).read_text().splitlines() if line.strip()]
    names = lines[1]
    if len(names) != NUM_TASKS:
        raise ValueError(f"{path}: expected {NUM_TASKS} attribute names on line 2, found {len(names)}")
    labels = {}
    for number, fields in enumerate(lines[2:], start=3):
        values = fields[1:]
        if len(values) != NUM_TASKS or any(v not in ("1", "-1") for v in values):
            raise ValueError(f"{path}, line {number}: expected a file name and {NUM_TASKS} values in -1/1")
        labels[fields[0]] = (np.array(values, dtype=np.int64) > 0).astype(np.int64)
    if int(lines[0][0]) != len(labels):
        raise ValueError(f"{path}: header says {lines[0][0]} images, the file lists {len(labels)}")
    return names, labels


def read_partition(path):
    """{file name: split name} from ``list_eval_partition.txt``."""
    partition = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            name, code = line.split()
            partition[name] = SPLITS[int(code)]
    return partition


def celeba(root=None, size=64):
    """{split: TaskImageSet} for the official CELEB-A splits 'train', 'val' and 'test'."""
    root = resolve_root(root, ENV, "CELEB-A", LAYOUT)
    _, labels = read_attributes(find_file(root, ["list_attr_celeba.txt", "Anno/list_attr_celeba.txt"],
                                          "CELEB-A attributes", ENV, LAYOUT))
    partition = read_partition(find_file(root, ["list_eval_partition.txt", "Eval/list_eval_partition.txt"],
                                         "CELEB-A partition", ENV, LAYOUT))
    image_dir = find_file(root, ["img_align_celeba", "Img/img_align_celeba"], "CELEB-A images", ENV, LAYOUT)
    unlabelled = [name for name in partition if name not in labels]
    if unlabelled:
        raise ValueError(f"{len(unlabelled)} images of the partition file have no attributes, e.g. {unlabelled[0]}")
    data = {}
    for split in SPLITS:
        names = sorted(name for name, where in partition.items() if where == split)
        paths = [image_dir / name for name in names]
        check_images(paths, f"CELEB-A {split}", ENV, LAYOUT)
        split_labels = np.array([labels[name] for name in names], dtype=np.int64).reshape(-1, NUM_TASKS)
        data[split] = TaskImageSet(paths, split_labels, np.full((len(names), NUM_TASKS, 2), -1.0), size)
    return data


def load_celeba(setting, params, root=None):
    """LOADERS entry: ``setting`` 'celeba' -> {split: TaskImageSet}; params: ``input_size`` (64), ``dataset_root``."""
    return celeba(root or params.get("dataset_root"), params.get("input_size", 64))
