"""Faults, triggered for real: bad params and arguments, corrupt caches and checkpoints, kill -9 at random
moments, non-finite losses, unwritable and full output dirs, determinism. Each test checks the one-line
message (no traceback) and that no work was lost.

Runs use a small data root (the first 300/60/60 Multi-MNIST images, written through the real loader and
cache) so that a subprocess run takes seconds; with ``--subset 300`` it gives the same run as the full data.
"""
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from loaders import cache, multi_mnist
from loaders.mnist import CACHE_NAME, IDX_NAMES, data_root, load_mnist
import train_multi_task_counter_stream as train_script
from training import checkpoint
from run_files import TIMING, metrics_without_timing

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_multi_task_counter_stream.py"
PARAMS = {"exp_id": "faults", "method": "controlnet", "setting": "2digits", "lr": 0.003, "batch_size": 64,
          "lr_schedule": "none"}
SIZES = {"train": 300, "val": 60, "test": 60}
RUN = ["--epochs", 3, "--subset", 300, "--device", "cpu"]
DROP = object()


def write_params(path, **overrides):
    params = {key: value for key, value in {**PARAMS, **overrides}.items() if value is not DROP}
    path.write_text(json.dumps(params, indent=1))
    return path


def train(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], check=False, capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})


def start(*args, stall_writing=None):
    """The training script in a subprocess. ``stall_writing=(pattern, n)``: its atomic writes whose file name
    matches ``pattern`` (fnmatch) pass, but the one after the first ``n`` writes half its bytes to the temporary
    file and then hangs there, so a kill lands mid-write every time, whatever the machine's speed."""
    command = [sys.executable, str(SCRIPT)]
    if stall_writing is not None:
        command = [sys.executable, "-c", STALLING_WRITER, *map(str, stall_writing), str(SCRIPT)]
    return subprocess.Popen([*command, *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


STALLING_WRITER = """
import fnmatch, io, os, runpy, sys, time
from runtime import files
from training import checkpoint
pattern, passing, script = sys.argv[1], int(sys.argv[2]), sys.argv[3]
real_writer, seen = files.atomic_write_bytes, []

def stalling_writer(path, write):
    def half_then_hang(handle):
        buffer = io.BytesIO()
        write(buffer)
        handle.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
        handle.flush()
        time.sleep(600)
    if fnmatch.fnmatch(os.path.basename(path), pattern):
        seen.append(path)
        if len(seen) > passing:
            return real_writer(path, half_then_hang)
    return real_writer(path, write)

files.atomic_write_bytes = checkpoint.atomic_write_bytes = stalling_writer
sys.argv = sys.argv[3:]
runpy.run_path(script, run_name="__main__")
"""


def error_line(stderr):
    """The one error line of a failed run (progress bars aside); fails on a traceback or a multi-line error."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in re.split(r"[\r\n]", stderr) if line.strip() and "batch/s" not in line]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0] == lines[-1], stderr
    return errors[0]


def main(capsys, *args):
    """The script's ``main`` in this process: exit code and its one error line."""
    try:
        code = train_script.main([str(arg) for arg in args])
    except SystemExit as exit_:  # argparse
        code = exit_.code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return code, error_line(err)


def snapshot(directory):
    """The run dir's files, less the lock file (empty once its run has ended; run_lock)."""
    return {path.name: path.read_bytes() for path in sorted(Path(directory).iterdir()) if path.name != ".lock"}


def kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()


def kill_when(proc, condition, timeout=120):
    """SIGKILLs ``proc`` as soon as ``condition()`` holds; returns whether it was caught in that state."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if condition():
            kill(proc)
            return True
        time.sleep(0.001)
    kill(proc)
    return False


def temp_files(directory):
    try:
        return [name for name in os.listdir(directory) if name.endswith(".tmp")]
    except FileNotFoundError:
        return []


def partly_written(directory, prefix=""):
    """The temporary files in ``directory`` named ``prefix...`` that already hold some bytes."""
    def size(path):
        try:
            return path.stat().st_size
        except FileNotFoundError:  # renamed into place since the listing
            return 0
    return [Path(directory) / name for name in temp_files(directory)
            if name.startswith(prefix) and size(Path(directory) / name)]


def assert_same_run(out, reference):
    """Byte-identical metrics and the same final results as the uninterrupted reference run."""
    assert metrics_without_timing(out) == metrics_without_timing(reference)
    got, want = (json.loads((path / "results.json").read_text()) for path in (out, reference))
    for key in ("best_epoch", "val_acc_mean", "test_acc_mean", "test_acc_per_task", "test_acc_mean_last"):
        assert got[key] == want[key], key


@pytest.fixture(scope="module")
def raw_mnist():
    """Verified raw MNIST, cached in the default data root (which the copies below are taken from)."""
    return load_mnist()


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    """A data root whose 2digits caches hold only the images a ``--subset 300`` run uses."""
    root = tmp_path_factory.mktemp("small_data")
    full = {split: multi_mnist.make_multi_mnist("2digits", split) for split in multi_mnist.SPLITS}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(multi_mnist, "_generate", lambda kind, split, *_: {
            "images": full[split][0][:SIZES[split]].numpy(), "labels": full[split][1][:SIZES[split]].numpy()})
        for split in multi_mnist.SPLITS:
            multi_mnist.make_multi_mnist("2digits", split, root=root)
    return root


@pytest.fixture(scope="module")
def reference(small_root, tmp_path_factory):
    """The uninterrupted run (seed 0) that every fault-and-recovery run must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    out = tmp / "run"
    proc = train("--param_file", write_params(tmp / "params.json"), *RUN, "--out", out, "--data_root", small_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# --- 1. params and arguments: one line, exit 2, before any data or output is touched -------------------------

BAD_PARAM_FILES = [
    ("unknown_key", {"lrr": 0.01}, ["unknown key 'lrr'", "did you mean 'lr'?"]),
    ("wrong_type", {"batch_size": "64"}, ["key 'batch_size' must be int, got \"64\"", "allowed: int from 1 to"]),
    ("bool_for_int", {"epochs": True}, ["key 'epochs' must be int, got true"]),
    ("out_of_range", {"lr": 100.0}, ["key 'lr' = 100.0 is out of range", "allowed: 1e-08 to 10.0"]),
    ("nan", {"lr": float("nan")}, ["key 'lr' = nan is out of range"]),
    ("unknown_method", {"method": "controlnett"}, ["key 'method'", "did you mean 'controlnet'?", "allowed: "]),
    ("unknown_dataset", {"dataset": "cifar10"},
     ["key 'dataset' has unknown value \"cifar10\"", "allowed: multi_mnist"]),
    ("unknown_model", {"model": "resnet"}, ["key 'model' has unknown value \"resnet\"", "allowed: controlnet"]),
    ("unknown_setting", {"setting": "3digits"}, ["key 'setting'", "allowed: 2digits, 4digits"]),
    ("missing_key", {"setting": DROP}, ["missing key 'setting'", "allowed: 2digits"]),
    ("weighting_on_single_branch", {"weighting": "gradnorm"},
     ["key 'weighting': 'gradnorm' weights the losses of several branches", "allowed: null"]),
    ("weighting_without_trunk", {"method": "gradnorm", "model": "single_task"},
     ["key 'weighting': 'gradnorm' needs a shared trunk", "allowed models: multi_branch"]),
    ("options_without_weighting", {"weighting_options": {"alpha": 1.0}},
     ["key 'weighting_options' is set but method 'controlnet' uses no loss weighting"]),
    ("unknown_model_option", {"model_options": {"width": 3}}, ["unknown key 'model_options.width'", "allowed: c1"]),
    ("model_option_type", {"model_options": {"c1": "wide"}}, ["key 'model_options.c1' must be int, got \"wide\""]),
    ("model_option_value", {"model_options": {"c1": -1}}, ["key 'model_options'", "negative dimension"]),
    ("weighting_option_type", {"method": "gradnorm", "weighting_options": {"alpha": "x"}},
     ["key 'weighting_options.alpha' must be float, got \"x\""]),
]
BAD_PARAM_TEXTS = [
    ("malformed_json", '{\n  "exp_id": "x",\n  "method": "controlnet"\n  "setting": "2digits"\n}',
     ["malformed JSON at line 4, column 3: Expecting ',' delimiter"]),
    ("trailing_comma", '{"exp_id": "x", "method": "controlnet", "setting": "2digits",}',
     ["malformed JSON at line 1, column 62"]),
    ("empty", "", ["param file is empty", "exp_id, method, setting"]),
    ("blank", " \n\t\n", ["param file is empty"]),
    ("not_an_object", "[1, 2]", ["expected a JSON object at the top level, got list"]),
    ("utf16", json.dumps(PARAMS).encode("utf-16"), ["not UTF-8 text (byte 0)"]),
    ("missing_file", None, ["param file not found"]),
]


@pytest.mark.parametrize("name,overrides,expected", BAD_PARAM_FILES, ids=[case[0] for case in BAD_PARAM_FILES])
def test_bad_param_value_is_one_line_naming_file_key_and_allowed(name, overrides, expected, reference, tmp_path,
                                                                 capsys):
    path = write_params(tmp_path / f"{name}.json", **overrides)
    before = snapshot(reference)
    code, line = main(capsys, "--param_file", path, *RUN, "--out", reference, "--resume",
                      "--data_root", tmp_path / "data")
    assert code == 2 and line.startswith(f"error: {path}: ")
    for fragment in expected:
        assert fragment in line, line
    assert snapshot(reference) == before  # the run it was pointed at is untouched
    assert not (tmp_path / "data").exists()  # no data touched


@pytest.mark.parametrize("name,text,expected", BAD_PARAM_TEXTS, ids=[case[0] for case in BAD_PARAM_TEXTS])
def test_bad_param_file_is_one_line_naming_the_file(name, text, expected, tmp_path, capsys):
    path = tmp_path / f"{name}.json"
    if isinstance(text, str):
        path.write_text(text)
    elif text is not None:
        path.write_bytes(text)
    code, line = main(capsys, "--param_file", path, *RUN, "--out", tmp_path / "out", "--data_root", tmp_path / "data")
    assert code == 2 and line.startswith(f"error: {path}: ")
    for fragment in expected:
        assert fragment in line, line
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


BAD_ARGUMENTS = [
    (["--device", "tpu"], "--device: unknown device 'tpu'; allowed: auto, cpu, cuda, cuda:N"),
    pytest.param(["--device", "cuda:0"], "--device: cuda:0 requested but CUDA is not available here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")),
    (["--epochs", "0"], "argument --epochs: expected an integer >= 1, got 0"),
    (["--epochs", "1.5"], "argument --epochs: expected an integer >= 1, got '1.5'"),
    (["--seed", "-1"], "argument --seed: expected an integer >= 0, got -1"),
    (["--subset", "abc"], "argument --subset: expected an integer >= 1, got 'abc'"),
    (["--lr", "0.1"], "unrecognized arguments: --lr 0.1"),
]


@pytest.mark.parametrize("args,expected", BAD_ARGUMENTS)
def test_bad_command_line_argument_is_one_line_exit_2(args, expected, tmp_path, capsys):
    params = write_params(tmp_path / "params.json")
    code, line = main(capsys, "--param_file", params, "--out", tmp_path / "out", "--data_root", tmp_path / "data",
                      *args)
    assert code == 2 and expected in line, line
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


def test_missing_param_file_argument(capsys):
    code, line = main(capsys, "--epochs", 1)
    assert code == 2 and "the following arguments are required: --param_file" in line


def test_a_param_error_reaches_the_shell_as_one_line_and_exit_code_2(tmp_path):
    """The real process (the in-process tests above check every message)."""
    params = tmp_path / "params.json"
    params.write_text('{"exp_id": "x",, }')
    proc = train("--param_file", params, "--out", tmp_path / "out")
    assert proc.returncode == 2 and proc.stdout == "" and len(proc.stderr.splitlines()) == 1
    assert error_line(proc.stderr) == f"error: {params}: malformed JSON at line 1, column 16: Expecting property " \
                                      f"name enclosed in double quotes"


# --- 2. data integrity --------------------------------------------------------------------------------------

def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(size).to_bytes(4, "big") for size in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_corrupt_caches_are_reported_and_rebuilt_not_trained_on(raw_mnist, small_root, reference, tmp_path):
    root, mnist = tmp_path / "data", raw_mnist
    shutil.copytree(small_root / "multi_mnist", root / "multi_mnist")
    (root / "mnist").mkdir()
    for key, stem in IDX_NAMES.items():  # the source the raw cache is rebuilt from
        write_idx(root / "mnist" / stem, mnist[key])
    raw = root / "mnist" / CACHE_NAME
    shutil.copy(data_root() / "mnist" / CACHE_NAME, raw)
    shutil.copy(cache.sidecar_path(data_root() / "mnist" / CACHE_NAME), cache.sidecar_path(raw))
    entries = {split: next((root / "multi_mnist").glob(f"2digits_{split}_*.npz")) for split in multi_mnist.SPLITS}
    for path in (raw, entries["train"]):  # truncated, as by a full disk or a kill
        os.truncate(path, path.stat().st_size // 2)
    with open(entries["val"], "r+b") as handle:  # one flipped byte inside the image data
        handle.seek(entries["val"].stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    cache.sidecar_path(entries["test"]).unlink()

    out = tmp_path / "run"
    proc = train("--param_file", write_params(tmp_path / "params.json"), *RUN, "--out", out, "--data_root", root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"cache: {entries['train']} is corrupt (size " in proc.stderr
    assert f"cache: {entries['val']} is corrupt (sha256 " in proc.stderr
    assert f"cache: {entries['test']} is corrupt (sidecar missing); rebuilding" in proc.stderr
    assert f"cache: {raw} is corrupt (size " in proc.stderr and "mnist: read from IDX files" in proc.stderr
    assert_same_run(out, reference)  # trained on the rebuilt, correct data
    rebuilt = cache.load_arrays(raw)
    assert all(np.array_equal(rebuilt[key], mnist[key]) for key in mnist)
    assert all(cache.load_arrays(path) is not None for path in entries.values())
    assert not temp_files(root / "mnist") and not temp_files(root / "multi_mnist")


# --- 3. kills and checkpoints -------------------------------------------------------------------------------

def test_kill_9_while_generating_a_cache_leaves_no_partial_entry(raw_mnist, tmp_path):
    root = tmp_path / "data"
    (root / "mnist").mkdir(parents=True)
    for path in (data_root() / "mnist" / CACHE_NAME, cache.sidecar_path(data_root() / "mnist" / CACHE_NAME)):
        shutil.copy(path, root / "mnist")
    proc = start("--param_file", write_params(tmp_path / "params.json"), *RUN, "--out", tmp_path / "run",
                 "--data_root", root, stall_writing=("*.npz", 0))
    assert kill_when(proc, lambda: partly_written(root / "multi_mnist")), "never saw a cache being written"
    for entry in (root / "multi_mnist").glob("*.npz"):  # a sidecar is written only for a complete entry
        assert not cache.sidecar_path(entry).exists() or cache.load_arrays(entry) is not None


def test_kill_9_at_random_moments_incl_a_checkpoint_write(small_root, reference, tmp_path):
    """Killed halfway through writing its second checkpoint, then twice at random moments; each resume continues,
    and the end result is the uninterrupted run's, byte for byte."""
    out = tmp_path / "run"
    common = ["--param_file", write_params(tmp_path / "params.json"), *RUN, "--out", out, "--data_root", small_root]

    def writing_second_checkpoint():
        return (out / "checkpoint.pt").exists() and partly_written(out, "checkpoint.pt.")
    proc = start(*common, stall_writing=("checkpoint.pt", 1))
    assert kill_when(proc, writing_second_checkpoint), "never saw a checkpoint being written"
    partial = partly_written(out, "checkpoint.pt.")
    assert len(partial) == 1 and partial[0].stat().st_size < (out / "checkpoint.pt").stat().st_size
    saved = checkpoint.load(out / "checkpoint.pt")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert saved["epoch"] >= 1 and saved["history"][:len(lines)] == lines

    rng = random.Random(0)
    for _ in range(2):  # at a random moment of training, evaluation or writing
        proc = start(*common, "--resume")
        proc.stdout.readline()  # "resumed from ...", once the checkpoint is loaded
        time.sleep(rng.uniform(0.0, 1.5))
        kill(proc)
        assert checkpoint.load(out / "checkpoint.pt")["epoch"] >= saved["epoch"]

    proc = train(*common, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(out, reference)
    assert not temp_files(out)


def test_malicious_checkpoint_is_refused_without_running_its_code(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")  # creates a file when unpickled

    out = tmp_path / "run"
    out.mkdir()
    torch.save({"model": Payload(), "epoch": 1}, out / "checkpoint.pt")
    before = snapshot(out)
    code, line = main(capsys, "--param_file", write_params(tmp_path / "params.json"), *RUN, "--out", out, "--resume",
                      "--data_root", tmp_path / "data")
    assert code == 2 and line == (f"error: cannot resume: {out / 'checkpoint.pt'} was refused: loading it would "
                                  f"call io.open, not just read weights; only load checkpoints from a trusted source; "
                                  f"to start the run again, keeping its files in a dated subfolder, drop --resume and "
                                  f"pass --overwrite")
    assert not marker.exists()
    assert snapshot(out) == before and not (tmp_path / "data").exists()
    torch.load(out / "checkpoint.pt", weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()


def truncated(path):
    path.write_bytes(path.read_bytes()[:1000])


def garbage(path):
    path.write_bytes(b"not a checkpoint" * 8)


def empty(path):
    path.write_bytes(b"")


def best_model(path):
    shutil.copy(path.parent / "best_model.pt", path)


@pytest.mark.parametrize("damage,expected", [
    (truncated, "is corrupt or truncated (RuntimeError: PytorchStreamReader failed reading zip archive"),
    (garbage, "is corrupt or truncated (UnpicklingError: Unsupported operand"),
    (empty, "is corrupt or truncated (EOFError"),
    (best_model, ("is not a checkpoint of this script (it lacks best, epochs, history, optimizer, seed, "
                 "wall_time_s, weighting)")),
])
def test_damaged_checkpoint_is_reported_and_left_in_place(damage, expected, reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    damage(out / "checkpoint.pt")
    before = snapshot(out)
    code, line = main(capsys, "--param_file", write_params(tmp_path / "params.json"), *RUN, "--out", out, "--resume",
                      "--data_root", tmp_path / "data")
    assert code == 2 and line.startswith(f"error: cannot resume: {out / 'checkpoint.pt'}") and expected in line, line
    assert snapshot(out) == before and not (tmp_path / "data").exists()


@pytest.mark.parametrize("change,expected", [
    ({"params": {"lr": 0.01}}, "other settings (lr); pass --force"),
    ({"args": ["--set", "lr=0.01"]}, "other settings (lr); pass --force"),
    ({"args": ["--seed", "1"]}, "other settings (--seed (0 -> 1)); pass --force"),
    ({"params": {"lr_schedule": "halve_30_60_90"}, "args": ["--epochs", "4"]},
     "other settings (lr_schedule, --epochs (3 -> 4, which changes the lr schedule)); pass --force"),
    ({"args": ["--subset", "200"]}, "other settings (--subset (300 -> 200, which changes the data)); pass --force"),
])
def test_resume_with_other_settings_is_refused(change, expected, reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    params = write_params(tmp_path / "params.json", **change.get("params", {}))
    run = [arg for arg in RUN if arg not in ("--subset", 300)] if "--subset" in change.get("args", []) else RUN
    code, line = main(capsys, "--param_file", params, *run, *change.get("args", []), "--out", out, "--resume",
                      "--data_root", tmp_path / "data")
    assert code == 2 and f"--resume: {out / 'checkpoint.pt'} was made with {expected}" in line, line
    assert snapshot(out) == snapshot(reference) and not (tmp_path / "data").exists()


def test_forced_resume_into_another_model_is_refused_clearly(reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "results.json").unlink()  # a run to resume (a finished one is left as it is)
    before = snapshot(out)
    params = write_params(tmp_path / "params.json", method="uniform_scaling")
    code, line = main(capsys, "--param_file", params, *RUN, "--out", out, "--resume", "--force",
                      "--data_root", tmp_path / "data")
    assert code == 2 and "does not fit model 'multi_branch' / weighting 'uniform'" in line, line
    log = (out / "train.log").read_bytes()
    assert log.startswith(before.pop("train.log")) and log.decode().splitlines()[-1].endswith(line)  # recorded too
    assert {name: data for name, data in snapshot(out).items() if name != "train.log"} == before


# --- 4. numerical faults ------------------------------------------------------------------------------------

def assert_stopped_at_nonfinite(proc, out, method):
    """Exit 2 (settings whose loss diverges), the one-line message; checkpoint.pt is the last good epoch, as saved
    then; no results.json. The run must diverge in epoch 2, so that there is a last good epoch to keep."""
    line = error_line(proc.stderr)
    assert proc.returncode == 2
    match = re.search(rf"non-finite loss at epoch (\d+), step \d+, method '{method}' \((.+)\); stopped without "
                      rf"saving this epoch; the last good checkpoint \(epoch (\d+)\) is {re.escape(str(out))}", line)
    assert match and match[1] == "2" and match[3] == "1", line
    assert not (out / "results.json").exists()
    saved = checkpoint.load(out / "checkpoint.pt")
    assert saved["epoch"] == 1 and all(torch.isfinite(value).all() for value in saved["model"].values())
    assert json.dumps(saved["history"]) == json.dumps([json.loads(line) for line in  # NaN losses: compare as text
                                                       (out / "metrics.jsonl").read_text().splitlines()])
    best = checkpoint.load(out / "best_model.pt")  # written at epoch 1, with the same model
    assert best["epoch"] == 1 and all(torch.equal(best["model"][key], saved["model"][key]) for key in best["model"])
    return match[2]


def test_nan_loss_stops_the_run_and_keeps_the_last_good_epoch(small_root, tmp_path, capsys):
    """SGD with lr 10 (the schema's maximum) and momentum 0.9 really diverges to inf/NaN in epoch 2. Going
    back to Adam is refused as a changed setting, then continues from epoch 1 with --force."""
    out = tmp_path / "run"
    common = [*RUN, "--out", out, "--data_root", small_root]
    proc = train("--param_file", write_params(tmp_path / "absurd.json", optimizer="SGD", lr=10.0), *common)
    assert assert_stopped_at_nonfinite(proc, out, "controlnet") == "tasks drawn in that batch [0, 1]"

    fixed = write_params(tmp_path / "fixed.json")
    before = snapshot(out)
    code, line = main(capsys, "--param_file", fixed, *common, "--resume")
    assert code == 2 and "was made with other settings (lr, optimizer); pass --force" in line
    assert snapshot(out) == before
    assert train_script.main([str(arg) for arg in ["--param_file", fixed, *common, "--resume", "--force"]]) == 0
    assert "optimizer changed to Adam: its state starts afresh" in capsys.readouterr().out
    lines = (out / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    assert len(lines) == 3 and lines[0] == before["metrics.jsonl"]  # epoch 1 kept, 2 and 3 redone
    assert json.loads((out / "results.json").read_text())["epochs"] == 3


def test_nan_loss_of_a_multi_branch_model_names_the_tasks(small_root, tmp_path):
    out = tmp_path / "run"
    params = write_params(tmp_path / "absurd.json", method="uniform_scaling", optimizer="SGD", lr=10.0, momentum=0.99)
    proc = train("--param_file", params, *RUN, "--out", out, "--data_root", small_root)
    where = assert_stopped_at_nonfinite(proc, out, "uniform_scaling")
    assert re.fullmatch(r"non-finite loss of tasks \[[01](, 1)?\], task losses \[.+\]", where), where


# --- 5. output faults ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("where,reason", [
    ("file", "Not a directory"),
    pytest.param("proc", "No such file or directory", marks=pytest.mark.skipif(not Path("/proc/self").is_dir(),
                                                                                reason="no /proc")),
])
def test_unwritable_output_dir_is_reported_at_start(where, reason, tmp_path, capsys):
    """Both fail for root too: a path below a regular file, and a new directory in /proc."""
    (tmp_path / "file").write_text("a regular file")
    out = tmp_path / "file" / "run" if where == "file" else Path("/proc") / f"mtl-test-{os.getpid()}" / "run"
    code, line = main(capsys, "--param_file", write_params(tmp_path / "params.json"), *RUN, "--out", out,
                      "--data_root", tmp_path / "data")
    assert code == 2 and line == f"error: output dir {out} is not writable: {reason}; choose another with --out"
    assert not (tmp_path / "data").exists()


def test_unusable_data_root_is_reported(tmp_path, capsys):
    (tmp_path / "file").write_text("a regular file")
    code, line = main(capsys, "--param_file", write_params(tmp_path / "params.json"), *RUN,
                      "--out", tmp_path / "run", "--data_root", tmp_path / "file" / "data")
    assert code == 2 and "cannot read or write the data cache: [Errno 20] Not a directory" in line
    assert "--data_root" in line and not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.fixture
def tiny_disk(tmp_path):
    """A real tmpfs mount (needs root), unmounted afterwards; ``resize(bytes)`` remounts it."""
    disk = tmp_path / "disk"
    disk.mkdir()

    def mount(size, *options):
        return subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([*options, f"size={size}"]), "tmpfs",
                               str(disk)], check=False, capture_output=True, text=True)
    if os.geteuid() != 0 or mount(1 << 20).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); full disk not simulated")
    yield disk, lambda size: mount(size, "remount")
    subprocess.run(["umount", str(disk)], check=True)


def test_full_disk_at_a_checkpoint_write_keeps_the_previous_one(tiny_disk, small_root, reference, tmp_path):
    """Room for the epoch-1 files but not for the temporary copy of checkpoint.pt at epoch 2: ENOSPC for real.
    Once there is room again, --resume finishes the run as if nothing had happened."""
    disk, resize = tiny_disk
    size = (reference / "best_model.pt").stat().st_size + (reference / "checkpoint.pt").stat().st_size * 3 // 2
    assert resize(size).returncode == 0
    out = disk / "run"
    common = ["--param_file", write_params(tmp_path / "params.json"), *RUN, "--out", out, "--data_root", small_root]
    proc = train(*common)
    assert proc.returncode == 2
    assert error_line(proc.stderr) == (f"error: cannot write {out / 'checkpoint.pt'}: {os.strerror(errno.ENOSPC)}; "
                                       f"the previous version of that file is intact")
    saved = checkpoint.load(out / "checkpoint.pt")
    first = metrics_without_timing(reference)[0]
    assert saved["epoch"] == 1 and [{k: v for k, v in saved["history"][0].items() if k not in TIMING}] == [first]
    assert not temp_files(out) and not (out / "results.json").exists()

    assert resize(16 << 20).returncode == 0
    proc = train(*common, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(out, reference)


# --- 6. determinism -----------------------------------------------------------------------------------------

def test_same_seed_is_bit_identical_and_another_seed_differs(small_root, reference, tmp_path):
    params = write_params(tmp_path / "params.json")
    for seed in (0, 1):
        proc = train("--param_file", params, *RUN, "--seed", seed, "--out", tmp_path / f"seed{seed}",
                     "--data_root", small_root)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert metrics_without_timing(tmp_path / "seed0") == metrics_without_timing(reference)
    same, other = (checkpoint.load(tmp_path / f"seed{seed}" / "checkpoint.pt")["model"] for seed in (0, 1))
    want = checkpoint.load(reference / "checkpoint.pt")["model"]
    assert all(torch.equal(same[key], want[key]) for key in want)
    assert metrics_without_timing(tmp_path / "seed1") != metrics_without_timing(reference)
    assert not all(torch.equal(other[key], want[key]) for key in want)
