"""Segmentation targets for Multi-MNIST (paper Table 5, "classification and segmentation"): for every image and
task, the 28x28 binary mask of the task's digit.

The mask of a digit is its source MNIST image thresholded (pixel > ``threshold``, default 127), placed on the
canvas at the digit's offset and resized to 28x28 exactly as the composite image (``loaders.multi_mnist``):

- ``nearest`` (the default): the same pixel selection as the image's resize, so the masks are exact: for any
  threshold, the union over the digits of an image of their masks is ``image > threshold``, pixel for pixel
  (the canvas is the pixelwise max of the placed digits, and max > t iff some digit > t).
- ``bicubic_clipped`` and ``bicubic_wrap``: the 0/1 mask is resized with the image's BICUBIC matrix and
  thresholded again at 0.5 (the union then matches ``image > threshold`` closely, not exactly; the wrap-around
  of ``bicubic_wrap`` changes pixel values, not where a digit lies).

The generator of ``loaders.multi_mnist`` does not store which MNIST digit went where, so the placements are
regenerated here with its seeded procedure (same pool, same ``default_rng([seed, kind, split])`` draw) and checked
on generation: the recomposed images and labels must equal ``make_multi_mnist``'s, else ``PlacementMismatch``.

By location (``9digits``, also ``2digits`` / ``4digits``) task k's mask is the digit at offset k. By reference
(``9digits_byref``) task d's mask is that of the *answer*, the digit right of digit d (grid position of d + 3),
where the task is valid (label >= 0); an all-zero mask where it is not (label -1: ignored by loss and metrics).

Per-position masks are cached bit-packed in ``<data root>/multi_mnist/`` (``loaders.cache``), keyed by kind,
split, seed, resize, threshold and both generator versions.
"""
import numpy as np
import torch

from . import cache
from .mnist import data_root, load_mnist
from .multi_mnist import (ALL_SPLITS, GENERATOR_VERSION, KINDS, LAYOUTS, RESIZES, _pillow_bicubic_matrix,
                          _pillow_nearest_index, by_ref_labels, compose, make_multi_mnist, resize_to_28)

SEG_VERSION = 1
DEFAULT_THRESHOLD = 127  # mask = MNIST pixel > 127 (of 0..255)
SIDE = 28


class PlacementMismatch(RuntimeError):
    """The regenerated placements do not reproduce ``make_multi_mnist``'s images (its generator has changed)."""


def make_multi_mnist_seg(kind, split, seed=0, root=None, resize="nearest", threshold=DEFAULT_THRESHOLD):
    """Returns ``(images uint8 [N,28,28], labels int64 [N,T], masks bool [N,T,28,28])`` as torch tensors; images
    and labels are ``make_multi_mnist``'s. An invalid by-reference task (label -1) has an all-zero mask."""
    if not (isinstance(threshold, int) and 0 <= threshold <= 254):
        raise ValueError(f"mask threshold must be an integer from 0 to 254, got {threshold!r}")
    images, labels = make_multi_mnist(kind, split, seed, root, resize)  # validates kind, split, resize
    grid_kind = "9digits" if kind == "9digits_byref" else kind
    position_masks = location_masks(grid_kind, split, seed, root, resize, threshold)  # [N, K, 28, 28] bool
    if kind == "9digits_byref":
        grid_labels = make_multi_mnist(grid_kind, split, seed, root, resize)[1].numpy()
        positions = by_ref_positions(grid_labels)
        masks = take_positions(position_masks, positions)
    else:
        masks = position_masks
    return images, labels, torch.from_numpy(masks)


def location_masks(kind, split, seed=0, root=None, resize="nearest", threshold=DEFAULT_THRESHOLD):
    """Masks of the digit at each grid position, numpy bool [N, K, 28, 28] (cached, bit-packed)."""
    meta = {"kind": kind, "split": split, "seed": seed, "resize": resize, "threshold": threshold,
            "generator_version": GENERATOR_VERSION, "seg_version": SEG_VERSION}
    path = data_root(root) / "multi_mnist" / \
        f"seg_{kind}_{split}_seed{seed}_{resize}_t{threshold}_v{GENERATOR_VERSION}.{SEG_VERSION}.npz"
    arrays = cache.cached_arrays(path, lambda: _generate_masks(kind, split, seed, root, resize, threshold), meta=meta)
    packed, n, k = arrays["packed_masks"], *arrays["shape"]
    return np.unpackbits(packed, axis=-1, count=SIDE * SIDE).astype(bool).reshape(n, k, SIDE, SIDE)


def pool(mnist, split):
    """The MNIST pool of a split, as ``multi_mnist._generate``: (images, labels)."""
    if split == "test":
        return mnist["test_images"], mnist["test_labels"]
    part = slice(0, 50_000) if split == "train" else slice(50_000, 60_000)
    return mnist["train_images"][part], mnist["train_labels"][part]


