"""A finished run is never overwritten, a refused start leaves no lock, every exit code means what the README's table
says, inputs that would give no measurement are refused, and results.json says how a run came to be."""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import train_multi_task_counter_stream as train_script
from in_process import run_main, write_params
from training import checkpoint, config, data, run_lock, trainer

REPO = Path(__file__).resolve().parents[1]
PARAMS = {"exp_id": "lost", "method": "uniform_scaling", "setting": "2digits", "lr": 0.003, "batch_size": 100}
RUN = ["--epochs", "1", "--subset", "300", "--device", "cpu"]
COMMITTED = REPO / "results" / "table2_full" / "9digits" / "controlnet" / "seed0"  # results.json + metrics.jsonl


@pytest.fixture
def params(tmp_path):
    return write_params(tmp_path, PARAMS)


def main(capsys, *args):
    """``main`` in this process: (exit code, stdout, the one stderr line or "")."""
    code, out, err = run_main(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) <= 1 and "Traceback" not in err, err
    return code, out, lines[0] if lines else ""


def snapshot(directory):
    return {path.name: path.read_bytes() for path in sorted(Path(directory).iterdir()) if path.is_file()}


def test_a_new_run_into_a_finished_runs_folder_is_refused_then_moved_aside_by_overwrite(params, tmp_path, capsys,
                                                                                       one_thread):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("results.json", "metrics.jsonl"):
        shutil.copy(COMMITTED / name, out / name)
    before = snapshot(out)
    code, _, line = main(capsys, "--param_file", params, *RUN, "--out", out)
    assert code == 2 and line == (f"error: --out: {out} already holds a run (results.json, metrics.jsonl); choose "
                                  f"another --out, or pass --overwrite to start again with its files moved into "
                                  f"{out / 'replaced_<UTC time>'}"), line
    assert snapshot(out) == before and not (out / run_lock.LOCK_NAME).exists()
    code, _, line = main(capsys, "--param_file", params, *RUN, "--out", out, "--resume")
    assert code == 2 and "holds a run's files (results.json, metrics.jsonl) but no checkpoint.pt" in line, line
    assert snapshot(out) == before and not (out / run_lock.LOCK_NAME).exists()

    code, stdout, _ = main(capsys, "--param_file", params, *RUN, "--out", out, "--overwrite")
    assert code == 0
    [aside] = out.glob("replaced_*")
    assert re.fullmatch(r"replaced_\d{8}T\d{6}Z", aside.name) and snapshot(aside) == before
    assert f"--overwrite: moved results.json, metrics.jsonl of the run in {out} into {aside}" in stdout
    assert json.loads((out / "results.json").read_text())["setting"] == "2digits"
    assert not (out / run_lock.LOCK_NAME).exists()


