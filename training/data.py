"""The data of a run on the device: every split loaded once into memory as uint8 (``loaders.LOADERS``), cut to
``--subset``, fingerprinted for ``--resume``, and normalised batch by batch on the device."""
import hashlib

import torch

from loaders import LOADERS, NUM_TASKS
from loaders.image_sets import MissingDatasetError
from loaders.mnist import MNISTUnavailable
from training import config
from training.cli import RunError


MNIST_STATS = (LOADERS["multi_mnist"].mean, LOADERS["multi_mnist"].std)


MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def load_data(params, subset, root):
    """{split: (images, labels, locations)} in memory (``loaders.LOADERS``), cut to ``subset``."""
    try:
        data = LOADERS[params["dataset"]].load(params["setting"], params, root)
    except (MissingDatasetError, MNISTUnavailable, ValueError) as err:  # ValueError: a malformed data file
        raise RunError(" ".join(str(err).split())) from None
    except OSError as err:
        raise RunError(f"cannot read or write the data cache: {err}; choose another data root with --data_root") \
            from None
    found, expected = data["train"][1].shape[1], NUM_TASKS[params["setting"]]
    if found != expected:
        raise RunError(f"the {params['dataset']} data has {found} tasks, setting '{params['setting']}' has {expected}; "
                       f"check the data set's files (--data_root)")
    if subset:
        data = cut_to_subset(data, subset)
    return data


def cut_to_subset(data, subset):
    """The first ``subset`` training images and ``subset // 5`` (at least 1) validation and test images of every
    split; config.ParamError (one line) when the subset is larger than the training images, or leaves a task
    without a validation or test image (its accuracy would be no measurement)."""
    pool = len(data["train"][0])
    if subset > pool:
        raise config.ParamError(f"--subset {subset} is more than the {pool} training images; give at most {pool}, or "
                                f"leave --subset out to train on all of them")
    sizes = {"train": subset, "val": max(subset // 5, 1), "test": max(subset // 5, 1)}
    data = {split: tuple(None if array is None else array[:sizes[split]] for array in arrays)
            for split, arrays in data.items()}
    for split in ("val", "test"):
        if split in data:
            empty = (data[split][1] >= 0).sum(dim=0).eq(0).nonzero().flatten().tolist()
            if empty:
                raise config.ParamError(f"--subset {subset} leaves task(s) {empty} without a {split} image "
                                        f"({sizes[split]} {split} images); give a larger --subset")
    return data


def normalize(images, memory_format=torch.contiguous_format, stats=MNIST_STATS):
    """uint8 images on the device -> float [B, C, H, W] with the data set's per-channel ``stats`` (mean, std), as
    ToTensor + Normalize: [B, H, W] grey (Multi-MNIST, C = 1) or [B, 3, H, W] RGB."""
    if images.dim() == 3:
        (mean,), (std,) = stats
        x = images.unsqueeze(1).float().div_(255.0).sub_(mean).div_(std)
    else:
        mean, std = (torch.tensor(value, device=images.device).view(1, -1, 1, 1) for value in stats)
        x = images.float().div_(255.0).sub_(mean).div_(std)
    return x.contiguous(memory_format=memory_format)


def data_fingerprint(splits):
    """A short hash of every split's images and labels: ``--resume`` refuses other data than the run's."""
    digest = hashlib.sha256()
    for split in sorted(splits):
        for array in splits[split][:2]:
            digest.update(f"{split}{tuple(array.shape)}{array.dtype}".encode())
            digest.update(array.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
