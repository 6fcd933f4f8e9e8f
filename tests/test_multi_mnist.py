"""Multi-MNIST generators: geometry, label alignment, the by-reference rule, resizing, determinism."""
import numpy as np
import pytest
import torch
from PIL import Image

from loaders import multi_mnist
from loaders.multi_mnist import LAYOUTS, by_ref_labels, compose, make_multi_mnist, resize_to_28


def marker_pool(count):
    """Pool image j is blank except one pixel of value j + 1 at the digit's centre (14, 14)."""
    pool = np.zeros((count, 28, 28), dtype=np.uint8)
    pool[np.arange(count), 14, 14] = np.arange(count) + 1
    return pool


@pytest.mark.parametrize("kind,expected", [
    ("2digits", [(0, 0), (6, 6)]),
    ("4digits", [(0, 0), (12, 0), (0, 12), (12, 12)]),                       # column-major: TL, BL, TR, BR
    ("9digits", [(r, c) for c in (0, 12, 24) for r in (0, 12, 24)]),        # task k: row k % 3, column k // 3
])
def test_digit_of_task_k_is_placed_where_task_k_says(kind, expected):
    size, offsets = LAYOUTS[kind]
    assert offsets == expected and size == {"2digits": 36, "4digits": 40, "9digits": 52}[kind]
    pool = marker_pool(20)
    index = np.array([[3 + 2 * k for k in range(len(offsets))]])
    canvas = compose(pool, index, size, offsets)[0]
    for k, (row, col) in enumerate(offsets):
        assert canvas[14 + row, 14 + col] == index[0, k] + 1
    assert np.count_nonzero(canvas) == len(offsets)


def test_canvas_is_pixelwise_max_of_placements():
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    size, offsets = LAYOUTS["9digits"]
    index = rng.integers(0, 5, size=(3, 9))
    canvas = compose(pool, index, size, offsets)
    for n in range(3):
        expected = np.zeros((size, size), dtype=np.uint8)
        for k, (row, col) in enumerate(offsets):
            placed = np.zeros_like(expected)
            placed[row:row + 28, col:col + 28] = pool[index[n, k]]
            expected = np.maximum(expected, placed)
        assert np.array_equal(canvas[n], expected)


@pytest.mark.parametrize("size", [36, 40, 52])
def test_nearest_resize_matches_pillow(size):
    canvas = np.random.default_rng(size).integers(0, 256, size=(4, size, size), dtype=np.uint8)
    ours = resize_to_28(canvas, "nearest")
    for n in range(4):
        assert np.array_equal(ours[n], np.asarray(Image.fromarray(canvas[n]).resize((28, 28), Image.NEAREST)))


def test_bicubic_clipped_matches_pillow_float_bicubic_without_wraparound():
    blocks = np.random.default_rng(1).integers(0, 2, size=(4, 13, 13), dtype=np.uint8) * 255
    canvas = blocks.repeat(4, axis=1).repeat(4, axis=2)  # sharp 0/255 edges, as MNIST strokes
    ours = resize_to_28(canvas, "bicubic_clipped")
    for n in range(4):
        pil = np.asarray(Image.fromarray(canvas[n].astype(np.float32), mode="F").resize((28, 28), Image.BICUBIC))
        assert pil.min() < 0 or pil.max() > 255  # the overshoot the released code wraps around
        expected = np.clip(pil, 0, 255).astype(np.uint8)
        assert np.abs(ours[n].astype(int) - expected.astype(int)).max() <= 1


def grid_to_labels(grid):
    """A 3x3 grid (rows, columns) -> the 9 by-location labels, column-major."""
    return np.array(grid).T.reshape(-1)


def test_by_reference_rule_on_hand_built_grids():
    grid = [[7, 2, 7],
            [3, 4, 0],
            [6, 1, 4]]
    labels = by_ref_labels(grid_to_labels(grid)[None])[0]
    expected = {0: -1,  # in the last column
                1: 4, 2: 7, 3: 4, 6: 1,
                4: -1, 7: -1,  # occur twice
                5: -1, 8: -1, 9: -1}  # absent
    assert labels.tolist() == [expected[d] for d in range(10)]
    unique = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert by_ref_labels(grid_to_labels(unique)[None])[0].tolist() == [1, 2, -1, 4, 5, -1, 7, 8, -1, -1]


def test_by_reference_valid_fraction_on_real_data():
    _, labels = make_multi_mnist("9digits_byref", "val")
    valid = (labels >= 0).float().mean(dim=0)
    assert labels.shape == (10_000, 10)
    assert ((valid > 0.22) & (valid < 0.30)).all()  # about 25.8% per task


