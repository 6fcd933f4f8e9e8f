"""Shared pieces of the real-image loaders: CLEVR, CELEB-A and CUB-200 (paper §4.1).

Every data set here is a ``torch.utils.data.Dataset`` whose items are

    (image uint8 [3, S, S], labels int64 [T], locations float32 [T, 2])

- the image resized to the model input S x S with Pillow's BILINEAR filter (the authors'
  ``transforms.Resize((224, 224), interpolation=2)``); normalisation is left to the training code
  (``normalize_rgb``: ImageNet mean and std, as the authors' CLEVR transform);
- one label per task, -1 where the task is undefined for the image (ignored by the loss and the metrics);
- the (x, y) pixel, in the S x S image, of each task's ground-truth object or part, for the auxiliary
  localisation loss at the bottom of TD (paper §4.2); -1 where none is annotated or visible.

The images are decoded on access; ``stack`` decodes a whole (small) data set into tensors, and ``to_tensors``
decodes any of them into the preallocated uint8 tensors that the training script keeps in memory (CLEVR's
85K images at 224 x 224 take 12.8 GB), with parallel workers for large sets. ``ImageTaskSet.labels`` holds all
labels at once ([N, T], for drawing each image's task among its valid ones); ``subset(index)`` selects images.
"""
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MissingDatasetError(FileNotFoundError):
    """A data set is absent or incomplete; the message says where to put which files."""


def resolve_root(root, env, name, layout):
    """The data set directory: ``root`` if given, else ``$env``; ``layout`` (text) describes what it holds."""
    root = root or os.environ.get(env)
    if not root:
        raise MissingDatasetError(f"no {name} directory given: pass its path (root=..., or the training script's "
                                  f"--data_root) or set {env}=DIR, where DIR holds {layout}")
    return Path(root).expanduser()


def find_file(root, candidates, name, env, layout):
    """The first of ``candidates`` (paths relative to ``root``) that exists, else a MissingDatasetError."""
    for relative in candidates:
        path = root / relative
        if path.exists():
            return path
    raise MissingDatasetError(f"{name} not found under {root}: missing {' or '.join(map(str, candidates))}; "
                              f"the directory (given as root=... or ${env}) must hold {layout}")


def check_images(paths, name, env, layout):
    """Raises a MissingDatasetError naming how many of ``paths`` are absent, and one of them."""
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise MissingDatasetError(f"{len(missing)} {name} images are missing, e.g. {missing[0]}; the directory "
                                  f"(given as root=... or ${env}) must hold {layout}")


def load_rgb(path, size):
    """Returns ``(image uint8 [3, size, size], (width, height) of the file)``."""
    with Image.open(path) as img:
        source_size = img.size
        rgb = img.convert("RGB").resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(rgb).transpose(2, 0, 1).copy()), source_size


def normalize_rgb(images):
    """uint8 [B, 3, H, W] -> float [B, 3, H, W] with the ImageNet mean and std (ToTensor + Normalize)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def held_out_split(num_items, fraction, seed):
    """``(train_index, val_index)``: a seeded random ``fraction`` of ``range(num_items)`` (at least one item
    when there are two or more) is held out as a validation split; both index arrays are sorted."""
    num_val = int(round(num_items * fraction))
    if fraction > 0 and num_items >= 2:
        num_val = min(max(num_val, 1), num_items - 1)
    order = np.random.default_rng(seed).permutation(num_items)
    return np.sort(order[num_val:]), np.sort(order[:num_val])


class ImageTaskSet(Dataset):
    """Images on disk with per-task labels (-1 = invalid; any integer dtype, int8 for large task sets) and
    per-task locations in source-image pixels (negative where absent), given by ``source_locations``;
    items rescale the locations to the S x S output."""

    def __init__(self, paths, labels, size):
        self.paths = list(paths)
        self.labels = torch.as_tensor(np.asarray(labels))
        self.size = size
        if len(self.paths) != len(self.labels):
            raise ValueError("paths and labels must have the same length")

    @property
    def num_tasks(self):
        return self.labels.shape[1]

    def source_locations(self, index):
        raise NotImplementedError

    def subset(self, index):
        raise NotImplementedError

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        image, (width, height) = load_rgb(self.paths[index], self.size)
        xy = self.source_locations(index)
        scale = torch.tensor([self.size / width, self.size / height])
        locations = torch.where(xy >= 0, xy * scale, torch.full_like(xy, -1.0))
        return image, self.labels[index].long(), locations


class TaskImageSet(ImageTaskSet):
    """``locations``: float [N, T, 2], (x, y) in the pixels of the source image, -1 where absent."""

    def __init__(self, paths, labels, locations, size):
        super().__init__(paths, labels, size)
        self.locations = torch.as_tensor(np.asarray(locations, dtype=np.float32))
        if len(self.locations) != len(self.paths):
            raise ValueError("paths and locations must have the same length")

    def source_locations(self, index):
        return self.locations[index]

    def subset(self, index):
        return TaskImageSet([self.paths[i] for i in index], self.labels[index], self.locations[index], self.size)


def stack(dataset):
    """Decodes a whole data set: ``(images uint8 [N,3,S,S], labels int64 [N,T], locations float32 [N,T,2])``."""
    images, labels, locations = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.stack(labels), torch.stack(locations)


def to_tensors(dataset, workers=None):
    """Decodes an ``ImageTaskSet`` for the training script: ``(images uint8 [N,3,S,S], labels [N,T] (the set's
    integer dtype), locations float32 [N,T,2])``. ``workers`` decoding processes (default: up to 8 for 10,000
    images or more, where they pay for their start-up; none below)."""
    n, size = len(dataset), dataset.size
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if n >= 10_000 else 0
    images = torch.empty((n, 3, size, size), dtype=torch.uint8)
    locations = torch.empty((n, dataset.num_tasks, 2), dtype=torch.float32)
    begin = 0
    for image, _, xy in DataLoader(dataset, batch_size=256, num_workers=workers):
        images[begin:begin + len(image)], locations[begin:begin + len(image)] = image, xy
        begin += len(image)
    return images, dataset.labels, locations
