"""Fashion-MNIST (Xiao et al. 2017) from its four IDX files, for the three-task-clusters experiment of Maziarz et al.
(arXiv 1910.04915, Sec. 5.3; tfds ``fashion_mnist`` is the source of their
``learning_parameter_allocation/clusters/clusters_train.py``, google-research/google-research@0c1bbe5f).

Sources, in order:

1. the IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
   ``t10k-labels-idx1-ubyte`` (each plain or ``.gz``) in ``<root>/fashion_mnist/``;
2. the Debian package ``dataset-fashion-mnist`` (it ships the four ``.gz`` files in
   ``/usr/share/datasets/fashion-mnist/``): ``apt-get download`` (no root needed) into a temporary folder of the data
   root, ``dpkg-deb -x`` there, and the four files moved into ``<root>/fashion_mnist/``, so later loads take source 1.

Files are parsed with :func:`loaders.mnist.read_idx` and accepted only with Fashion-MNIST's exact shape and per-class
counts (6,000 train and 1,000 test images per class). The data root is ``root``, else ``$MTL_DATA_ROOT``, else
``./data`` (:func:`loaders.mnist.data_root`).
"""
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from .mnist import IDX_NAMES, IDXError, check_mnist, data_root, read_idx

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
TRAIN_COUNTS = (6000,) * 10
TEST_COUNTS = (1000,) * 10
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = Path("usr/share/datasets/fashion-mnist")  # where the package puts the .gz files
APT_TIMEOUT_S = 600


class FashionMNISTUnavailable(RuntimeError):
    """Fashion-MNIST could not be read or fetched; the message is one line saying why and where to put the files."""


def fashion_dir(root=None):
    return data_root(root) / "fashion_mnist"


def _find(directory, stem):
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _read(path, ndim):
    """One IDX file as a uint8 array of ``ndim`` dimensions (images 3-d, magic 0x803; labels 1-d, magic 0x801)."""
    array = read_idx(path)
    if array.dtype != np.uint8 or array.ndim != ndim:
        raise IDXError(f"{path}: expected a {ndim}-d uint8 IDX file (magic 0x0000080{ndim}), got {array.ndim}-d "
                       f"{array.dtype}")
    return array


def read_fashion_dir(directory):
    """The four IDX files of ``directory`` as ``{train_images uint8 [60000, 28, 28], train_labels int64 [60000],
    test_images uint8 [10000, 28, 28], test_labels int64 [10000]}``, the format of :func:`loaders.mnist.load_mnist`.
    Raises :class:`FashionMNISTUnavailable` for a missing, malformed or wrong-sized file."""
    files = {key: _find(directory, stem) for key, stem in IDX_NAMES.items()}
    missing = [IDX_NAMES[key] for key, path in files.items() if path is None]
    if missing:
        raise FashionMNISTUnavailable(f"{directory}: missing {', '.join(missing)} (plain or .gz)")
    try:
        data = {key: _read(path, 3) if key.endswith("images") else _read(path, 1).astype(np.int64)
                for key, path in files.items()}
        check_mnist(data, TRAIN_COUNTS, TEST_COUNTS)
    except IDXError as err:
        raise FashionMNISTUnavailable(f"{err}; replace or delete the file") from None
    except ValueError as err:  # check_mnist: wrong shape, dtype, label range or class counts
        raise FashionMNISTUnavailable(f"{directory}: not Fashion-MNIST ({err}); replace or delete the files") from None
    return data


def fetch_from_debian(directory):
    """Source 2: ``apt-get download dataset-fashion-mnist`` + ``dpkg-deb -x`` in a temporary folder next to
    ``directory``; moves the package's four ``.gz`` IDX files into ``directory`` (files already there are kept).
    Raises :class:`FashionMNISTUnavailable` if apt or dpkg-deb is missing or fails."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=".fashion_deb.") as tmp:
        tmp = Path(tmp)
        _run(["apt-get", "download", DEBIAN_PACKAGE], tmp)
        packages = sorted(tmp.glob(f"{DEBIAN_PACKAGE}_*.deb"))
        if not packages:
            raise FashionMNISTUnavailable(f"`apt-get download {DEBIAN_PACKAGE}` wrote no .deb into {tmp}")
        _run(["dpkg-deb", "-x", str(packages[-1]), str(tmp / "extracted")], tmp)
        source = tmp / "extracted" / DEBIAN_DIR
        for stem in IDX_NAMES.values():
            if _find(directory, stem) is None:
                if not (source / f"{stem}.gz").is_file():
                    raise FashionMNISTUnavailable(f"{packages[-1].name} has no {DEBIAN_DIR / stem}.gz")
                shutil.move(source / f"{stem}.gz", directory / f"{stem}.gz")


def _run(command, cwd):
    try:
        subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
    except FileNotFoundError:
        raise FashionMNISTUnavailable(f"`{command[0]}` not found (not a Debian-based system)") from None
    except subprocess.TimeoutExpired:
        raise FashionMNISTUnavailable(f"`{' '.join(command)}` timed out after {APT_TIMEOUT_S} s") from None
    except subprocess.CalledProcessError as err:
        last = (err.stderr or err.stdout or "").strip().splitlines()
        raise FashionMNISTUnavailable(f"`{' '.join(command)}` failed (exit {err.returncode}"
                                      f"{': ' + last[-1] if last else ''})") from None


def load_fashion_mnist(root=None, fetch=True):
    """Fashion-MNIST in the format of :func:`loaders.mnist.load_mnist` (numpy uint8 images, int64 labels 0..9 in the
    order of ``CLASSES``), from ``<root>/fashion_mnist/``, fetched there from Debian first if no file is there and
    ``fetch``. Raises :class:`FashionMNISTUnavailable` with one line saying what failed and where to put the files."""
    directory = fashion_dir(root)
    if any(_find(directory, stem) is None for stem in IDX_NAMES.values()):
        where = (f"put the four IDX files {', '.join(stem + '.gz' for stem in IDX_NAMES.values())} (plain or .gz) "
                 f"into {directory}, or set MTL_DATA_ROOT to a data root that has them in fashion_mnist/")
        if not fetch:
            raise FashionMNISTUnavailable(f"Fashion-MNIST is not in {directory}: {where}")
        try:
            fetch_from_debian(directory)
        except FashionMNISTUnavailable as err:
            raise FashionMNISTUnavailable(f"Fashion-MNIST is not in {directory} and could not be fetched from Debian "
                                          f"({err}); {where}") from None
    return read_fashion_dir(directory)

