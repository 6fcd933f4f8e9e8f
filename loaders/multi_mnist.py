"""Multi-MNIST generators (Sener & Koltun's isl-org/MultiObjectiveOptimization@bf5bbb3
``multi_task/loaders/multi_mnist_loader.py``; the authors' barakhi/TD_MultiTask@8c3d589
``data/multi_mnist_loader_extratask9.py``): digits placed on a canvas with overlaps, then resized to 28x28.

Every composite has one *base* MNIST image (each image of the pool used once, in order) and K-1 partners
drawn uniformly with replacement from the same pool; the canvas is the pixelwise max of all placements.

- ``2digits``: 36x36, offsets (0,0) and (6,6) (Sener & Koltun); tasks: left, right. With
  ``layout="side_by_side"``, the 2x1 grid of the paper's §4.1 ("2x1, 2x2, 3x3 grids") drawn like the 4- and
  9-digit grids: a 40x40 canvas (the 4-digit grid's, so a digit is scaled by 28/40 as there), the two digits at
  columns 0 and 12 (stride 12) of the middle rows 6..33; tasks: left, right.
- ``4digits``: 40x40, a 2x2 grid with stride 12; tasks in column-major order (TL, BL, TR, BR).
- ``9digits``: 52x52, a 3x3 grid with stride 12; task k = digit at (row k % 3, column k // 3).
- ``9digits_byref``: the 9-digit images; task d = "the digit right of digit d", valid only when d occurs
  exactly once and not in the last column (label -1 otherwise: ignored by the loss and the metrics).

Pools: ``train`` = MNIST train[:50000], ``val`` = MNIST train[50000:] (held out of training), ``test`` =
MNIST test; ``train_all`` = all 60000 MNIST training images, the authors' training pool (their generator,
TD_MultiTask ``data/multi_mnist_loader_extratask9.py``, composes every MNIST training image with partners
from all of them; the ``authors`` protocol of the training script). Generation is seeded, vectorised and
cached, keyed by every generation parameter.
"""
import numpy as np
import torch

from . import cache
from .mnist import data_root, load_mnist

KINDS = ("2digits", "4digits", "9digits", "9digits_byref")
SPLITS = ("train", "val", "test")  # the held-out protocol's splits
ALL_SPLITS = SPLITS + ("train_all",)  # new splits go last: the index seeds the generator
RESIZES = ("nearest", "bicubic_clipped", "bicubic_wrap")
LAYOUT_CHOICES = ("diagonal", "side_by_side")  # of the 2-digit images
NUM_TASKS = {"2digits": 2, "4digits": 4, "9digits": 9, "9digits_byref": 10}
GENERATOR_VERSION = 1

