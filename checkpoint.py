"""Atomic writes and safe loads: a kill or a full disk at any moment leaves the previous file intact."""
import io
import json
import os
import re
import tempfile
from pathlib import Path

import torch


def atomic_write_bytes(path, write):
    """The project's one atomic writer: calls ``write(file)`` on a temporary file ``<name>.<random>.tmp`` next to
    ``path``, then flush, fsync, rename and (where the system allows) fsync of the folder, so that the rename
    itself survives a power cut. The file gets the usual permissions (0666 less the umask), not mkstemp's 0600."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported everywhere (Windows): best effort
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(obj, path):
    """Serialises in memory first: torch's zip writer turns a failing file write (a full disk) into an
    opaque RuntimeError, whereas a plain write raises the OSError that says what went wrong."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, lambda handle: handle.write(buffer.getbuffer()))


def write_text(text, path):
    atomic_write_bytes(path, lambda handle: handle.write(text.encode()))


def write_json(obj, path):
    write_text(json.dumps(obj, indent=2) + "\n", path)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded (refused, corrupt, truncated): one line saying why."""


def load(path, map_location="cpu"):
    """Loads with ``weights_only=True``: a checkpoint from an untrusted source cannot run code."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - torch reports a damaged file with many exception types
        text = str(err).split("WeightsUnpickler error:")[-1]
        call = re.search(r"GLOBAL ([\w.]+)", text)
        if call:
            raise CheckpointError(f"{path} was refused: loading it would call {call[1]}, not just read weights; "
                                  f"only load checkpoints from a trusted source") from None
        detail = next((line.strip() for line in text.splitlines() if line.strip()), "no details").split(". ")[0]
        raise CheckpointError(f"{path} is corrupt or truncated ({type(err).__name__}: {detail[:200]})") from None
