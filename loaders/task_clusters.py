"""The MNIST and Fashion-MNIST clusters of the three-task-clusters experiment of Maziarz et al. (arXiv 1910.04915,
Sec. 5.3; google-research/google-research@0c1bbe5f ``learning_parameter_allocation/clusters/clusters_train.py``
get_all_tasks and ``learning_parameter_allocation/data.py``).

20 tasks, named as the original: ``MNIST-c`` (c = 0..9) tells apart the nine digits other than c, ``Fashion-c`` the
nine Fashion-MNIST classes other than c (leave-one-out, ``data.get_leave_one_out_classification``: images of class c
are dropped, labels above c shift down by one, so every task is 9-way with labels 0..8). The third cluster of the
paper, 20 CIFAR-100 coarse-label tasks, is left out: CIFAR-100 cannot be obtained on this machine.

Images as ``data.convert_format_mnist_to_cifar``: pixels / 255, then resized 28 -> 32 with TF1's
``tf.image.resize_images`` (bilinear, ``align_corners=False``, no half-pixel centres; :func:`resize_matrix`). The
original also repeats the grey channel to RGB; we keep one channel, which loses nothing: on three equal channels the
network's first layer, a 1x1 conv, is the same function as a 1x1 conv on one channel with the weights summed.
Training images are augmented as ``data.augment_with_random_crop``: zero-padded to 40x40 (centred) and cropped back
to 32x32 at a uniformly drawn offset (:func:`random_crop`, vectorised and seeded; no flips). Evaluation images are
not augmented (the original's ``train_clean`` / ``test``).

Splits: the original trains on the full 60k training set of both datasets and has no validation split for them; we
hold out ``val_size`` images of each training set (a random split seeded by ``data_seed``, the same for all ten tasks
of a dataset) as validation. ``test`` = the 10k test set. Images stay uint8 28x28 in memory (shared by the ten tasks
of a dataset); :class:`TaskImages` resizes (and augments) each batch when it is indexed.
"""
import torch
import torch.nn.functional as F

from .fashion_mnist import load_fashion_mnist
from .mnist import load_mnist

DATASETS = ("MNIST", "Fashion")
TASKS = tuple(f"{dataset}-{c}" for dataset in DATASETS for c in range(10))
NUM_CLASSES = 9
IMAGE_SIZE = 32
CROP_PADDING = 4  # resize_with_crop_or_pad to 32 + 8 = 40


def resize_matrix(in_size=28, out_size=IMAGE_SIZE):
    """``[out_size, in_size]`` linear-interpolation weights of TF1 ``resize_bilinear`` with ``align_corners=False``
    and ``half_pixel_centers=False``: output pixel i samples the input at i * in_size / out_size, between the pixels
    floor(.) and floor(.) + 1 (clamped to the last one). Resizing an image is ``A @ image @ A.T``."""
    source = torch.arange(out_size, dtype=torch.float64) * (in_size / out_size)
    low = source.floor().long()
    high = (low + 1).clamp(max=in_size - 1)
    frac = source - low
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    matrix[torch.arange(out_size), low] += 1 - frac
    matrix[torch.arange(out_size), high] += frac
    return matrix.float()


RESIZE = resize_matrix()


def resize(images):
    """``[N, 28, 28]`` (any real dtype) -> float ``[N, 32, 32]`` on the same value scale, TF1 bilinear."""
    return torch.einsum("ij,njk,lk->nil", RESIZE, images.float(), RESIZE)


def random_crop(images, generator, padding=CROP_PADDING):
    """Pad-and-crop augmentation of ``[N, S, S]`` images: zero-pad ``padding`` pixels on every side, then crop S x S
    at offsets drawn uniformly from 0..2 * padding per image and axis (one draw of ``generator`` per call)."""
    n, size = len(images), images.shape[-1]
    padded = F.pad(images, (padding,) * 4)
    offsets = torch.randint(0, 2 * padding + 1, (2, n, 1), generator=generator)
    rows = (offsets[0] + torch.arange(size))[:, :, None]  # [N, S, 1]
    cols = (offsets[1] + torch.arange(size))[:, None, :]  # [N, 1, S]
    return padded[torch.arange(n)[:, None, None], rows, cols]


