"""The four tasks of the MNIST experiment of Maziarz et al. (arXiv 1910.04915, Sec. 5.1;
``learning_parameter_allocation/mnist/mnist_train.py`` of google-research/google-research@0c1bbe5f).

``MNIST``, ``MNIST-2``, ``MNIST-Rot``, ``MNIST-Rot-2``: all 10-way digit classification with the digit labels.
``MNIST-2`` is the very same data as ``MNIST`` (same images, same labels); ``MNIST-Rot`` is every image rotated by 90
degrees counter-clockwise (``tf.image.rot90`` with k=1, i.e. ``torch.rot90(x, 1, (-2, -1))``), labels unchanged, and
``MNIST-Rot-2`` is again the same data. The copies are "identical but separate" tasks: in training each gets its own
shuffle and its own head. 60k train / 10k test, no validation split. Copies share storage (no extra memory).
"""
import torch

from .mnist import load_mnist

TASKS = ("MNIST", "MNIST-2", "MNIST-Rot", "MNIST-Rot-2")


def rotate90(images):
    """Rotates ``[..., H, W]`` images by 90 degrees counter-clockwise (the top-right corner goes to the top-left)."""
    return torch.rot90(images, 1, (-2, -1))


def make_tasks(images, labels):
    """``images uint8 [N, 28, 28]``, ``labels int64 [N]`` -> one ``(images, labels)`` pair per task of ``TASKS``."""
    rotated = rotate90(images).contiguous()
    return [(images, labels), (images, labels), (rotated, labels), (rotated, labels)]


def load_rotated_mnist(root=None, subset=None, seed=0):
    """``{"train": [(images uint8 [N, 28, 28], labels int64 [N]) x 4 tasks], "test": [... x 4]}`` in the order of
    ``TASKS``; N = 60,000 / 10,000. With ``subset``, the training split keeps ``subset`` images drawn without
    replacement by a generator seeded with ``seed`` (the same images for all four tasks, kept in MNIST order);
    the test split is always complete. Deterministic for a given (subset, seed)."""
    mnist = load_mnist(root)
    splits = {}
    for split in ("train", "test"):
        images = torch.from_numpy(mnist[f"{split}_images"])
        labels = torch.from_numpy(mnist[f"{split}_labels"])
        if split == "train" and subset is not None:
            if not 0 < subset <= len(images):
                raise ValueError(f"subset must be in 1..{len(images)}, got {subset}")
            keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:subset].sort().values
            images, labels = images[keep], labels[keep]
        splits[split] = make_tasks(images, labels)
    return splits
