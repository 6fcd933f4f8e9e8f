"""The Table 2 sweep's cells: checked before anything runs, a cell that fails while running reported with its own
error while the others run on, two sweeps sharing a runs dir, the progress and the sweep log, the seeds and your
own param files, and the Slurm job array over its shards."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import table2_sweep
from experiments.sweep_progress import Progress
from training import run_lock

REPO = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--subset", "100", "--device", "cpu", "--no_table"]


def sweep(*args):
    return subprocess.run([sys.executable, "-m", "experiments.table2_sweep", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})


def finished_run(out, params, epochs=1, subset=100):
    """A results.json as the training script writes it (the keys the sweep reads)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"epochs": epochs, "subset": subset, "params": params}))


# --- every cell checked before anything runs -------------------------------------------------------------------

def test_a_set_that_one_cell_cannot_take_is_one_line_naming_it_and_nothing_runs(tmp_path, capsys):
    code = table2_sweep.main(["--settings", "2digits", "--methods", "controlnet,uniform_scaling,mgda", "--seeds", "0,",
                              "--set", "dropout=sener_koltun", "--runs_dir", str(tmp_path / "R"), *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 2, err
    assert err[0].startswith("error: 2digits/controlnet: ") and "has no Sener-Koltun dropout" in err[0]
    assert err[1].startswith("nothing was run: 1 cell(s)")
    assert not (tmp_path / "R").exists()


def test_a_bad_set_value_is_one_line_per_cell_and_the_dry_run_says_so_too(tmp_path, capsys):
    for extra in ([], ["--dry_run"]):
        code = table2_sweep.main(["--settings", "2digits", "--methods", "uniform_scaling,mgda", "--seeds", "0",
                                  "--set", "lr=abc", "--runs_dir", str(tmp_path / "R"), *TINY, *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and [line.split(": ")[1] for line in err[:-1]] == ["2digits/uniform_scaling", "2digits/mgda"]
        assert all("--set lr=abc: key 'lr' must be float" in line for line in err[:-1])
    assert not (tmp_path / "R").exists()


def test_a_bad_param_file_in_params_dir_names_the_file(tmp_path, capsys):
    params = tmp_path / "params"
    params.mkdir()
    (params / "mmnist_2digits_ch_mod.json").write_text('{"exp_id": "x", "method": "ch_mod",')
    wrong = json.loads((REPO / "params/mmnist_2digits_mgda.json").read_text())
    (params / "mmnist_2digits_mgda.json").write_text(json.dumps({**wrong, "setting": "4digits"}))
    code = table2_sweep.main(["--settings", "2digits", "--methods", "ch_mod,mgda,kendall", "--params_dir", str(params),
                              "--runs_dir", str(tmp_path / "R"), "--dry_run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 4
    assert err[0].startswith(f"error: 2digits/ch_mod: {params / 'mmnist_2digits_ch_mod.json'}: malformed JSON")
    assert "key 'setting' is '4digits', but the file names the cell 2digits/mgda" in err[1]
    assert err[2] == f"error: 2digits/kendall: {params / 'mmnist_2digits_kendall.json'}: param file not found"


# --- a cell failing while running --------------------------------------------------------------------------------

def test_a_cell_that_fails_while_running_is_reported_and_the_others_run_on(tmp_path, capsys):
    """The first cell fails in the training script (its data root cannot be made), in a cell folder that did not
    exist before; the second still runs; the summary names the failure again; exit code 1."""
    params = tmp_path / "params"
    params.mkdir()
    for method in ("ch_mod", "uniform_scaling"):
        shutil.copy(REPO / f"params/mmnist_2digits_{method}.json", params)
    bad = json.loads((params / "mmnist_2digits_ch_mod.json").read_text())
    (params / "mmnist_2digits_ch_mod.json").write_text(json.dumps({**bad, "data_root": "/proc/no/such/root"}))
    runs = tmp_path / "R"
    code = table2_sweep.main(["--settings", "2digits", "--methods", "ch_mod,uniform_scaling", "--seeds", "0",
                              "--params_dir", str(params), "--runs_dir", str(runs), *TINY])
    proc = capsys.readouterr()
    assert code == 1, proc.err
    failed = [line for line in proc.err.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 2 and failed[0] == failed[1]  # as it happened, and again in the summary
    kept = runs / "2digits/ch_mod/seed0/stderr.txt"
    own = [line for line in kept.read_text().splitlines() if line.startswith("error:")][-1]  # the run's own error
    assert failed[0] == f"FAILED 2digits/ch_mod/seed0 (exit 2): {own}  [stderr: {kept}]" and "/proc/no" in own
    assert (runs / "2digits/uniform_scaling/seed0/results.json").exists()
    assert "sweep: 1 trained, 1 failed" in proc.out


# --- two sweeps sharing one runs dir -----------------------------------------------------------------------------

def test_a_cell_another_run_holds_is_skipped_and_said_not_failed(tmp_path, capsys):
    runs = tmp_path / "R"
    held = runs / "2digits/uniform_scaling/seed0"
    held.mkdir(parents=True)
    args = ["--settings", "2digits", "--methods", "uniform_scaling", "--seeds", "0,1", "--runs_dir", str(runs), *TINY]
    run_lock.acquire(held, "python -m experiments.table2_sweep (the other sweep)")
    try:
        assert table2_sweep.main(args + ["--dry_run"]) == 0
        assert f"busy     2digits/uniform_scaling/seed0  (in use by another run (pid {os.getpid()}" in \
            capsys.readouterr().out
        code = table2_sweep.main(args)
    finally:
        run_lock.release(held)
    out, err = capsys.readouterr()
    assert code == 0 and "FAILED" not in out + err, err
    assert f"skipped 2digits/uniform_scaling/seed0: in use by another run (pid {os.getpid()}" in out
    assert "sweep: 1 trained, 0 failed, 1 left to another run that holds them" in out
    assert list(held.iterdir()) == []  # nothing touched: the other run's lock file went with its release
    assert (runs / "2digits/uniform_scaling/seed1/results.json").exists()


def test_a_second_sweep_into_the_same_runs_dir_leaves_the_first_ones_cell_to_it(tmp_path, capsys):
    """Two sweeps of the same cells: the second starts while the first trains the cell, and says so."""
    runs = tmp_path / "R"
    args = ["--settings", "2digits", "--methods", "controlnet", "--seeds", "0", "--epochs", "50", "--subset", "300",
            "--device", "cpu", "--no_table", "--runs_dir", str(runs)]
    first = subprocess.Popen([sys.executable, "-m", "experiments.table2_sweep", *args], cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    cell = runs / "2digits/controlnet/seed0"
    try:
        deadline = time.monotonic() + 60
        while run_lock.holder(cell) is None and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        holder = run_lock.holder(cell)
        assert holder, first.communicate()[1]
        code = table2_sweep.main(args)
    finally:
        os.killpg(first.pid, signal.SIGINT)  # Ctrl-C: the first sweep and its run stop, resumable
        out, err = first.communicate(timeout=60)
    second = capsys.readouterr()
    assert code == 0 and "FAILED" not in second.out + second.err, second.err
    assert f"skipped 2digits/controlnet/seed0: in use by another run (pid {holder['pid']}" in second.out
    assert first.returncode == 130 and "FAILED" not in out + err


def test_a_cell_taken_or_finished_by_another_run_after_the_plan_is_left_to_it(tmp_path):
    """Between the plan and the start of a cell another sweep may take it or finish it: the cell is skipped; a run
    that stopped because of it is no failure either."""
    args = table2_sweep.parse_args(["--settings", "2digits", "--methods", "uniform_scaling", "--seeds", "0,1",
                                    "--runs_dir", str(tmp_path), *TINY])
    cells, bad = table2_sweep.plan(args, tmp_path)
    assert not bad and [cell["state"] for cell in cells] == ["start", "start"]
    taken, finished = cells
    taken["out"].mkdir(parents=True)
    run_lock.acquire(taken["out"], "the other sweep")
    try:
        finished_run(finished["out"], finished["params"])
        ran, left_out = table2_sweep.launch([taken, finished], args, None, None)
        assert ran == [] and [(cell["name"], state) for cell, state, _ in left_out] == \
            [("2digits/uniform_scaling/seed0", "busy"), ("2digits/uniform_scaling/seed1", "done")]
        stopped = "error: --out: ... is in use by another run (pid 1 ...)\n"
        assert table2_sweep.outcome(taken, args, 2, stopped)[0] == "busy"
        assert table2_sweep.outcome(finished, args, 2, stopped) == \
            ("finished_meanwhile", "skipped 2digits/uniform_scaling/seed1: finished by another run meanwhile")
    finally:
        run_lock.release(taken["out"])
    kind, line = table2_sweep.outcome(taken, args, 2, stopped)  # nobody holds it, nothing finished: a failure
    assert kind == "failed" and line.startswith("FAILED 2digits/uniform_scaling/seed0 (exit 2): error: --out")


def test_a_finished_cell_of_other_params_is_a_conflict_not_done(tmp_path, capsys):
    """Done means: the same epochs, subset and params (here a run without the --set of this sweep)."""
    args = ["--settings", "2digits", "--methods", "uniform_scaling", "--seeds", "0", "--runs_dir", str(tmp_path),
            *TINY, "--dry_run"]
    defaults = table2_sweep.cell_params(table2_sweep.parse_args(args), "2digits", "uniform_scaling")
    finished_run(tmp_path / "2digits/uniform_scaling/seed0", defaults)
    assert table2_sweep.main(args) == 0
    assert capsys.readouterr().out.startswith("done     2digits/uniform_scaling/seed0\n")
    assert table2_sweep.main(args + ["--set", "lr=0.003"]) == 0
    assert "conflict 2digits/uniform_scaling/seed0  (holds a finished run with other params (lr 0.001 (here " \
           "0.003)); use another --runs_dir)" in capsys.readouterr().out


# --- progress: epoch x/N of the running cells, the time left, the sweep log -------------------------------------

def metrics(out, times):
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps({"epoch": epoch, "epoch_time_s": seconds}) + "\n"
                                               for epoch, seconds in enumerate(times, start=1)))


def cell(tmp_path, method, seed, setting="2digits"):
    return {"name": f"{setting}/{method}/seed{seed}", "setting": setting, "method": method,
            "out": tmp_path / setting / method / f"seed{seed}"}


def test_time_left_from_the_cells_epoch_times(tmp_path):
    """10 epochs per cell, 2 workers. Running: a seed at epoch 4 (median epoch time 10 s): 6 x 10 = 60 s. Queued:
    its next seed, timed by it: 10 x 10 = 100 s; a ch_mod seed timed by a finished ch_mod seed (5 s): 50 s; an MGDA
    seed nobody has timed. Time left: max(60, (60 + 100 + 50) / 2) = 105 s, one cell not timed."""
    running, next_seed, ch_mod, mgda = (cell(tmp_path, "controlnet", 0), cell(tmp_path, "controlnet", 1),
                                        cell(tmp_path, "ch_mod", 1), cell(tmp_path, "mgda", 0))
    done = cell(tmp_path, "ch_mod", 0)
    metrics(done["out"], [5.0] * 10)
    shown = Progress([[running], [next_seed], [ch_mod], [mgda]], [done], 10, 2, tmp_path / "sweep.log", 60,
                     bars=False, plain=True)
    metrics(running["out"], [10.0, 10.0, 10.0, 30.0])
    shown.started([running])
    states = {running["name"]: (running, 4, 10.0)}
    assert shown.time_left(states) == (105.0, 1)
    line = shown.status_line(states, 105.0, 1)
    assert line.startswith("status: 1 of 5 cells done, ") and "running: 2digits/controlnet/seed0 epoch 4/10 " \
        "(10.0 s/epoch); time left about 2 min + 1 cell(s) not yet timed" in line
    shown.finished([running], failed=0)
    assert shown.time_left({}) == ((100 + 50) / 2, 1)


def test_your_own_param_file_runs_as_the_cell_and_the_sweep_log_has_no_bar_frames(tmp_path):
    """--params_dir: an edited copy (lr 0.003) trains as the cell, seed 2 of ``--seeds 2``; the sweep log has the
    command, the events and status lines (epoch x/N), each with its time, and no progress-bar frames."""
    params = tmp_path / "mine"
    params.mkdir()
    edited = json.loads((REPO / "params/mmnist_2digits_uniform_scaling.json").read_text())
    (params / "mmnist_2digits_uniform_scaling.json").write_text(json.dumps({**edited, "lr": 0.003}))
    runs = tmp_path / "R"
    proc = sweep("--settings", "2digits", "--methods", "uniform_scaling", "--seeds", 2, "--params_dir", params,
                 "--runs_dir", runs, "--status_every", 0.5, *TINY)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((runs / "2digits/uniform_scaling/seed2/results.json").read_text())
    assert results["seed"] == 2 and results["params"]["lr"] == 0.003
    assert f"--param_file {params / 'mmnist_2digits_uniform_scaling.json'}" in results["command"]
    assert sorted(path.name for path in runs.iterdir()) == ["2digits", "sweep.json", "sweep.log"]

    log = (runs / "sweep.log").read_text()
    assert "\r" not in log and "\x1b" not in log and "|" not in log  # no bar frames
    lines = log.splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00 ", line) for line in lines)
    texts = [line.split(" ", 1)[1] for line in lines]
    assert texts[0].startswith("start: python -m experiments.table2_sweep --settings 2digits")
    assert "started 2digits/uniform_scaling/seed2" in texts
    assert any(text.startswith("finished 2digits/uniform_scaling/seed2: test accuracy ") for text in texts)
    status = [text for text in texts if text.startswith("status: ")]
    assert status and all(re.search(r"running: (none|2digits/uniform_scaling/seed2 epoch [01]/1)", text)
                          for text in status)
    assert texts[-1] == "sweep: 1 trained, 0 failed"
    for text in texts[1:]:  # stdout (not a terminal here) shows the same lines, without their times
        assert text in proc.stdout


# --- seeds and your own param files ------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,seeds", [([], [0, 1, 2, 3, 4]), (["--seeds", "3"], [3]), (["--seeds", "0,"], [0]),
                                        (["--seeds", "0,2,7"], [0, 2, 7]), (["--n_seeds", "3"], [0, 1, 2])])
def test_seeds_a_single_seed_a_list_or_a_count(argv, seeds):
    assert table2_sweep.parse_args(argv).seeds == seeds


@pytest.mark.parametrize("argv,message", [
    (["--seeds", "3", "--n_seeds", "2"], "argument --n_seeds: not allowed with argument --seeds"),
    (["--seeds", "-1"], "a number of seeds is --n_seeds N"),
    (["--seeds", "two"], "a number of seeds is --n_seeds N"),
    (["--params_dir", "no/such/folder"], "argument --params_dir: no/such/folder is not a folder")])
def test_bad_seeds_or_params_dir_is_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        table2_sweep.parse_args(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err


# --- the Slurm job array -----------------------------------------------------------------------------------------

def array_task(task_id, count, minimum, step=None, *extra):
    """The command one task of ``sbatch --array`` runs (the template with PYTHON=echo prints it)."""
    env = {**os.environ, "PYTHON": "echo", "SLURM_ARRAY_TASK_ID": str(task_id), "SLURM_ARRAY_TASK_COUNT": str(count),
           "SLURM_ARRAY_TASK_MIN": str(minimum), "SLURM_SUBMIT_DIR": str(REPO)}
    if step is not None:
        env["SLURM_ARRAY_TASK_STEP"] = str(step)
    return subprocess.run(["bash", str(REPO / "experiments/table2_sweep.slurm"), *extra], capture_output=True,
                          text=True, env=env)


@pytest.mark.parametrize("ids,step", [(range(0, 8), None), (range(1, 4), 1), (range(1, 16, 2), 2),
                                      (range(0, 80), None)])
def test_the_job_array_runs_every_cell_exactly_once(ids, step):
    ids = list(ids)
    grid = [(setting, method) for setting in table2_sweep.SETTINGS for method in table2_sweep.METHODS]
    seen = []
    for task_id in ids:
        proc = array_task(task_id, len(ids), ids[0], step, "--runs_dir", "runs/x")
        assert proc.returncode == 0, proc.stderr
        words = proc.stdout.split()
        assert words[:2] == ["-m", "experiments.table2_sweep"] and words[-2:] == ["--runs_dir", "runs/x"]
        args = table2_sweep.parse_args(words[2:])
        assert args.no_table
        seen += table2_sweep.grid(args.settings, args.methods, *args.shard)
    assert sorted(seen) == sorted(grid) and len(seen) == len(set(seen))


def test_the_shards_of_the_array_list_the_cells_of_their_places(tmp_path, capsys):
    """What a task's sweep runs is its shard's places of the grid (here 3 tasks of 1 setting x 4 methods)."""
    listed = []
    for task_id in range(3):
        words = array_task(task_id, 3, 0).stdout.split()[2:]
        argv = words + ["--settings", "2digits", "--methods", "single_task,mgda,ch_mod,controlnet", "--seeds", "0",
                        "--runs_dir", str(tmp_path), "--dry_run"]
        assert table2_sweep.main(argv) == 0
        listed.append([line.split()[1] for line in capsys.readouterr().out.splitlines()[:-1]])
    assert listed == [["2digits/single_task/seed0", "2digits/controlnet/seed0"], ["2digits/mgda/seed0"],
                      ["2digits/ch_mod/seed0"]]


def test_the_template_outside_an_array_is_one_line_and_exit_2():
    proc = subprocess.run(["bash", str(REPO / "experiments/table2_sweep.slurm")], capture_output=True, text=True,
                          env={key: value for key, value in os.environ.items() if not key.startswith("SLURM_")})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: not a task of a job array; submit with: sbatch --array=0-<N-1>")


def test_tensorboard_is_an_optional_extra_named_in_the_readme():
    extras = [line.split("#")[0].strip() for line in (REPO / "requirements-extra.txt").read_text().splitlines()]
    assert any(re.match(r"tensorboard\b", line) for line in extras)
    assert "pip install -r requirements-extra.txt" in (REPO / "README.md").read_text()
