"""Atomic writes and safe loads: a kill or a full disk at any moment leaves the previous file intact."""
import json
import os
import tempfile
from pathlib import Path

import torch


def atomic_write_bytes(path, write):
    """Calls ``write(file)`` on a temporary file next to ``path``, then flush, fsync and rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(obj, path):
    atomic_write_bytes(path, lambda handle: torch.save(obj, handle))


def write_text(text, path):
    atomic_write_bytes(path, lambda handle: handle.write(text.encode()))


def write_json(obj, path):
    write_text(json.dumps(obj, indent=2) + "\n", path)


def load(path, map_location="cpu"):
    """Loads with ``weights_only=True``: a checkpoint from an untrusted source cannot run code."""
    return torch.load(path, map_location=map_location, weights_only=True)
