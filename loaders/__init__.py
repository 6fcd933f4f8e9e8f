"""Loader registry (paper §4.1): ``LOADERS[name]`` describes one data set, ``LOADERS[name].load`` loads it.

``load(setting, params, root) -> {split: (images, labels, locations)}`` for the splits ``train``, ``val`` and
``test`` (no ``val`` under the authors' protocol, ``protocol: authors``, Multi-MNIST only), all in memory (the
training script moves them to the device and cuts batches by index):

- ``images``: uint8, [N, 28, 28] (Multi-MNIST) or [N, 3, S, S] (RGB, S = the param ``input_size``);
- ``labels``: integers [N, T] (int64; int8 for CLEVR, whose 1645 tasks on 70K images would take 0.9 GB in
  int64), -1 where a task does not apply to an image (ignored by the loss and the metrics);
- ``locations``: float32 [N, T, 2], the (x, y) input pixel of each task's object or part, -1 where there is
  none (the target of the localisation loss, paper §4.2), or None for a data set without them.

``root`` is the data directory (``--data_root``, else the param ``data_root``), or None for the default: for
Multi-MNIST and CLEVR-like where MNIST and the generated data are kept (``$MTL_DATA_ROOT``, else ./data), for
CLEVR, CELEB-A and CUB-200 the unpacked data set itself (else ``$MTL_CLEVR_ROOT``, ``$MTL_CELEBA_ROOT``,
``$MTL_CUB_ROOT``); a missing data set raises ``image_sets.MissingDatasetError`` naming what to put where.
Each entry also gives the task sets (``num_tasks``: setting -> T), the classes per task, the default backbone
and input size, and the per-channel mean and std with which the training script normalises on the device.
"""
import shutil
from typing import Callable, NamedTuple

from . import celeba, clevr, clevr_like, cub, multi_mnist
from .image_sets import IMAGENET_MEAN, IMAGENET_STD, to_tensors
from .mnist import data_root


class Loader(NamedTuple):
    load: Callable          # (setting, params, root) -> {split: (images, labels, locations)}
    num_tasks: dict         # setting -> number of tasks
    num_classes: int        # classes of the largest task (the size of the shared head)
    backbone: str           # the paper's BU backbone for this data set (§4.2)
    input_size: int         # default side S of the model input
    mean: tuple             # per-channel normalisation (ToTensor + Normalize), on the device
    std: tuple
    has_locations: bool     # whether the localisation loss has targets


def load_multi_mnist(setting, params, root=None):
    """Held-out protocol: train / val / test from MNIST train[:50k] / train[50k:] / test. The authors' protocol
    (``protocol: authors``): train from all 60k MNIST training images, test, no val split."""
    sources = {"train": "train", "val": "val", "test": "test"} if params.get("protocol", "held_out") == "held_out" \
        else {"train": "train_all", "test": "test"}
    return {split: multi_mnist.make_multi_mnist(setting, source, params["data_seed"], root, params["resize"],
                                                locations=True, layout=params.get("layout", "diagonal"))
            for split, source in sources.items()}


def in_memory(task_sets, with_locations=True):
    """{split: ImageTaskSet} -> {split: (images, labels, locations)}, decoded into memory."""
    data = {}
    for split, task_set in task_sets.items():
        images, labels, locations = to_tensors(task_set)
        data[split] = (images, labels, locations if with_locations else None)
    return data


def load_clevr(setting, params, root=None):
    """CLEVR v1.0 by-reference tasks (``loaders.clevr``): CLEVR train minus a held-out ``val_fraction`` (seeded by
    ``data_seed``) / that part / CLEVR val as test; locations: the answer object's centre."""
    return in_memory(clevr.load_clevr(setting, params, root))


def load_clevr_like(setting, params, root=None):
    """The CLEVR tasks on CLEVR-like scenes (``loaders.clevr_like``), generated on first use from ``data_seed`` at
    ``input_size`` pixels wide into <data root>/clevr_like/<seed, size, counts>/ in CLEVR's format, then read by the
    CLEVR loader: ``clevr_like_train`` scenes as CLEVR's train split, ``clevr_like_test`` as its val split."""
    size, counts = params["input_size"], {"train": params["clevr_like_train"], "val": params["clevr_like_test"]}
    directory = data_root(root) / "clevr_like" / \
        f"seed{params['data_seed']}_{size}px_{counts['train']}train_{counts['val']}test"
    if not (directory / "complete").exists():
        partial = directory.with_name(directory.name + ".partial")  # left by a killed generation: start afresh
        shutil.rmtree(partial, ignore_errors=True)
        clevr_like.generate(partial, counts, size, params["data_seed"])
        (partial / "complete").write_text("")
        shutil.rmtree(directory, ignore_errors=True)
        partial.rename(directory)
    return load_clevr(setting, params, directory)


def load_celeba(setting, params, root=None):
    """CELEB-A's 40 attributes on the official splits (``loaders.celeba``); no locations."""
    return in_memory(celeba.load_celeba(setting, params, root), with_locations=False)


def load_cub(setting, params, root=None):
    """CUB-200-2011 part colours (``loaders.cub``): official train minus a held-out ``val_fraction`` / that part /
    official test; locations: the task's part."""
    return in_memory(cub.load_cub(setting, params, root))


CLEVR_TASKS = {f"clevr_{n}": n for n in clevr.TASK_SET_SIZES}
RGB = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)  # the authors' CLEVR transform, also used for CELEB-A and CUB
LOADERS = {
    "multi_mnist": Loader(load_multi_mnist, multi_mnist.NUM_TASKS, 10, "lenet", 28, mean=(0.1307,), std=(0.3081,),
                          has_locations=True),
    "clevr": Loader(load_clevr, CLEVR_TASKS, clevr.NUM_CLASSES, "vgg11_clevr", 224, **RGB, has_locations=True),
    "clevr_like": Loader(load_clevr_like, CLEVR_TASKS, clevr.NUM_CLASSES, "vgg11_clevr", 64, **RGB,
                         has_locations=True),
    "celeba": Loader(load_celeba, {"celeba": celeba.NUM_TASKS}, celeba.NUM_CLASSES, "vgg7", 64, **RGB,
                     has_locations=False),
    "cub": Loader(load_cub, {"cub": len(cub.COLOR_PARTS)}, cub.NUM_CLASSES, "resnet18", 224, **RGB,
                  has_locations=True),
}
NUM_TASKS = {setting: n for loader in LOADERS.values() for setting, n in loader.num_tasks.items()}
SETTINGS = tuple(NUM_TASKS)