def test_real_sets_shapes_labels_and_split_sources():
    images, labels = make_multi_mnist("9digits", "test")
    assert images.dtype == torch.uint8 and images.shape == (10_000, 28, 28)
    assert labels.dtype == torch.int64 and labels.shape == (10_000, 9)
    assert labels.min() >= 0 and labels.max() <= 9
    from loaders.mnist import load_mnist
    mnist = load_mnist()
    # Task 1 is the base image: every test image once, in order; the val pool is MNIST train[50000:].
    assert np.array_equal(labels[:, 0].numpy(), mnist["test_labels"])
    _, val_labels = make_multi_mnist("2digits", "val")
    assert np.array_equal(val_labels[:, 0].numpy(), mnist["train_labels"][50_000:])
    train_images, train_labels = make_multi_mnist("2digits", "train")
    assert len(train_images) == 50_000
    assert np.array_equal(train_labels[:, 0].numpy(), mnist["train_labels"][:50_000])


def test_generation_is_deterministic_and_seeded(tmp_path, monkeypatch):
    from loaders import mnist
    raw = mnist.load_mnist()
    monkeypatch.setattr(multi_mnist, "load_mnist", lambda root=None: raw)
    a = make_multi_mnist("4digits", "test", seed=3, root=tmp_path / "a")
    b = make_multi_mnist("4digits", "test", seed=3, root=tmp_path / "b")
    c = make_multi_mnist("4digits", "test", seed=4, root=tmp_path / "b")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # The cache is keyed by every generation parameter.
    files = sorted(p.name for p in (tmp_path / "b" / "multi_mnist").glob("*.npz"))
    assert files == ["4digits_test_seed3_nearest_v1.npz", "4digits_test_seed4_nearest_v1.npz"]


def test_bad_arguments_fail_with_valid_choices():
    with pytest.raises(ValueError, match="valid: 2digits, 4digits, 9digits, 9digits_byref"):
        make_multi_mnist("3digits", "train")
    with pytest.raises(ValueError, match="valid: train, val, test, train_all"):
        make_multi_mnist("2digits", "training")
    with pytest.raises(ValueError, match="valid: nearest, bicubic_clipped, bicubic_wrap"):
        make_multi_mnist("2digits", "train", resize="bilinear")


def test_side_by_side_2x1_grid_geometry():
    """The 2x1 layout: a 40x40 canvas as the 4-digit grid's, the two digits side by side in its middle rows with
    the grids' stride of 12; task 0 left, task 1 right; each task's centre where its digit is."""
    size, offsets = LAYOUTS["2digits_side_by_side"]
    assert (size, offsets) == (40, [(6, 0), (6, 12)]) and size == LAYOUTS["4digits"][0]
    pool = marker_pool(10)
    canvas = compose(pool, np.array([[3, 7]]), size, offsets)[0]
    assert canvas[20, 14] == 4 and canvas[20, 26] == 8 and np.count_nonzero(canvas) == 2
    centres = multi_mnist.task_locations("2digits_side_by_side", np.zeros((1, 2), dtype=np.int64))[0]
    torch.testing.assert_close(centres, torch.tensor([[14 * 0.7, 20 * 0.7], [26 * 0.7, 20 * 0.7]]))


def test_side_by_side_real_canvases(tmp_path, monkeypatch):
    """Real 2x1 images: task 0's digit is every pool image in order, the images differ from the diagonal ones,
    both halves carry ink and the rows above and below the pair none, and the cache file is the layout's own."""
    from loaders import mnist
    raw = mnist.load_mnist()
    monkeypatch.setattr(multi_mnist, "load_mnist", lambda root=None: raw)
    images, labels = make_multi_mnist("2digits", "test", root=tmp_path, layout="side_by_side")
    diagonal, _ = make_multi_mnist("2digits", "test", root=tmp_path)
    assert images.shape == (10_000, 28, 28) and labels.shape == (10_000, 2)
    assert np.array_equal(labels[:, 0].numpy(), raw["test_labels"])
    assert not torch.equal(images, diagonal)
    ink = images.float().mean(dim=0)
    assert ink[:, :9].sum() > 0 and ink[:, 19:].sum() > 0        # both digits, left and right
    assert ink[:3].sum() == 0 and ink[-3:].sum() == 0            # the rows above and below the pair are empty
    files = sorted(p.name for p in (tmp_path / "multi_mnist").glob("*.npz"))
    assert files == ["2digits_side_by_side_test_seed0_nearest_v1.npz", "2digits_test_seed0_nearest_v1.npz"]


def test_layout_is_refused_outside_2_digits():
    with pytest.raises(ValueError, match="unknown layout 'grid' for 2digits; valid: diagonal, side_by_side"):
        make_multi_mnist("2digits", "train", layout="grid")
    with pytest.raises(ValueError, match="unknown layout 'side_by_side' for 4digits; valid: diagonal"):
        make_multi_mnist("4digits", "train", layout="side_by_side")
    from training import config
    with pytest.raises(config.ParamError, match="key 'layout': 'side_by_side' is a layout of the 2-digit"):
        config.load_params("params/mmnist_4digits_controlnet.json", ["layout=side_by_side"])
    with pytest.raises(config.ParamError, match="allowed: diagonal, side_by_side"):
        config.load_params("params/mmnist_2digits_controlnet.json", ["layout=grid"])
    assert config.load_params("params/mmnist_2digits_controlnet.json", ["layout=side_by_side"])["layout"] == \
        "side_by_side"