def placements(kind, split, seed, n):
    """[n, K] index into the split's pool of the digit at each grid position: the same draw as
    ``multi_mnist._generate`` (position 0: every pool image once, in order; the others uniform with replacement)."""
    offsets = LAYOUTS[kind][1]
    rng = np.random.default_rng([seed, KINDS.index(kind), ALL_SPLITS.index(split)])
    return np.concatenate([np.arange(n)[:, None], rng.integers(0, n, size=(n, len(offsets) - 1))], axis=1)


def _generate_masks(kind, split, seed, root, resize, threshold):
    pool_images, pool_labels = pool(load_mnist(root), split)
    index = placements(kind, split, seed, len(pool_images))
    size, offsets = LAYOUTS[kind]
    images, labels = make_multi_mnist(kind, split, seed, root, resize)
    if not np.array_equal(pool_labels[index], labels.numpy()) or \
            not np.array_equal(resize_to_28(compose(pool_images, index, size, offsets), resize), images.numpy()):
        raise PlacementMismatch(f"the regenerated placements of Multi-MNIST {kind}/{split} (seed {seed}, {resize}) do "
                                f"not reproduce loaders.multi_mnist's images; update loaders/multi_mnist_seg.py to "
                                f"its generator (version {GENERATOR_VERSION})")
    digit_masks = pool_images > threshold  # [P, 28, 28]
    masks = np.stack([place_and_resize(digit_masks, index[:, k], size, offset, resize)
                      for k, offset in enumerate(offsets)], axis=1)  # [N, K, 28, 28]
    n, k = masks.shape[:2]
    return {"packed_masks": np.packbits(masks.reshape(n, k, -1), axis=-1), "shape": np.array([n, k]),
            "index": index.astype(np.int64)}


def place_and_resize(digit_masks, which, size, offset, resize, chunk=10_000):
    """Masks [N, 28, 28] of ``digit_masks[which]`` placed at ``offset`` on a ``size`` canvas, resized to 28x28 as
    the images: nearest = the image's pixel selection; bicubic_clipped and bicubic_wrap = the image's BICUBIC
    matrix on the 0/1 mask, then >= 0.5. Only the canvas rows/columns that the digit covers are touched (no full
    canvas)."""
    row, col = offset
    if resize == "nearest":
        src = _pillow_nearest_index(size)
        rows, cols = src - row, src - col  # source pixel inside the digit's 28x28 window, or outside it
        in_r, in_c = (rows >= 0) & (rows < SIDE), (cols >= 0) & (cols < SIDE)
        out = np.zeros((len(which), SIDE, SIDE), dtype=bool)
        out_r, out_c = np.nonzero(in_r)[0], np.nonzero(in_c)[0]
        out[:, out_r[:, None], out_c[None, :]] = digit_masks[which][:, rows[in_r][:, None], cols[in_c][None, :]]
        return out
    if resize not in ("bicubic_clipped", "bicubic_wrap"):
        raise ValueError(f"unknown resize {resize!r}; valid: {', '.join(RESIZES)}")
    weights = _pillow_bicubic_matrix(size)  # [28, size]
    w_rows, w_cols = weights[:, row:row + SIDE], weights[:, col:col + SIDE]
    out = np.empty((len(which), SIDE, SIDE), dtype=bool)
    for begin in range(0, len(which), chunk):
        m = digit_masks[which[begin:begin + chunk]].astype(np.float32)
        out[begin:begin + chunk] = (w_rows @ m @ w_cols.T) >= 0.5
    return out


def by_ref_positions(grid_labels):
    """[N, 9] by-location labels -> [N, 10]: grid position of by-reference task d's answer (the digit right of
    digit d, at d's position + 3), -1 where the task is invalid (the -1 labels of ``by_ref_labels``)."""
    grid_labels = np.asarray(grid_labels)
    hits = grid_labels[:, :, None] == np.arange(10)
    position = hits.argmax(axis=1)
    valid = (hits.sum(axis=1) == 1) & (position // 3 < 2)
    answer = np.where(valid, position + 3, -1).astype(np.int64)
    ref = by_ref_labels(grid_labels)
    picked = np.take_along_axis(grid_labels, np.maximum(answer, 0), axis=1)
    assert np.array_equal(np.where(answer >= 0, picked, -1), ref), "by-reference answer positions disagree with labels"
    return answer


def take_positions(position_masks, positions):
    """[N, K, 28, 28] masks per grid position, [N, T] position per task (-1 = none) -> [N, T, 28, 28] (zeros at -1)."""
    picked = np.take_along_axis(position_masks, np.maximum(positions, 0)[:, :, None, None], axis=1)
    picked[positions < 0] = False
    return picked
