"""Task selectivity (experiments/figure4_selectivity.py, paper Figure 4): the index formula, BU2's representation, the readouts'
shapes, and a tiny run from a best_model.pt of the training script."""
import json
import math
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from experiments import figure4_selectivity
from models import build_model

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_index_on_a_hand_computed_matrix():
    # rows: readout location, columns: selected task. Above chance (10%): selected 80 and 60 (mean 70),
    # non-selected 20 (column 0) and 10 (column 1) (mean 15): index 70 / 15; per task 80 / 20 and 60 / 10.
    index, per_task = figure4_selectivity.selectivity_index([[90.0, 20.0], [30.0, 70.0]])
    assert index == pytest.approx(70 / 15)
    assert per_task == pytest.approx([4.0, 6.0])
    # 3 tasks: selected 90, 80, 70 -> 80, 70, 60 above chance (mean 70); non-selected per column
    # (12 + 14) / 2 = 13, (20 + 10) / 2 = 15, (16 + 10) / 2 = 13 -> 3, 5, 3 above chance (mean 11/3).
    matrix = [[90.0, 20.0, 16.0], [12.0, 80.0, 10.0], [14.0, 10.0, 70.0]]
    index, per_task = figure4_selectivity.selectivity_index(matrix)
    assert index == pytest.approx(70 / (11 / 3))
    assert per_task == pytest.approx([80 / 3, 70 / 5, 60 / 3])
    # no non-selected readout above chance: infinitely selective (written as null in the JSON)
    index, per_task = figure4_selectivity.selectivity_index([[90.0, 10.0], [5.0, 70.0]])
    assert math.isinf(index) and all(math.isinf(value) for value in per_task)


@pytest.mark.parametrize("name", ["controlnet", "ch_mod"])
def test_bu2_representation_is_what_the_task_head_reads(name):
    torch.manual_seed(0)
    model = build_model(name, 4)
    images = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8)
    rep = figure4_selectivity.bu2_representation(model, images, rows=12, memory_format=torch.contiguous_format)
    assert rep.shape == (4, 10, 50)
    x = figure4_selectivity.normalize(images)
    with torch.no_grad():
        for task in range(4):
            logits = model(x, torch.full((10,), task))
            assert torch.allclose(model.bu.head(rep[task]), logits, atol=1e-5), task


def test_readouts_find_the_information_planted_in_each_task():
    """Synthetic representations: with task t selected, only the digit at location t is encoded. The matrix is
    [L, T], diagonal near 100%, off-diagonal near chance, hence a large index."""
    torch.manual_seed(0)
    tasks, n, hidden = 3, 2000, 12
    labels = torch.randint(0, 10, (n, tasks))
    rep = 0.1 * torch.randn(tasks, n, hidden)
    for t in range(tasks):
        rep[t, :, :10] += torch.nn.functional.one_hot(labels[:, t], 10).float()
    args = Namespace(readout="linear", readout_epochs=15, readout_lr=1e-2, batch_size=256, seed=0)
    train, test = slice(0, 1500), slice(1500, n)
    heads, mean, std = figure4_selectivity.train_readouts(rep[:, train], labels[train], args)
    matrix = figure4_selectivity.readout_accuracy(heads, mean, std, rep[:, test], labels[test])
    assert matrix.shape == (tasks, tasks)
    assert matrix.diagonal().min() > 95.0
    off_diagonal = matrix[~torch.eye(tasks, dtype=torch.bool)]
    assert off_diagonal.max() < 20.0
    assert figure4_selectivity.selectivity_index(matrix)[0] > 10.0
    heads = figure4_selectivity.readout_heads("mlp", tasks * tasks, hidden)
    assert heads(torch.randn(5, tasks * tasks, hidden)).shape == (5, tasks * tasks, 10)


def run(*args):
    """``python ARGS`` in the repository: a script path or ``-m`` and a module, then its arguments."""
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=ENV, cwd=REPO)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A best_model.pt of a tiny real training run (ControlNet, 4 digits)."""
    out = tmp_path_factory.mktemp("train")
    params = out / "params.json"
    params.write_text(json.dumps({"exp_id": "sel", "method": "controlnet", "setting": "4digits", "lr": 0.003,
                                  "batch_size": 128, "lr_schedule": "none"}))
    proc = run("train_multi_task_counter_stream.py", "--param_file", params, "--epochs", 2, "--subset", 1500,
               "--device", "cpu", "--out", out / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "run" / "best_model.pt"


@pytest.mark.parametrize("readout", figure4_selectivity.READOUTS)
def test_tiny_end_to_end_run(tmp_path, trained, readout):
    proc = run("-m", "experiments.figure4_selectivity", "--checkpoint", trained, "--subset", 400, "--readout", readout,
               "--readout_epochs", 3, "--device", "cpu", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / f"selectivity_{readout}.json").read_text())
    assert (tmp_path / f"selectivity_{readout}.png").stat().st_size > 0
    assert results["setting"] == "4digits" and results["method"] == "controlnet"
    assert results["train_images"] == 400 and results["test_images"] == 80
    matrix = torch.tensor(results["matrix"]["test_acc"])
    assert matrix.shape == (4, 4) and ((matrix >= 0) & (matrix <= 100)).all()
    assert results["locations"] == ["TL", "BL", "TR", "BR"]
    index = results["selectivity_index"]
    assert index is None or index == pytest.approx(figure4_selectivity.selectivity_index(matrix)[0])
    assert results["paper_selectivity_index"] == 26.5
    assert results["training"]["epochs"] == 2 and len(results["model_test_acc_per_task"]) == 4


def test_user_mistakes_are_one_line_and_exit_code_2(tmp_path, trained):
    byref = build_model("controlnet", 10)
    path = tmp_path / "byref.pt"
    torch.save({"model": byref.state_dict(), "params": {"model": "controlnet", "setting": "9digits_byref"}}, path)
    not_a_model = tmp_path / "list.pt"
    torch.save([1, 2], not_a_model)
    cases = [(["--checkpoint", tmp_path / "nope.pt"], "not found"),
             (["--checkpoint", path], "allowed: models controlnet, ch_mod"),
             (["--checkpoint", not_a_model], "is not a model of train_multi_task_counter_stream.py"),
             (["--checkpoint", trained, "--readout", "deep"], "invalid choice: 'deep'"),
             (["--checkpoint", trained, "--readout_lr", "0"], "--readout_lr: expected a number > 0")]
    for args, message in cases:
        proc = run("-m", "experiments.figure4_selectivity", *args, "--out", tmp_path / "out")
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