# (canvas size, [(row, col) offset of each task's digit]) per kind.
LAYOUTS = {
    "2digits": (36, [(0, 0), (6, 6)]),
    "4digits": (40, [(12 * (k % 2), 12 * (k // 2)) for k in range(4)]),
    "9digits": (52, [(12 * (k % 3), 12 * (k // 3)) for k in range(9)]),
    "2digits_side_by_side": (40, [(6, 0), (6, 12)]),
}
GENERATED = KINDS + ("2digits_side_by_side",)  # the index seeds the generator: new layouts go last


def make_multi_mnist(kind, split, seed=0, root=None, resize="nearest", locations=False, layout="diagonal"):
    """Returns ``(images uint8 [N,28,28], labels int64 [N,T])`` as torch tensors (cached on disk), and with
    ``locations`` also ``task_locations`` [N, T, 2]. ``layout`` (2 digits only): diagonal or side_by_side."""
    if kind not in KINDS:
        raise ValueError(f"unknown Multi-MNIST kind {kind!r}; valid: {', '.join(KINDS)}")
    if split not in ALL_SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(ALL_SPLITS)}")
    if resize not in RESIZES:
        raise ValueError(f"unknown resize {resize!r}; valid: {', '.join(RESIZES)}")
    if layout not in LAYOUT_CHOICES or (layout != "diagonal" and kind != "2digits"):
        raise ValueError(f"unknown layout {layout!r} for {kind}; valid: "
                         f"{', '.join(LAYOUT_CHOICES) if kind == '2digits' else 'diagonal (the default)'}")
    grid_kind = "9digits" if kind == "9digits_byref" else kind
    if layout == "side_by_side":
        grid_kind = "2digits_side_by_side"
    meta = {"kind": grid_kind, "split": split, "seed": seed, "resize": resize, "version": GENERATOR_VERSION}
    path = data_root(root) / "multi_mnist" / f"{grid_kind}_{split}_seed{seed}_{resize}_v{GENERATOR_VERSION}.npz"
    arrays = cache.cached_arrays(path, lambda: _generate(grid_kind, split, seed, root, resize), meta=meta)
    images, grid_labels = arrays["images"], arrays["labels"]
    labels = by_ref_labels(grid_labels) if kind == "9digits_byref" else grid_labels
    data = torch.from_numpy(images), torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return (*data, task_locations(kind if kind == "9digits_byref" else grid_kind, grid_labels)) if locations else data


def _generate(kind, split, seed, root, resize):
    mnist = load_mnist(root)
    if split == "test":
        pool_images, pool_labels = mnist["test_images"], mnist["test_labels"]
    else:
        part = {"train": slice(0, 50_000), "val": slice(50_000, 60_000), "train_all": slice(0, 60_000)}[split]
        pool_images, pool_labels = mnist["train_images"][part], mnist["train_labels"][part]
    size, offsets = LAYOUTS[kind]
    rng = np.random.default_rng([seed, GENERATED.index(kind), ALL_SPLITS.index(split)])
    n = len(pool_images)
    index = np.concatenate([np.arange(n)[:, None], rng.integers(0, n, size=(n, len(offsets) - 1))], axis=1)
    canvas = compose(pool_images, index, size, offsets)
    return {"images": resize_to_28(canvas, resize), "labels": pool_labels[index].astype(np.int64)}


def compose(pool_images, index, size, offsets):
    """Canvas [N, size, size] = pixelwise max of digit ``index[:, k]`` placed at ``offsets[k]``."""
    canvas = np.zeros((len(index), size, size), dtype=np.uint8)
    for k, (row, col) in enumerate(offsets):
        window = canvas[:, row:row + 28, col:col + 28]
        np.maximum(window, pool_images[index[:, k]], out=window)
    return canvas


def resize_to_28(canvas, resize):
    """``nearest``: Pillow's NEAREST (output x reads source floor((x + 0.5) * S / 28)), as
    ``scipy.misc.imresize(interp='nearest')`` in Sener & Koltun. ``bicubic_clipped``: Pillow's BICUBIC on
    a float image as in the released TD code, clipped to [0, 255] before the uint8 cast. ``bicubic_wrap``: the
    released TD code exactly (``Image.fromarray(float64 canvas).resize((28, 28))``, whose default filter is BICUBIC
    from Pillow 7.0 on, then ``astype(np.uint8)``): the overshoot below 0 and above 255 wraps around
    (``wrap_uint8``)."""
    size = canvas.shape[-1]
    if resize == "nearest":
        src = _pillow_nearest_index(size)
        return np.ascontiguousarray(canvas[:, src][:, :, src])
    if resize == "bicubic_wrap":
        from PIL import Image
        out = np.empty((len(canvas), 28, 28), dtype=np.uint8)
        for n, image in enumerate(canvas):
            out[n] = wrap_uint8(np.asarray(Image.fromarray(image.astype(np.float64)).resize((28, 28), Image.BICUBIC)))
        return out
    weights = _pillow_bicubic_matrix(size)
    out = weights @ (canvas.astype(np.float32) @ weights.T)
    return np.clip(out, 0, 255).astype(np.uint8)


def wrap_uint8(values):
    """NumPy's float -> uint8 ``astype`` on x86-64, made explicit (the C cast of an out-of-range value is otherwise
    platform-dependent): truncate toward zero, then modulo 256, e.g. -2.8 -> 254, -0.5 -> 0, 257.8 -> 1."""
    return (np.trunc(values).astype(np.int64) % 256).astype(np.uint8)


def _pillow_nearest_index(size):
    """Source index of each of the 28 output pixels under Pillow's NEAREST, read off Pillow itself: it is
    floor((x + 0.5) * size / 28) except at exact ties, which Pillow's fixed-point arithmetic rounds down."""
    from PIL import Image
    ramp = np.arange(size, dtype=np.int32)[None, :]
    return np.asarray(Image.fromarray(ramp, mode="I").resize((28, 1), Image.NEAREST))[0].astype(np.int64)


def _pillow_bicubic_matrix(size):
    """The [28, size] matrix of Pillow's separable BICUBIC resize in mode 'F', read off Pillow itself."""
    from PIL import Image
    rows = []
    for j in range(size):
        basis = np.zeros((1, size), dtype=np.float32)
        basis[0, j] = 1.0
        rows.append(np.asarray(Image.fromarray(basis, mode="F").resize((28, 1), Image.BICUBIC))[0])
    return np.stack(rows, axis=1).astype(np.float32)


def by_ref_labels(grid_labels):
    """[N, 9] by-location labels -> [N, 10] by-reference labels: task d is the digit right of digit d,
    valid iff d occurs exactly once and not in the last column; -1 where invalid."""
    grid_labels = np.asarray(grid_labels)
    answer = by_ref_answer_positions(grid_labels)
    right = np.take_along_axis(grid_labels, np.maximum(answer, 0), axis=1)
    return np.where(answer >= 0, right, -1).astype(np.int64)


def by_ref_answer_positions(grid_labels):
    """[N, 9] by-location labels -> [N, 10]: the grid position (task index by location) of the digit right of
    digit d, -1 where task d is not valid (d absent, repeated, or in the last column)."""
    hits = grid_labels[:, :, None] == np.arange(10)        # [N, 9 positions, 10 digits]
    position = hits.argmax(axis=1)                          # first position of each digit
    valid = (hits.sum(axis=1) == 1) & (position // 3 < 2)  # unique, column 0 or 1
    return np.where(valid, position + 3, -1)


def task_locations(kind, grid_labels):
    """[N, T, 2] float32 (x, y) in pixels of the 28 x 28 image: the centre of each task's answer digit (the target
    of the localisation loss at the bottom of TD, paper §4.2), -1 where a task does not apply. By location the
    centre of the task's cell, by reference that of the digit right of digit d. ``kind``: a key of ``LAYOUTS`` or
    ``9digits_byref``; ``grid_labels``: [N, K] by location."""
    size, offsets = LAYOUTS["9digits" if kind == "9digits_byref" else kind]
    centres = np.array([[(col + 14) * 28 / size, (row + 14) * 28 / size] for row, col in offsets], dtype=np.float32)
    if kind != "9digits_byref":
        return torch.from_numpy(np.repeat(centres[None], len(grid_labels), axis=0))
    answer = by_ref_answer_positions(np.asarray(grid_labels))
    xy = np.where((answer >= 0)[..., None], centres[np.maximum(answer, 0)], -1.0).astype(np.float32)
    return torch.from_numpy(xy)

