"""The training script end to end, through its command line: learning, results, resume, dry run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training import checkpoint
from run_files import metrics_without_timing

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_multi_task_counter_stream.py"
RESULT_KEYS = {"command", "git_commit", "device", "seed", "epochs", "method", "setting", "num_params", "params_x",
               "best_epoch", "val_acc_mean", "test_acc_mean", "test_acc_per_task", "test_acc_mean_last",
               "wall_time_s"}


def param_file(tmp_path, **overrides):
    params = {"exp_id": "test", "method": "controlnet", "setting": "2digits", "lr": 0.003, "batch_size": 128,
              "lr_schedule": "none"}
    params.update(overrides)
    path = tmp_path / f"{params['exp_id']}.json"
    path.write_text(json.dumps(params))
    return path


def train(*args, check=True, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=REPO, **kwargs)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_short_controlnet_run_learns_far_above_chance(tmp_path):
    out = tmp_path / "run"
    train("--param_file", param_file(tmp_path), "--epochs", 4, "--subset", 4000, "--out", out, "--device", "cpu")
    results = json.loads((out / "results.json").read_text())
    assert RESULT_KEYS <= set(results)
    assert results["method"] == "controlnet" and results["setting"] == "2digits" and results["epochs"] == 4
    assert len(results["test_acc_per_task"]) == 2
    assert results["test_acc_mean"] > 60.0, results  # chance is 10%
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    best = max(json.loads(line)["val_acc_mean"] for line in lines)
    assert results["val_acc_mean"] == best
    assert (out / "best_model.pt").exists() and (out / "checkpoint.pt").exists()


def test_kill_and_resume_gives_the_uninterrupted_result(tmp_path):
    params = param_file(tmp_path, setting="9digits_byref", batch_size=256)
    common = ["--param_file", params, "--epochs", 4, "--subset", 2500, "--device", "cpu"]
    train(*common, "--out", tmp_path / "straight")
    # A real process, killed with SIGKILL as soon as it has written a checkpoint (mid-run), then resumed.
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, common), "--out", str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # killed mid-run (the kill may land before that epoch's metrics.jsonl: resuming rewrites it from the checkpoint)
    assert checkpoint.load(out / "checkpoint.pt")["epoch"] < 4 and not (out / "results.json").exists()
    again = train(*common, "--out", out, check=False)
    assert again.returncode == 2 and "--resume" in again.stderr  # never overwrites a run by accident
    train(*common, "--out", out, "--resume")
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())
    resumed = json.loads((out / "results.json").read_text())
    for key in ("best_epoch", "val_acc_mean", "test_acc_mean", "test_acc_per_task", "test_acc_mean_last"):
        assert resumed[key] == straight[key], key
    history, expected = metrics_without_timing(out), metrics_without_timing(tmp_path / "straight")
    assert [record["epoch"] for record in history] == [1, 2, 3, 4]
    assert history == expected


def test_dry_run_prints_parameter_counts_without_data(tmp_path):
    proc = train("--param_file", REPO / "params" / "mmnist_9digits_uniform_scaling.json", "--dry_run",
                 "--data_root", tmp_path / "nodata")
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts == {"method": "uniform_scaling", "setting": "9digits", "num_params": 48870, "num_weights": 48250,
                      "params_x": round(48870 / 24390, 4), "weights_x": round(48250 / 24250, 4)}
    assert not (tmp_path / "nodata").exists()


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "params").glob("*.json")))
def test_every_shipped_param_file_is_valid(name):
    from training import config
    params = config.load_params(REPO / "params" / name)
    assert params["exp_id"] == Path(name).stem


def test_docs_document_the_whole_schema_and_the_readme_the_ci_command():
    """docs/params.md holds training/config.py's generated schema table verbatim: a schema change without the doc fails."""
    from training import config
    assert config.schema_markdown() in (REPO / "docs" / "params.md").read_text()
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "python -m pytest -q tests" in ci and "python -m pytest -q tests" in readme
