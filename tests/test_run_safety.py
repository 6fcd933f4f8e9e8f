"""Nothing a researcher does loses or overwrites a run: one run per output dir, --resume only with the run's own
arguments and data, Ctrl-C as one line and exit 130, --set overrides, the lr schedule of short runs, the logs."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import models
from in_process import run_main, write_params
from loaders.mnist import load_mnist
from training import checkpoint, data, evaluate, optim, progress, run_lock, trainer

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_multi_task_counter_stream.py"
PARAMS = {"exp_id": "safety", "method": "uniform_scaling", "setting": "2digits", "lr": 0.003, "batch_size": 100}
RUN = ["--epochs", "2", "--subset", "300", "--device", "cpu"]


@pytest.fixture
def params(tmp_path):
    return write_params(tmp_path, PARAMS)


main = run_main


def one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def files(directory):
    return {path.name: path.read_bytes() for path in sorted(Path(directory).iterdir())}


def test_a_second_run_into_a_locked_dir_exits_2_naming_the_holder(params, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    out.mkdir()
    run_lock.acquire(out, "python holder.py")
    try:
        code, _, err = main(capsys, "--param_file", params, *RUN, "--out", out)
    finally:
        run_lock.release(out)
    line = one_error_line(err)
    assert code == 2 and f"{out} is in use by another run (pid {os.getpid()} on " in line, line
    assert "python holder.py" in line and not (out / "checkpoint.pt").exists()


def test_a_lock_left_by_a_killed_run_is_detected_and_taken_over(params, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    out.mkdir()
    dead = {"pid": 999999, "host": "h", "started": "2026-01-01T00:00:00+00:00", "command": "python killed.py"}
    (out / run_lock.LOCK_NAME).write_text(json.dumps(dead))  # a record, but no process holds the lock
    code, stdout, _ = main(capsys, "--param_file", params, *RUN, "--out", out)
    assert code == 0 and "left locked by a run that no longer exists (pid 999999" in stdout
    assert (out / "results.json").exists() and not (out / run_lock.LOCK_NAME).exists()  # removed at the end


def test_lock_is_exclusive_between_processes(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from training import run_lock; run_lock.acquire(sys.argv[1], 'x'); "
                               "print('locked', flush=True); time.sleep(60)", str(tmp_path)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(run_lock.RunDirBusy, match=f"pid {holder.pid} on "):
            run_lock.acquire(tmp_path, "y")
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert run_lock.acquire(tmp_path, "z")["pid"] == holder.pid  # the kernel dropped the dead holder's lock
    run_lock.release(tmp_path)


def test_resuming_a_finished_run_changes_nothing(params, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    assert main(capsys, "--param_file", params, *RUN, "--out", out)[0] == 0
    before = files(out)
    code, stdout, _ = main(capsys, "--param_file", params, *RUN, "--out", out, "--resume")
    assert code == 0 and "holds a finished run (2 of 2 epochs); nothing to do, nothing changed" in stdout
    assert files(out) == before
    code, _, err = main(capsys, "--param_file", params, "--epochs", "2", "--subset", "200", "--out", out, "--resume")
    assert code == 2 and "(--subset (300 -> 200, which changes the data)); pass --force" in one_error_line(err)
    assert files(out) == before


def test_resume_on_other_data_is_refused(params, tmp_path, capsys, monkeypatch, one_thread):
    out = tmp_path / "run"
    load = data.load_data
    monkeypatch.setattr(trainer, "lr_factor", lambda *args: 1.0)
    assert main(capsys, "--param_file", params, "--epochs", "1", "--subset", "300", "--out", out)[0] == 0
    (out / "results.json").unlink()  # as if killed before the end: a run to resume

    def other_data(*args):
        data = load(*args)
        images, labels, locations = data["train"]
        return {**data, "train": (255 - images, labels, locations)}
    monkeypatch.setattr(trainer, "load_data", other_data)
    code, _, err = main(capsys, "--param_file", params, "--epochs", "1", "--subset", "300", "--out", out, "--resume")
    assert code == 2 and "was trained on other data (fingerprint " in one_error_line(err)
    code, _, _ = main(capsys, "--param_file", params, "--epochs", "2", "--subset", "300", "--out", out, "--resume",
                      "--force")
    [change] = json.loads((out / "results.json").read_text())["forced_changes"]
    assert code == 0 and change["epoch"] == 1 and change["changed"][0].startswith("--epochs (1 -> 2")
    assert len(change["changed"]) == 2 and change["changed"][1].startswith("data (")


def test_set_overrides_keys_checks_them_and_records_them(params, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    code, stdout, _ = main(capsys, "--param_file", params, *RUN, "--out", out, "--set", "lr=0.01",
                           "--set", "method=kendall", "--set", "weighting_options.variant=\"gal\"")
    assert code == 0, stdout
    results = json.loads((out / "results.json").read_text())
    assert results["params"]["lr"] == 0.01 and results["params"]["weighting"] == "kendall"
    assert results["params"]["weighting_options"] == {"variant": "gal"}
    assert results["overrides"] == ["lr=0.01", "method=kendall", "weighting_options.variant=\"gal\""]
    assert "overrides: lr=0.01 method=kendall weighting_options.variant=\"gal\"" in stdout


@pytest.mark.parametrize("setting,expected", [
    ("lrr=0.1", "--set lrr=0.1: unknown key 'lrr'; did you mean 'lr'? valid keys: exp_id"),
    ("lr=fast", "--set lr=fast: key 'lr' must be float, got \"fast\"; allowed: float from 1e-08 to 10.0"),
    ("lr=100", "--set lr=100: key 'lr' = 100.0 is out of range; allowed: 1e-08 to 10.0"),
    ("method=controlnett", "--set method=controlnett: key 'method' has unknown value \"controlnett\" (did you mean"),
    ("lr", "--set lr: expected KEY=VALUE (e.g. --set lr=0.01"),
    ("lr.x=1", "--set lr.x=1: only dict keys take a dotted entry; allowed: model_options.NAME"),
    ("weighting_options.nope=1", "unknown option(s) ['nope'] for weighting 'uniform'"),
])
def test_bad_set_is_one_line_and_exit_2(setting, expected, params, tmp_path, capsys):
    code, _, err = main(capsys, "--param_file", params, *RUN, "--out", tmp_path / "run", "--set", setting)
    assert code == 2 and expected in one_error_line(err), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("epochs,halved", [(1, []), (4, []), (6, []), (7, [2, 4, 6]), (10, [3, 6, 9]),
                                           (100, [30, 60, 90]), (900, [270, 540, 810])])
def test_lr_schedule_halves_at_30_60_90_percent_and_never_before_epoch_1(epochs, halved):
    params = {"lr_schedule": "halve_30_60_90"}
    factors = [optim.lr_factor(params, epoch, epochs) for epoch in range(epochs)]
    assert factors[0] == 1.0
    assert [epoch + 1 for epoch in range(1, epochs) if factors[epoch] < factors[epoch - 1]] == halved
    text = optim.describe_schedule(params, epochs)
    assert text == (f"lr halved at epochs {', '.join(map(str, halved))}" if halved else
                    "constant lr (fewer than 7 epochs)")


def test_logs_train_log_metrics_fields_and_no_progress_frames_off_a_terminal(params, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--param_file", str(params), *RUN, "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    log = (out / "train.log").read_text()
    for text in (proc.stdout, proc.stderr, log):  # stdout and stderr are pipes: no progress bar frames
        assert not any(frame in text for frame in ("\r", "batch/s", "\u2588", "|")), text
    assert "2 epochs from epoch 1, Adam lr 0.003, batch 100, constant lr (fewer than 7 epochs), seed 0" in log
    assert re.search(r"^\S+ epoch 2/2  loss ", log, re.M) and "test accuracy at the best-validation epoch" in log
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert record["epoch_time_s"] > 0 and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", record["time"])
        assert 0 < record["val_loss"] < 10 and 0 < record["test_loss"] < 10
    # every epoch line ends with the time left: after epoch 1 of 2, one epoch of epoch 1's time; after the last, 0s
    lines = [line for line in log.splitlines() if re.search(r" epoch \d/2  loss ", line)]
    assert [line.rsplit("  ", 1)[1] for line in lines] == [f"left {progress.duration(records[0]['epoch_time_s'])}",
                                                          "left 0s"]
    assert [line.split(" ", 1)[1] for line in lines] == [line for line in proc.stdout.splitlines() if " loss " in line]


def test_a_resumed_run_estimates_its_time_left_from_its_recorded_epoch_times(params, tmp_path, capsys, one_thread):
    """The epochs before a resume count in the median: a run whose first epoch took an hour (as recorded in its
    checkpoint and metrics.jsonl) has about half an hour left after its second, fast, epoch of three."""
    out = tmp_path / "run"
    assert main(capsys, "--param_file", params, "--epochs", "1", "--subset", "300", "--out", out)[0] == 0
    saved = checkpoint.load(out / "checkpoint.pt")
    saved["history"][0]["epoch_time_s"] = 3600.0
    checkpoint.save(saved, out / "checkpoint.pt")
    (out / "metrics.jsonl").write_text(json.dumps(saved["history"][0]) + "\n")
    code, stdout, _ = main(capsys, "--param_file", params, "--epochs", "3", "--subset", "300", "--out", out,
                           "--resume", "--force")
    assert code == 0
    second = json.loads((out / "metrics.jsonl").read_text().splitlines()[1])["epoch_time_s"]
    left = [line.rsplit("  ", 1)[1] for line in stdout.splitlines() if re.match(r"epoch \d/3  loss ", line)]
    assert left == [f"left {progress.duration((3600.0 + second) / 2)}", "left 0s"]


def test_evaluation_loss_is_the_mean_over_tasks_of_each_tasks_cross_entropy(one_thread):
    torch.manual_seed(0)
    model = models.build_model("multi_branch", 3).eval()
    images = torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (40, 3))
    labels[::3, 1] = -1  # undefined pairs are not counted
    accuracy, loss = evaluate.evaluate(model, images, labels, 3, 12, torch.contiguous_format, with_loss=True)
    with torch.no_grad():
        logits = model(data.normalize(images))  # [B, T, C]
    by_hand = [torch.nn.functional.cross_entropy(logits[labels[:, t] >= 0, t], labels[labels[:, t] >= 0, t])
               for t in range(3)]
    assert loss == pytest.approx(float(sum(by_hand) / 3), rel=1e-5)
    assert torch.equal(accuracy, evaluate.evaluate(model, images, labels, 3, 12, torch.contiguous_format))


def test_ctrl_c_is_one_line_exit_130_and_its_command_continues_the_run(params, tmp_path):
    load_mnist()  # fetched before the run, whose stderr must then hold only the interruption's line
    out = tmp_path / "run"
    args = [sys.executable, str(SCRIPT), "--param_file", str(params), "--epochs", "30", "--subset", "300",
            "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a shell's background
    # jobs ignore SIGINT, and so would the child: Python installs its KeyboardInterrupt handler only when not ignored
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    line = one_error_line(err)
    match = re.fullmatch(r"interrupted: stopped in epoch (\d+) of 30 \((\d+) finished\); the last checkpoint is "
                         rf"{re.escape(str(out / 'checkpoint.pt'))}; continue with: (.+ --resume)", line)
    assert match and int(match[1]) == int(match[2]) + 1, line
    assert (out / "train.log").read_text().splitlines()[-1].endswith(line)  # the record keeps it too
    assert not list(out.glob("*.tmp"))
    command = match[3].split()
    assert command[:2] == ["python", "train_multi_task_counter_stream.py"]
    finished = subprocess.run([sys.executable, str(SCRIPT), *command[2:]], cwd=REPO, capture_output=True, text=True,
                              env=env)
    assert finished.returncode == 0, finished.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 30


def test_output_read_by_a_reader_that_stops_early_ends_quietly(tmp_path):
    """``python -m experiments.table2_sweep --dry_run | head -1``: the pipe closes under the listing."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line: every write fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "experiments.table2_sweep", "--dry_run", "--runs_dir",
                               str(tmp_path)], cwd=REPO, stdout=write_end, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    assert proc.returncode == 141 and proc.stderr == ""


def test_ctrl_c_in_any_entry_point_is_one_line_and_exit_130(capsys):
    from training import cli

    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as exit_:
        cli.exit_with(interrupted)
    assert exit_.value.code == 130
    assert one_error_line(capsys.readouterr().err).startswith("interrupted (Ctrl-C); every file written so far")
    entry_points = [path for path in sorted(REPO.glob("*.py")) + sorted(REPO.glob("benchmarks/*.py"))
                    + sorted(REPO.glob("experiments/**/*.py")) if '__name__ == "__main__"' in path.read_text()]
    assert len(entry_points) >= 15
    for path in entry_points:
        main_block = path.read_text().split('if __name__ == "__main__":')[1]
        assert "cli.exit_with(main)" in main_block or "distributed.exit_process(main())" in main_block, path.name
