"""One run per output dir at a time: an exclusive ``fcntl`` lock on ``<out>/.lock``, held until the process ends.

The lock file also says who holds it (pid, host, start time, command). The kernel drops the lock when its process
dies, however it dies, so a lock left by a killed run is never an obstacle: it is found stale (the file still names
its holder but nobody holds the lock), reported and taken over. A run that ends, however it ends short of being
killed (done, refused, failed), removes the file: a stale record always means a run that died.
"""
import fcntl
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

LOCK_NAME = ".lock"
_held = {}  # out dir -> open lock file: kept open (and so locked) until release() or the end of the process


class RunDirBusy(RuntimeError):
    """Another live process holds the run dir's lock."""


def acquire(out, command):
    """Locks ``out`` for this process; returns the holder record of a stale lock it took over (else None).
    RunDirBusy (one line naming the holder) if a live process holds it."""
    out = Path(out)
    handle = _lock(out / LOCK_NAME)
    stale = _read(handle)
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             "command": command}) + "\n")
    handle.flush()
    _held[out.resolve()] = handle
    return stale


def _lock(path):
    """The open, exclusively locked lock file at ``path``. A file that a releasing run removed between our open and
    our lock is not the lock any more: opened again."""
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(handle)
            handle.close()
            raise RunDirBusy(f"{path.parent} is in use by another run ({describe(holder)}); wait for it to end or "
                             f"choose another --out") from None
        try:
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                return handle
        except FileNotFoundError:
            pass
        handle.close()


def release(out):
    """Removes the lock file, then unlocks: a run that ended leaves no lock behind (and no stale record)."""
    handle = _held.pop(Path(out).resolve(), None)
    if handle is not None:
        try:
            (Path(out) / LOCK_NAME).unlink()
        except FileNotFoundError:
            pass
        handle.close()


def holder(out):
    """The holder record of ``out``'s lock while a live process holds it (``{}`` if it wrote none), else None. Only
    looks: the lock is taken for an instant and given back with its record left as it was."""
    try:
        handle = open(Path(out) / LOCK_NAME, "r")
    except OSError:  # no lock file (or no folder): nobody holds it
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(handle) or {}
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def describe(holder):
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}: {holder.get('command')}"


def _read(handle):
    handle.seek(0)
    text = handle.read().strip()
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return {"command": text[:200]}
