"""Verified, atomic on-disk cache for dictionaries of numpy arrays.

Layout for a cache entry ``path`` (e.g. ``data/mnist/mnist_raw.npz``):

* ``path``          an uncompressed ``.npz`` written with ``allow_pickle=False``;
* ``path + ".json"`` a sidecar ``{"sha256", "size", "arrays": {name: {"shape", "dtype"}}, "meta"}``.

Both files are written by the project's one atomic writer, ``files.atomic_write_bytes`` (a temporary file
``<name>.<random>.tmp`` in the same directory, flushed, fsync'ed and moved into place with ``os.replace``), so a
reader never sees a half-written file under the final name. ``load_arrays`` checks size, sha256 and every array's
shape/dtype against the sidecar; on any mismatch it reports one line on stderr, deletes the entry and returns ``None``
so that the caller rebuilds it. It never returns data it could not verify.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from runtime import files

__all__ = ["sha256_file", "save_arrays", "load_arrays", "read_meta", "cached_arrays", "sidecar_path"]

_CHUNK = 1 << 20
# Leftover temporary files (from a writer that was killed) older than this are removed on the
# next save of the same entry; younger ones may belong to a concurrent writer and are left alone.
_STALE_TMP_SECONDS = 3600.0


def sha256_file(path: str | os.PathLike, chunk_size: int = _CHUNK) -> str:
    """Hex sha256 of a file, read in chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk_size)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(str(os.fspath(path)) + ".json")


def _remove_stale_tmp(path: Path) -> None:
    now = time.time()
    for leftover in path.parent.glob(f"{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            if now - leftover.stat().st_mtime > _STALE_TMP_SECONDS:
                leftover.unlink()


def _json_normalise(obj):
    """Round-trip through JSON so that e.g. tuples compare equal to the lists read back."""
    return json.loads(json.dumps(obj))


def save_arrays(path: str | os.PathLike, meta: dict | None = None, **arrays: np.ndarray) -> None:
    """Atomically write ``arrays`` to the ``.npz`` at ``path`` plus its verification sidecar."""
    path = Path(path)
    if not arrays:
        raise ValueError("save_arrays: no arrays given")
    clean: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        arr = np.asarray(value)
        if arr.dtype.hasobject:
            raise TypeError(f"save_arrays: array {name!r} has object dtype; only plain dtypes are cached")
        clean[name] = arr
    meta = _json_normalise(meta) if meta is not None else None  # fails early if not JSON-able

    sidecar = sidecar_path(path)
    # Drop the old sidecar first: if we die between the two renames below, the entry is then
    # seen as "sidecar missing" (and rebuilt) rather than checked against a stale sidecar.
    with contextlib.suppress(FileNotFoundError):
        sidecar.unlink()
    _remove_stale_tmp(path)
    _remove_stale_tmp(sidecar)

    path.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write_bytes(path, lambda handle: np.savez(handle, allow_pickle=False, **clean))

    record = {
        "sha256": sha256_file(path),
        "size": path.stat().st_size,
        "arrays": {name: {"shape": list(a.shape), "dtype": a.dtype.str} for name, a in clean.items()},
        "meta": meta,
    }
    files.write_text(json.dumps(record, indent=1, sort_keys=True), sidecar)


def _discard(path: Path, reason: str) -> None:
    print(f"cache: {path} is corrupt ({reason}); rebuilding", file=sys.stderr, flush=True)
    for p in (path, sidecar_path(path)):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _read_sidecar(path: Path) -> dict:
    """Parse and structurally validate the sidecar; raises ValueError/OSError on any problem."""
    record = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
    if not isinstance(record, dict):
        raise ValueError("sidecar is not a JSON object")
    for key in ("sha256", "size", "arrays"):
        if key not in record:
            raise ValueError(f"sidecar lacks {key!r}")
    if not isinstance(record["arrays"], dict) or not record["arrays"]:
        raise ValueError("sidecar has no array list")
    return record


def load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray] | None:
    """Return the verified arrays at ``path``, or ``None`` if missing or corrupt (then deleted)."""
    path = Path(path)
    if not path.exists():
        # An orphaned sidecar is useless; drop it quietly.
        with contextlib.suppress(FileNotFoundError):
            sidecar_path(path).unlink()
        return None

    if not sidecar_path(path).exists():
        _discard(path, "sidecar missing")
        return None
    try:
        record = _read_sidecar(path)
    except (OSError, ValueError) as exc:
        _discard(path, f"sidecar unreadable: {exc}")
        return None

    size = path.stat().st_size
    if size != record["size"]:
        _discard(path, f"size {size} bytes, expected {record['size']}")
        return None
    digest = sha256_file(path)
    if digest != record["sha256"]:
        _discard(path, f"sha256 {digest[:12]}..., expected {str(record['sha256'])[:12]}...")
        return None

    try:
        with np.load(path, allow_pickle=False) as npz:
            out = {name: npz[name] for name in npz.files}
    except Exception as exc:  # noqa: BLE001 - any failure to parse means a bad entry
        _discard(path, f"unreadable npz: {type(exc).__name__}: {exc}")
        return None

    expected = record["arrays"]
    if set(out) != set(expected):
        _discard(path, f"arrays {sorted(out)}, expected {sorted(expected)}")
        return None
    for name, arr in out.items():
        want = expected[name]
        if list(arr.shape) != list(want.get("shape", [])) or arr.dtype.str != want.get("dtype"):
            _discard(path, f"array {name!r} is {arr.dtype.str}{list(arr.shape)}, "
                           f"expected {want.get('dtype')}{want.get('shape')}")
            return None
    return out


def read_meta(path: str | os.PathLike):
    """The ``meta`` recorded in the sidecar of ``path`` (unverified), or ``None``."""
    try:
        return _read_sidecar(Path(path)).get("meta")
    except (OSError, ValueError):
        return None


def cached_arrays(path: str | os.PathLike, build_fn: Callable[[], dict], meta: dict | None = None) -> dict:
    """Load the verified entry at ``path``; otherwise ``build_fn()``, save it and return it.

    When ``meta`` is given and differs from the meta recorded with the entry, the entry is
    considered stale and rebuilt.
    """
    path = Path(path)
    data = load_arrays(path)
    if data is not None and meta is not None:
        recorded = read_meta(path)
        if recorded != _json_normalise(meta):
            print(f"cache: {path} is stale (meta {recorded!r} != {meta!r}); rebuilding",
                  file=sys.stderr, flush=True)
            data = None
    if data is not None:
        return data
    built = build_fn()
    if not isinstance(built, dict) or not built:
        raise TypeError("cached_arrays: build_fn must return a non-empty dict of arrays")
    built = {name: np.asarray(arr) for name, arr in built.items()}
    save_arrays(path, meta=meta, **built)
    return built
