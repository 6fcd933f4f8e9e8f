"""Writing files so that a kill or a full disk at any moment leaves the previous version intact, and the
repository's root folder (the default home of ``runs/`` and ``data/``)."""
import json
import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


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


def write_text(text, path):
    atomic_write_bytes(path, lambda handle: handle.write(text.encode()))


def write_json(obj, path):
    write_text(json.dumps(obj, indent=2) + "\n", path)
