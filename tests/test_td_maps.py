"""Task locations of Multi-MNIST (the localisation loss's targets) and the TD-map peak measure of experiments/td_maps.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from experiments import td_maps
from loaders.multi_mnist import by_ref_labels, make_multi_mnist, task_locations

REPO = Path(__file__).resolve().parents[1]


def test_by_location_targets_are_the_cell_centres():
    xy = task_locations("9digits", np.zeros((2, 9), dtype=np.int64))
    assert xy.shape == (2, 9, 2)
    # task 5 = row 2, column 1: canvas offset (24, 12), centre (12 + 14, 24 + 14) of 52 -> x 14.0, y 20.46
    torch.testing.assert_close(xy[1, 5], torch.tensor([26 * 28 / 52, 38 * 28 / 52]))
    torch.testing.assert_close(task_locations("2digits", np.zeros((1, 2)))[0], torch.tensor([[14 * 28 / 36] * 2,
                                                                                             [20 * 28 / 36] * 2]))


def test_by_reference_target_is_the_digit_right_of_the_referred_one():
    grid = np.array([[3, 5, 7, 1, 2, 4, 0, 8, 9],    # digit 3 at position 0 -> answer at position 3 (digit 1)
                     [3, 3, 7, 1, 2, 4, 0, 8, 9]])   # digit 3 twice: not valid; digit 0 in the last column
    xy, labels = task_locations("9digits_byref", grid), by_ref_labels(grid)
    centres = td_maps.cell_centres("9digits")
    torch.testing.assert_close(xy[0, 3], centres[3])
    assert labels[0, 3] == 1 and labels[1, 3] == -1 and labels[0, 0] == -1
    assert (xy[1, 3] == -1).all() and (xy[0, 0] == -1).all()
    assert ((xy[..., 0] < 0) == torch.from_numpy(labels < 0)).all()  # a target exactly where the task applies


def test_by_reference_target_cell_holds_the_answer_digit_on_real_images():
    """The by-location label of the cell at each by-reference target is the by-reference label (same images)."""
    _, grid_labels = make_multi_mnist("9digits", "val")
    _, labels, xy = make_multi_mnist("9digits_byref", "val", locations=True)
    valid = labels >= 0
    cell = torch.cdist(xy[valid], td_maps.cell_centres("9digits")).argmin(dim=1)
    rows = valid.nonzero()[:, 0]
    assert valid.sum() > 10_000 and torch.equal(grid_labels[rows, cell], labels[valid])


def test_peak_in_right_cell_is_nearest_centre():
    centres = td_maps.cell_centres("4digits")  # (10.9, 10.9), (10.9, 19.3), (19.3, 10.9), (19.3, 19.3)
    peaks = torch.tensor([[10, 10], [20, 20], [14, 19], [27, 0]])
    targets = centres[[0, 3, 0, 2]]
    assert td_maps.peak_in_right_cell(peaks, targets, centres).tolist() == [True, True, False, True]


def test_script_on_a_short_run_and_its_errors(tmp_path):
    params = {"exp_id": "t", "method": "controlnet", "setting": "4digits", "batch_size": 128, "lr_schedule": "none"}
    (tmp_path / "p.json").write_text(json.dumps(params))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, str(REPO / "train_multi_task_counter_stream.py"), "--param_file", str(tmp_path / "p.json"),
           "--epochs", "1", "--subset", "300", "--out", str(tmp_path / "run"), "--device", "cpu"]
    assert subprocess.run(run, capture_output=True, env=env, cwd=REPO).returncode == 0
    proc = subprocess.run([sys.executable, "-m", "experiments.td_maps", "--run", str(tmp_path / "run"), "--out",
                           str(tmp_path / "maps"), "--images", "2", "--test_images", "300"], capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "maps" / "td_maps.json").read_text())
    assert report["test_pairs"] == 1200 and report["chance_pct"] == 25.0
    assert 0.0 <= report["peak_in_right_cell_pct"] <= 100.0 and len(report["peak_in_right_cell_pct_per_task"]) == 4
    proc = subprocess.run([sys.executable, "-m", "experiments.td_maps", "--run", str(tmp_path), "--out",
                           str(tmp_path / "maps")], capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "best_model.pt not found" in proc.stderr
