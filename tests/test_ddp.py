"""DDP through torchrun: two CPU processes (gloo, localhost) train the same model as one process on the same global
batches, resume exactly, and stop together on a bad setting.

Each run trains on the first 256 images for 2 epochs (8 global batches of 64, 32 per rank), on the by-reference
tasks, whose valid labels (and, for ``controlnet_loc``, the localisation loss's targets) differ between the ranks'
halves of a batch. The weights must match the single-process run to 1e-5. The optimiser is SGD: the ranks' gradients
equal the single-process ones up to float rounding (~1e-8), which Adam's division by the running gradient RMS can
enlarge beyond 1e-5 within a few steps on parameters whose gradient nearly vanishes, while SGD keeps it near 1e-6.
The distributed runs start at once, and the single-process runs are made in this process meanwhile, to overlap the
processes' start-up.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed

import train_multi_task_counter_stream as train_script
from training import checkpoint
from run_files import metrics_without_timing

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_multi_task_counter_stream.py"
PARAMS = {"setting": "9digits_byref", "optimizer": "SGD", "lr": 0.05, "momentum": 0.9, "batch_size": 64,
          "lr_schedule": "none"}
RUN = ["--subset", 256, "--device", "cpu"]
METHODS = {"controlnet": {}, "uniform_scaling": {}, "mgda": {"weighting_options": {"normalization": "loss+"}},
           "gradnorm": {}, "controlnet_loc": {"method": "controlnet", "spatial_loss_weight": 1.0},
           # the weightings beyond the paper (docs/weightings.md), every one synchronised
           **{name: {} for name in ("dwa", "rlw", "pcgrad", "cagrad", "imtl", "nash_mtl", "aligned_mtl", "famo")}}
# FAMO's logits take Adam steps on gradients that nearly vanish, whose normalisation enlarges the float32 rounding of
# the global losses (averaged over the ranks vs. summed in one process) to ~2e-5 after 8 steps (see the docstring)
LOOSER = {("famo", "weighting.logits"): 1e-4}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="this torch build has no torch.distributed with the gloo backend")


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def write_params(path, method):
    path.write_text(json.dumps({"exp_id": method, "method": method, **PARAMS, **METHODS[method]}))
    return path


def start(out, params, *args, port):
    """The training script in two processes under torchrun."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    command = [*torchrun, str(SCRIPT), "--param_file", str(params), *map(str, RUN), "--out", str(out), *map(str, args)]
    return subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc):
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]


def read_metrics(out):
    return metrics_without_timing(out)


def weights(out):
    saved = checkpoint.load(out / "checkpoint.pt")
    return {**saved["model"], **{f"weighting.{key}": value for key, value in saved["weighting"].items()}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Output dirs: ``ddp/<method>`` (2 processes) and ``single/<method>`` (this process), 2 epochs; ``resumed``
    (controlnet, 2 processes, 1 epoch, then resumed to 2)."""
    tmp = tmp_path_factory.mktemp("ddp")
    params = {method: write_params(tmp / f"{method}.json", method) for method in METHODS}
    ports = iter(free_ports(len(METHODS) + 2))
    first = start(tmp / "resumed", params["controlnet"], "--epochs", 1, port=next(ports))
    procs = [start(tmp / "ddp" / method, params[method], "--epochs", 2, port=next(ports)) for method in METHODS]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun processes (OMP_NUM_THREADS=1): more threads only compete with them
    try:
        for method in METHODS:
            args = ["--param_file", params[method], *RUN, "--epochs", 2, "--out", tmp / "single" / method]
            assert train_script.main([str(arg) for arg in args]) == 0
    finally:
        torch.set_num_threads(threads)
    finish(first)
    procs.append(start(tmp / "resumed", params["controlnet"], "--epochs", 2, "--resume", "--force", port=next(ports)))
    for proc in procs:
        finish(proc)
    return tmp


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_train_the_single_process_model(runs, method):
    single, ddp = weights(runs / "single" / method), weights(runs / "ddp" / method)
    assert single.keys() == ddp.keys()
    for key in single:
        tolerance = LOOSER.get((method, key), 1e-5)
        torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=tolerance,
                                   msg=lambda text, key=key: f"{key}: {text}")
    results = json.loads((runs / "ddp" / method / "results.json").read_text())
    assert results["world_size"] == 2 and results["epochs"] == 2
    history, expected = read_metrics(runs / "ddp" / method), read_metrics(runs / "single" / method)
    assert [record["epoch"] for record in history] == [1, 2]
    for got, want in zip(history, expected):  # the global batch's loss; every val/test image counted once
        assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-5)
        assert got["val_acc_per_task"] == pytest.approx(want["val_acc_per_task"], nan_ok=True)


def test_resumed_distributed_run_ends_as_the_uninterrupted_one(runs):
    straight = runs / "ddp" / "controlnet"
    resumed, expected = weights(runs / "resumed"), weights(straight)
    assert all(torch.equal(resumed[key], expected[key]) for key in expected)
    assert metrics_without_timing(runs / "resumed") == metrics_without_timing(straight)


@pytest.mark.parametrize("case", ["bad_param", "out_in_use"])
def test_a_bad_setting_stops_every_rank_with_exit_2(case, tmp_path):
    """A bad param file (found before the process group is joined) and an output dir in use (found by rank 0 alone,
    after). The two ranks are started as torchrun starts them, to see each one's exit code and stderr."""
    params = write_params(tmp_path / "params.json", "controlnet")
    if case == "bad_param":
        params.write_text(json.dumps({**json.loads(params.read_text()), "lr": 100.0}))
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"a run")
    port, = free_ports(1)
    command = [sys.executable, str(SCRIPT), "--param_file", str(params), *map(str, RUN), "--out", str(out)]
    ranks = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**ENV, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for rank in range(2)]
    expected = "key 'lr' = 100.0 is out of range" if case == "bad_param" else "already holds a run (checkpoint.pt)"
    for proc in ranks:
        _, err = proc.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert sorted(path.name for path in out.iterdir() if path.name != ".lock") == ["checkpoint.pt"]
