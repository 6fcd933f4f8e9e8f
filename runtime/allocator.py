"""glibc's malloc set up for training: large activation buffers kept in the heap and reused, not handed back to the
kernel after every step.

With glibc's defaults a freed block of more than the mmap threshold (128 KiB, rising to at most 32 MiB as blocks
are freed) is unmapped at once, and free memory at the top of the heap above the trim threshold is returned to the
kernel; the next step maps the same buffers again and faults in every page (tens of thousands of page faults per
training step here). ``tune_malloc`` sets, through ``mallopt`` (glibc's ``malloc.h``):

- ``M_MMAP_THRESHOLD`` 32 MiB (glibc's largest): blocks up to 32 MiB come from the heap;
- ``M_TRIM_THRESHOLD`` 2 GiB - 1 (``mallopt`` takes an int): the heap is not trimmed after a step;
- ``M_TOP_PAD`` 256 MiB: the heap grows in large steps.

That is ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=17179869184:
glibc.malloc.top_pad=268435456``, except for the trim threshold (2 GiB - 1 instead of 16 GiB: either is far above
what one step frees). It changes where memory comes from, never a computed number. It does nothing on a C library
other than glibc, and nothing when ``GLIBC_TUNABLES`` names a ``glibc.malloc.`` tunable: the user's setting is kept
(``GLIBC_TUNABLES=glibc.malloc.perturb=0``, glibc's default value, runs with glibc's default malloc).
"""
import ctypes
import os

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {M_MMAP_THRESHOLD: 32 * 2**20, M_TRIM_THRESHOLD: 2**31 - 1, M_TOP_PAD: 256 * 2**20}


def user_tuned():
    """Whether the environment already tunes glibc's malloc (a ``glibc.malloc.`` entry in ``GLIBC_TUNABLES``)."""
    return "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")


def glibc():
    """This process's C library if it is glibc, else None."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        return ctypes.CDLL("libc.so.6")
    except (AttributeError, ValueError, OSError):  # no confstr / no such name (not glibc) / no libc.so.6
        return None


def tune_malloc():
    """Applies ``SETTINGS`` with ``mallopt``; True if every one was accepted, False where nothing was changed (not
    glibc, or the user's ``GLIBC_TUNABLES``). Call it once, at the start of a training process."""
    if user_tuned():
        return False
    libc = glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all([libc.mallopt(param, value) == 1 for param, value in SETTINGS.items()])