def test_a_refused_or_failed_start_leaves_no_lock_and_no_stale_note(params, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    assert main(capsys, "--param_file", params, *RUN, "--out", out)[0] == 0
    code, _, line = main(capsys, "--param_file", params, *RUN, "--out", out)  # a new run into it: refused
    assert code == 2 and "pass --resume to continue it" in line and not (out / run_lock.LOCK_NAME).exists()
    code, stdout, _ = main(capsys, "--param_file", params, "--epochs", "2", *RUN[2:], "--out", out, "--resume",
                           "--force")
    assert code == 0 and "left locked" not in stdout and not (out / run_lock.LOCK_NAME).exists()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    code, _, line = main(capsys, "--param_file", params, *RUN, "--out", out, "--resume")
    assert code == 2 and line.endswith("to start the run again, keeping its files in a dated subfolder, drop --resume "
                                       "and pass --overwrite"), line
    assert not (out / run_lock.LOCK_NAME).exists()


def test_exit_code_2_for_unusable_input(params, tmp_path, capsys):
    (tmp_path / "file").write_text("a regular file")
    code, _, line = main(capsys, "--param_file", params, *RUN, "--out", tmp_path / "file")
    assert code == 2 and line == f"error: --out: {tmp_path / 'file'} is a file, not a folder; choose a folder with --out"
    code, _, line = main(capsys, "--param_file", params, *RUN, "--out", tmp_path / "run",
                         "--data_root", tmp_path / "file" / "data")
    assert code == 2 and "cannot read or write the data cache" in line
    (tmp_path / "model.pt").write_bytes(b"garbage")
    code, _, line = main(capsys, "--eval_only", "--out", tmp_path / "model.pt")
    assert code == 2 and "is corrupt or truncated" in line, line


def test_exit_code_1_only_for_a_bug(params, tmp_path, monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(trainer, "train", bug)
    with pytest.raises(ZeroDivisionError):  # uncaught: Python prints the traceback and exits 1
        train_script.main([str(arg) for arg in ["--param_file", params, *RUN, "--out", tmp_path / "run"]])
    assert not (tmp_path / "run" / run_lock.LOCK_NAME).exists()


def test_readme_documents_every_exit_code_in_one_table():
    readme = (REPO / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(\d+)` \| (.+) \|$", readme, flags=re.M))
    assert set(rows) == {"0", "1", "2", "130", "141"}, rows
    assert "bug" in rows["1"] and "corrupt" in rows["2"] and "Ctrl-C" in rows["130"]


def split(labels):
    labels = torch.tensor(labels)
    return torch.zeros(len(labels), 4, 4, dtype=torch.uint8), labels, None


def test_a_subset_without_a_val_or_test_image_of_every_task_or_beyond_the_pool_is_refused():
    splits = {"train": split([[1, 2]] * 20), "val": split([[1, -1], [3, 4]]), "test": split([[5, 6], [7, 8]])}
    with pytest.raises(config.ParamError, match=r"--subset 9 leaves task\(s\) \[1\] without a val image \(1 val "):
        data.cut_to_subset(splits, 9)
    cut = data.cut_to_subset(splits, 10)  # 2 val images: task 1 has one
    assert [len(cut[name][0]) for name in ("train", "val", "test")] == [10, 2, 2]
    with pytest.raises(config.ParamError, match=r"--subset 21 is more than the 20 training images; give at most 20"):
        data.cut_to_subset(splits, 21)


def test_a_key_set_twice_with_different_values_is_refused(params, tmp_path, capsys):
    code, _, line = main(capsys, "--param_file", params, *RUN, "--set", "epochs=2", "--out", tmp_path / "run")
    assert code == 2 and line == "error: --set epochs=2 and --epochs 1 give 'epochs' two values; pass one of them"
    code, _, line = main(capsys, "--param_file", params, *RUN, "--set", "lr=0.1", "--set", "lr=0.2")
    assert code == 2 and line == "error: --set lr is given twice with different values (0.1 and 0.2); pass it once"
    assert config.apply_overrides({}, ["lr=0.1", "lr=0.1"])["lr"] == 0.1  # the same value twice is no conflict
    assert not (tmp_path / "run").exists()


def test_results_keep_the_first_command_its_resumes_and_a_forced_schedule_change(params, tmp_path, capsys,
                                                                                 one_thread):
    out = tmp_path / "run"
    first = ["--param_file", params, *RUN, "--out", out]
    assert main(capsys, *first)[0] == 0
    untouched = json.loads((out / "results.json").read_text())
    assert untouched["resumed"] == [] and untouched["schedule_changed_at_epoch"] is None
    assert main(capsys, "--param_file", params, "--epochs", "2", *RUN[2:], "--out", out, "--resume", "--force")[0] == 0
    results = json.loads((out / "results.json").read_text())
    assert results["command"] == untouched["command"] and results["command"].endswith(f"--out {out}")
    [resumed] = results["resumed"]
    assert resumed["epoch"] == 1 and resumed["command"].endswith("--resume --force")
    assert results["schedule_changed_at_epoch"] == 1 and results["epochs"] == 2
    assert results["forced_changes"] == [{"epoch": 1, "changed": ["--epochs (1 -> 2, which changes the lr schedule)"]}]
    assert checkpoint.load(out / "checkpoint.pt")["commands"][0]["command"] == untouched["command"]


def test_a_kill_between_the_last_checkpoint_and_metrics_jsonl_loses_no_epoch(params, tmp_path, capsys, one_thread):
    """checkpoint.pt is written before metrics.jsonl and results.json: a run killed between them at its last epoch
    has a finished checkpoint and a metrics.jsonl one line short; its resume writes both files whole."""
    out = tmp_path / "run"
    args = ["--param_file", params, "--epochs", "2", *RUN[2:], "--out", out]
    assert main(capsys, *args)[0] == 0
    metrics, results = (out / "metrics.jsonl").read_text(), json.loads((out / "results.json").read_text())
    (out / "metrics.jsonl").write_text(metrics.splitlines(keepends=True)[0])  # what the kill leaves
    (out / "results.json").unlink()
    assert main(capsys, *args, "--resume")[0] == 0
    assert (out / "metrics.jsonl").read_text() == metrics
    resumed = json.loads((out / "results.json").read_text())
    assert [resumed[key] for key in ("best_epoch", "test_acc_mean", "test_acc_mean_last")] == \
        [results[key] for key in ("best_epoch", "test_acc_mean", "test_acc_mean_last")]
