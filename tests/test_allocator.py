"""runtime/allocator.py: glibc's malloc keeps large blocks in the heap after ``tune_malloc``, stands back when the user
tunes malloc, and changes no number of a training run."""
import json
import os
import subprocess
import sys

import pytest

from runtime import allocator
from runtime.files import REPO
from run_files import metrics_without_timing

pytestmark = pytest.mark.skipif(allocator.glibc() is None, reason="glibc only")

# In a fresh process: tune (or not), then malloc 8 MiB and print whether it was mmapped (glibc's mallinfo2 hblks).
PROBE = """
import ctypes, sys
sys.path.insert(0, sys.argv[1])
from runtime import allocator
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype, libc.malloc.restype, libc.malloc.argtypes = MallInfo2, ctypes.c_void_p, (ctypes.c_size_t,)
if sys.argv[2] == "tune":
    applied = allocator.tune_malloc()
elif sys.argv[2] == "script":  # the training script's start-up, up to its parameter counts (no data, no training)
    import train_multi_task_counter_stream as script
    applied = script.main(["--param_file", sys.argv[3], "--dry_run"])
else:
    applied = None
before = libc.mallinfo2().hblks
block = libc.malloc(8 * 2**20)
print(applied, libc.mallinfo2().hblks - before)
"""


def probe(mode, tunables=None, *more):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    out = subprocess.run([sys.executable, "-c", PROBE, str(REPO), mode, *more], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    return out[-2], int(out[-1])


def test_after_tuning_an_8_mib_block_comes_from_the_heap():
    assert probe("plain") == ("None", 1)  # glibc's default: mmapped (threshold 128 KiB)
    assert probe("tune") == ("True", 0)   # every mallopt accepted, and the block is in the heap


def test_the_training_script_tunes_malloc_at_start_up():
    assert probe("script", None, str(REPO / "params" / "mmnist_counter_9tasks_params.json")) == ("0", 0)


def test_a_users_malloc_tunable_is_kept():
    assert probe("tune", "glibc.malloc.perturb=0") == ("False", 1)  # nothing changed: glibc's default stands
    assert probe("tune", "glibc.cpu.x86_non_temporal_threshold=0x100000") == ("True", 0)  # not a malloc tunable


def test_training_is_bit_identical_with_and_without_the_setting(tmp_path):
    """The script tunes malloc at start-up; with glibc's default malloc (a malloc tunable set) every loss and
    accuracy of a short ControlNet run is the same."""
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"exp_id": "t", "method": "controlnet", "setting": "4digits", "batch_size": 128}))
    for name, tunables in (("tuned", None), ("default", "glibc.malloc.perturb=0")):
        env = {**{k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}, "OMP_NUM_THREADS": "1"}
        if tunables:
            env["GLIBC_TUNABLES"] = tunables
        proc = subprocess.run([sys.executable, str(REPO / "train_multi_task_counter_stream.py"), "--param_file",
                               str(params), "--epochs", "1", "--subset", "1000", "--device", "cpu", "--out",
                               str(tmp_path / name)], capture_output=True, text=True, env=env, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-2000:]
    tuned, default = metrics_without_timing(tmp_path / "tuned"), metrics_without_timing(tmp_path / "default")
    assert len(tuned) == 1 and tuned == default
