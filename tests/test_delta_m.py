"""Δm% against single task in the Table 2 outputs (experiments/table2.py), on hand-computed values."""
import json
from pathlib import Path

import pytest

from experiments import table2

PARAMS = {"optimizer": "Adam", "lr": 0.001, "batch_size": 512, "lr_schedule": "halve_30_60_90"}


def write_run(runs_dir, method, setting, seed, per_task, last=None):
    """A results.json with the keys the table reads; ``last``: the per-task accuracies at the last epoch."""
    out = Path(runs_dir) / setting / method / f"seed{seed}"
    out.mkdir(parents=True)
    last = last or per_task
    mean = sum(per_task) / len(per_task)
    results = {"git_commit": "abc123", "device": "cpu (test)", "seed": seed, "epochs": 100, "method": method,
               "setting": setting, "subset": None, "params_x": 1.0, "weights_x": 1.0, "val_acc_mean": mean,
               "test_acc_mean": mean, "test_acc_per_task": per_task, "test_acc_mean_last": sum(last) / len(last),
               "test_acc_per_task_last": last, "wall_time_s": 3600.0, "params": PARAMS}
    (out / "results.json").write_text(json.dumps(results))
    (out / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "train_loss": 1.0, "epoch_time_s": t}) + "\n"
                                               for e, t in ((1, 30.0), (2, 10.0), (3, 20.0))))


@pytest.fixture
def runs(tmp_path):
    # single task, 2 digits: per-task means over its seeds [80, 90]; uniform scaling: [84, 99]
    write_run(tmp_path, "single_task", "2digits", 0, [78.0, 92.0], last=[80.0, 90.0])
    write_run(tmp_path, "single_task", "2digits", 1, [82.0, 88.0], last=[80.0, 90.0])
    write_run(tmp_path, "uniform_scaling", "2digits", 0, [82.0, 90.0], last=[72.0, 90.0])
    write_run(tmp_path, "uniform_scaling", "2digits", 1, [86.0, 108.0], last=[72.0, 90.0])
    write_run(tmp_path, "controlnet", "4digits", 0, [50.0] * 4)  # no single-task run with 4 digits
    return tmp_path


def test_delta_m_is_the_mean_relative_change_per_task():
    # (84 - 80) / 80 = +5 %, (99 - 90) / 90 = +10 %: mean +7.5 %
    assert table2.delta_m([84.0, 99.0], [80.0, 90.0]) == pytest.approx(7.5)
    # (40 - 50) / 50 = -20 %, (30 - 20) / 20 = +50 %, 10 / 10 = 0 %: mean +10 %
    assert table2.delta_m([40.0, 30.0, 10.0], [50.0, 20.0, 10.0]) == pytest.approx(10.0)
    assert table2.delta_m([80.0, 90.0], [80.0, 90.0]) == 0.0
    assert table2.delta_m([1.0, 2.0], [1.0]) is None  # another number of tasks
    assert table2.delta_m([1.0], [0.0]) is None  # no relative change against 0
    assert table2.delta_m(None, [1.0]) is None


@pytest.mark.parametrize("select, expected", [("best_val", 7.5), ("last", -5.0)])
def test_each_cell_gets_delta_m_against_single_task_at_the_same_selection(runs, select, expected):
    rows = table2.aggregate(runs, select=select)["rows"]
    # per-task accuracies are averaged over seeds first: [84, 99] vs [80, 90] (best_val), [72, 90] vs [80, 90] (last)
    assert rows["uniform_scaling"]["2digits"]["delta_m"] == pytest.approx(expected)
    assert rows["single_task"]["2digits"]["delta_m"] == 0.0
    assert rows["controlnet"]["4digits"]["delta_m"] is None  # no single task to compare with
    assert rows["controlnet"]["2digits"]["delta_m"] is None  # no run


def test_tables_and_readme_show_delta_m_and_the_median_epoch_time(runs, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- table2 summary begin -->\n<!-- table2 summary end -->\n")
    out = tmp_path / "out"
    assert table2.main(["--runs_dir", str(runs), "--out_dir", str(out), "--readme", str(readme)]) == 0
    markdown = (out / "table2.md").read_text()
    section = markdown.split("## Δm% against single task")[1].split("## Every figure")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in section.splitlines() if line.startswith("| ")}
    assert rows["single_task"] == "| single_task | 0 (reference) | – | – | – |"
    assert rows["uniform_scaling"] == "| uniform_scaling | +7.50 | – | – | – |"
    assert rows["controlnet"] == "| controlnet | – | – | – | – |"
    assert "Maninis et al. 2019; Navon et al. 2022" in section
    assert "| uniform_scaling | **91.50** ± 7.78 (95.30, -3.80) |" in readme.read_text()  # a paper row: vs the paper
    saved = json.loads((out / "table2.json").read_text())["rows"]["uniform_scaling"]["2digits"]
    assert saved["delta_m"] == pytest.approx(7.5) and saved["acc_per_task"] == [84.0, 99.0]
    assert saved["epoch_time_s"] == 20.0  # the median of 30, 10 and 20 s, the same for both seeds
    assert "| uniform_scaling | 2.00 (20.0 s) | – | – | – |" in markdown  # two runs of 1 h each


def test_without_any_single_task_run_the_table_says_so_in_one_line(tmp_path):
    write_run(tmp_path, "controlnet", "9digits_byref", 0, [30.0] * 10)
    lines = table2.delta_m_lines(table2.aggregate(tmp_path))
    assert lines == ["Δm% against single task: none, since no single_task run of this protocol has per-task "
                     "accuracies."]


def test_summary_gives_rows_beyond_the_paper_their_delta_m(runs, tmp_path):
    write_run(runs, "dwa", "2digits", 0, [88.0, 99.0])  # +10 % on both tasks against single task's [80, 90]
    rows = {line.split(" | ")[0].strip("| "): line for line in table2.summary_lines(table2.aggregate(runs))}
    assert rows["dwa (beyond the paper)"] == "| dwa (beyond the paper) | **93.50** (Δm% +10.00) | – | – | – |"


def test_a_run_whose_lr_schedule_changed_is_named_in_the_notes(runs):
    path = runs / "2digits" / "uniform_scaling" / "seed1" / "results.json"
    results = json.loads(path.read_text())
    path.write_text(json.dumps({**results, "schedule_changed_at_epoch": 40}))
    notes = table2.aggregate(runs)["notes"]
    changed = [note for note in notes if "lr schedule changed" in note]
    assert len(changed) == 1 and "2digits/uniform_scaling seed 1" in changed[0] and "after epoch 40" in changed[0]
