"""Adding a task (experiments/table4_add_task.py, paper Table 4): only the new task's embedding column moves, the existing tasks'
predictions stay bitwise the same, and the new task learns."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments import table4_add_task
from models import build_model
from training import checkpoint
from training.evaluate import all_task_logits
from training.optim import make_optimizer

REPO = Path(__file__).resolve().parents[1]
PARAMS = {"optimizer": "Adam", "lr": 0.05, "momentum": 0.9}


pytestmark = pytest.mark.usefixtures("one_thread")


OPTIMIZERS = {
    "script": lambda model: make_optimizer(PARAMS, [model.emb.new_weight]),  # what experiments/table4_add_task.py uses
    # a careless optimiser over every parameter, with weight decay: frozen weights get no gradient, so it
    # skips them, and the trained columns are buffers
    "adamw_all": lambda model: torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.5),
}


def trained_and_extended(optimizer="script"):
    """A 9-task ControlNet (random weights stand in for phase 1), and a copy extended by task 9 whose new column
    took 20 optimiser steps at a large lr, on random images and labels."""
    torch.manual_seed(0)
    phase1 = build_model("controlnet", 9)
    extended = table4_add_task.add_task(copy.deepcopy(phase1), seed=0)
    optimizer = OPTIMIZERS[optimizer](extended)
    images, labels = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    for _ in range(20):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(extended(images, torch.full((64,), 9)), labels)
        loss.backward()
        optimizer.step()
    return phase1, extended


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_only_the_new_column_is_trainable_and_moves(optimizer):
    phase1, extended = trained_and_extended(optimizer)
    assert [name for name, p in extended.named_parameters() if p.requires_grad] == ["emb.new_weight"]
    before, after = phase1.state_dict(), table4_add_task.plain_state_dict(extended)
    assert set(before) == set(after)
    for key in before:
        if key != "emb.weight":
            assert torch.equal(before[key], after[key]), key
    assert after["emb.weight"].shape == (320, 10)
    assert torch.equal(after["emb.weight"][:, :9], before["emb.weight"])
    assert not torch.equal(after["emb.weight"][:, 9], table4_add_task.add_task(copy.deepcopy(phase1), 0).emb.new_weight)
    plain = build_model("controlnet", 10)
    plain.load_state_dict(after)  # a plain 10-task ControlNet
    x = torch.randn(8, 1, 28, 28)
    assert torch.equal(plain(x, torch.full((8,), 9)), extended(x, torch.full((8,), 9)))


def test_existing_tasks_predict_bitwise_the_same():
    phase1, extended = trained_and_extended()
    x = torch.randn(32, 1, 28, 28)
    with torch.no_grad():
        for task in range(9):
            tasks = torch.full((32,), task)
            assert torch.equal(phase1(x, tasks), extended(x, tasks)), task
        # the evaluation path of experiments/table4_add_task.py (one task per pass through SelectedTasks)
        existing = list(range(9))
        assert torch.equal(all_task_logits(table4_add_task.SelectedTasks(phase1, existing), x, 9),
                           all_task_logits(table4_add_task.SelectedTasks(extended, existing), x, 9))


def run_script(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run([sys.executable, "-m", "experiments.table4_add_task", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=REPO)


def test_tiny_run_keeps_every_other_weight_and_learns_the_new_task(tmp_path):
    common = ["--subset", 4000, "--add_epochs", 6, "--add_lr", 0.03, "--device", "cpu"]
    proc = run_script("--epochs", 4, *common, "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    acc = results["test_acc"]
    assert acc["existing_tasks"]["before"] == acc["existing_tasks"]["after"]
    assert results["existing_tasks_identical"]
    assert results["phase1"]["epochs"] == 4 and results["phase2"]["epochs"] == 6
    assert results["phase2"]["trained_parameters"] == 320
    assert results["paper"]["added_task_digit_9"]["after"] == 64.68
    phase2 = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["phase"] == 2]
    assert phase2[-1]["train_loss"] < phase2[0]["train_loss"] - 0.005, phase2
    assert acc["added_task_digit_9"]["after"] >= acc["added_task_digit_9"]["before"]

    phase1 = checkpoint.load(tmp_path / "run" / "phase1_model.pt")["model"]
    extended = checkpoint.load(tmp_path / "run" / "extended_model.pt")["model"]
    assert set(phase1) == set(extended)
    for key in phase1:
        if key != "emb.weight":
            assert torch.equal(phase1[key], extended[key]), key
    assert torch.equal(extended["emb.weight"][:, :9], phase1["emb.weight"])

    # Phase 2 again from the saved phase 1 model: the same numbers.
    proc = run_script("--phase1_model", tmp_path / "run" / "phase1_model.pt", *common, "--out", tmp_path / "again")
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["test_acc"] == results["test_acc"]
    assert again["phase1"]["model_file"].endswith("phase1_model.pt")

    # A finished run is never overwritten: refused in one line, or moved aside whole with --overwrite.
    proc = run_script("--phase1_model", tmp_path / "run" / "phase1_model.pt", *common, "--out", tmp_path / "again")
    assert proc.returncode == 2 and "already holds a run" in proc.stderr, proc.stderr[-3000:]
    proc = run_script("--phase1_model", tmp_path / "run" / "phase1_model.pt", *common, "--out", tmp_path / "again",
                      "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    [aside] = (tmp_path / "again").glob("replaced_*")
    assert {"results.json", "metrics.jsonl", "extended_model.pt"} <= {path.name for path in aside.iterdir()}
    assert json.loads((aside / "results.json").read_text())["test_acc"] == results["test_acc"]


@pytest.mark.parametrize("args, message", [
    (["--param_file", "params/mmnist_9digits_controlnet.json"], "allowed: setting 9digits_byref with model controlnet"),
    (["--param_file", "params/nope.json"], "param file not found"),
    (["--add_lr", "-1"], "--add_lr: expected a number > 0"),
    (["--phase1_model", "nope.pt"], "--phase1_model: nope.pt not found"),
    (["--device", "tpu"], "--device: unknown device 'tpu'; allowed"),
])
def test_user_mistakes_are_one_line_and_exit_code_2(tmp_path, args, message):
    proc = run_script(*args, "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
