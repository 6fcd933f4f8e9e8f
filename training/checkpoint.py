"""Checkpoints written atomically (``runtime.files``) and loaded safely (weights only, one-line errors)."""
import io
import re

import torch

from runtime.files import atomic_write_bytes


def save(obj, path):
    """Serialises in memory first: torch's zip writer turns a failing file write (a full disk) into an
    opaque RuntimeError, whereas a plain write raises the OSError that says what went wrong."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, lambda handle: handle.write(buffer.getbuffer()))


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