def leave_one_out(labels, left_out):
    """``(index, labels)`` of the leave-one-out task: the positions whose label is not ``left_out``, and their labels
    with every label above ``left_out`` shifted down by one (``data.get_leave_one_out_classification``)."""
    index = torch.nonzero(labels != left_out).squeeze(1)
    kept = labels[index]
    return index, kept - (kept > left_out).long()


class TaskImages:
    """One task's images as a lazy view of its dataset's uint8 ``[M, 28, 28]`` source: indexing with an index tensor
    or a slice returns float ``[n, 32, 32]`` images, resized and, when a ``generator`` is given (training), pad-and-
    crop augmented, on the 0..255 scale of the source, so that ``round_robin.to_input`` (add the channel,
    divide by 255) makes the network input of it."""

    def __init__(self, source, index, generator=None):
        self.source, self.index, self.generator = source, index, generator

    def __len__(self):
        return len(self.index)

    def __getitem__(self, key):
        images = resize(self.source[self.index[key]])
        return images if self.generator is None else random_crop(images, self.generator)


def split_train_val(images, labels, val_size, data_seed):
    """A random split of a training set into (train, val) with ``val_size`` validation images, seeded; both parts
    keep the dataset order."""
    if not 0 <= val_size < len(labels):
        raise ValueError(f"val_size must be in 0..{len(labels) - 1}, got {val_size}")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(data_seed))
    train, val = order[val_size:].sort().values, order[:val_size].sort().values
    return (images[train], labels[train]), (images[val], labels[val])


def random_subset(n, size, data_seed):
    """``size`` of the positions 0..n-1 drawn without replacement (seeded), in increasing order."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(data_seed))[:size].sort().values


def load_task_clusters(root=None, val_size=10_000, data_seed=0, subset=None, seed=0, eval_subset=None):
    """``{"tasks": TASKS, "train": [(TaskImages, labels int64) x 20], "val": [...], "test": [...]}``, tasks in the
    order of ``TASKS``. ``val_size`` images of each training set are held out (split seeded by ``data_seed``). With
    ``subset``, each dataset's training part keeps ``subset`` random images; with ``eval_subset``, every task keeps
    ``eval_subset`` random images of its val and test split (both seeded by ``data_seed``, in dataset order; random
    rather than the first ones because the first half of the MNIST test set is the easier one). Training views
    augment with one generator per task, seeded by ``seed`` and the task index; evaluation views do not augment."""
    splits = {"train": [], "val": [], "test": []}
    for d, data in enumerate((load_mnist(root), load_fashion_mnist(root))):
        images, labels = torch.from_numpy(data["train_images"]), torch.from_numpy(data["train_labels"])
        train, val = split_train_val(images, labels, val_size, data_seed)
        if subset is not None:
            if not 0 < subset <= len(train[1]):
                raise ValueError(f"subset must be in 1..{len(train[1])}, got {subset}")
            keep = random_subset(len(train[1]), subset, data_seed)
            train = (train[0][keep], train[1][keep])
        test = (torch.from_numpy(data["test_images"]), torch.from_numpy(data["test_labels"]))
        for left_out in range(10):
            task = d * 10 + left_out
            for split, (source, source_labels) in (("train", train), ("val", val), ("test", test)):
                index, task_labels = leave_one_out(source_labels, left_out)
                generator = None
                if split == "train":
                    generator = torch.Generator().manual_seed(seed * 1000 + task)
                elif eval_subset is not None and eval_subset < len(index):
                    keep = random_subset(len(index), eval_subset, data_seed)
                    index, task_labels = index[keep], task_labels[keep]
                splits[split].append((TaskImages(source, index, generator), task_labels))
    return {"tasks": TASKS, **splits}
