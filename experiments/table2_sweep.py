"""Reproduce Table 2 (Multi-MNIST): train every method x setting x seed, resumably, then build the table.

    python -m experiments.table2_sweep                      # the paper's protocol: every method (table2.METHODS) x 4 settings x 5 seeds, 100 epochs
    python -m experiments.table2_sweep --methods controlnet,ch_mod --settings 9digits --seeds 3 --workers 4 --device cuda
    python -m experiments.table2_sweep --dry_run            # what would run, what is done

Each cell trains <params_dir>/mmnist_<setting>_<method>.json (default params/) with
train_multi_task_counter_stream.py into <runs_dir>/<setting>/<method>/seed<k>; --seeds names the seeds (3 is seed 3,
0,2,7 a list), --n_seeds N means seeds 0..N-1 (default 5). Every cell's param file and --set overrides are checked
before anything runs (one line per bad cell, exit code 2). A cell whose results.json has the same epochs, subset and
params is done and never redone; a cell with a checkpoint but no results is resumed; a cell that another run (a
second sweep into the same --runs_dir) holds is left to it; the others start fresh. Interrupt and rerun the same
command to continue. A cell that fails while running is reported with its own last error line (its stderr in its
folder's stderr.txt) and the sweep goes on; the summary names every failed cell, and the exit code is 1 if any
failed (or holds a run of another protocol). The sweep shows each running cell's epoch and its own time left
(experiments/sweep_progress.py) and logs every event and status line in <runs_dir>/sweep.log; every invocation is
recorded in <runs_dir>/sweep.json; then experiments/table2.py writes <out_dir>/table2.{json,md}. With --stacked the
seeds of a cell that start together (or resume from the same epoch) train in one process as one stacked model (the
training script's --seeds, docs/stacked.md), with the same files; --shard K/N takes every N-th cell of the
settings x methods grid from the K-th (a job array, N hosts: experiments/table2_sweep.slurm).
"""
import argparse
import fcntl
import functools
import itertools
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from datetime import datetime, timezone
from pathlib import Path

from runtime import files
from training import cli, config, run_lock
from experiments import table2
from experiments import sweep_progress
from experiments.sweep_progress import Progress, cell_progress
from runtime.files import REPO

SCRIPT = REPO / "train_multi_task_counter_stream.py"
PARAMS_DIR = table2.PARAMS_DIR
METHODS = table2.METHODS
SETTINGS = tuple(table2.SETTINGS)
GPU_WORKERS = 4  # default concurrent runs on one GPU (LeNet-sized models leave it mostly idle one at a time)
REFRESH_S = 1.0  # how often the bars are redrawn
# params that a finished cell may differ in and still be this sweep's run: its name, its epochs (compared as the
# run's own) and the keys that do not change what is trained
IGNORED_PARAMS = ("exp_id", "epochs", *table2.NEUTRAL_KEYS)


def parse_args(argv):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=cli.positive_int, default=100, help="epochs per run (default 100, the paper's)")
    cli.seed_arguments(parser)
    parser.add_argument("--methods", type=cli.comma_list(METHODS, "method"), default=list(METHODS),
                        help=f"comma list (default all): {','.join(METHODS)}")
    parser.add_argument("--settings", type=cli.comma_list(SETTINGS, "setting"), default=list(SETTINGS),
                        help=f"comma list (default all): {','.join(SETTINGS)}")
    parser.add_argument("--params_dir", type=Path, default=PARAMS_DIR, help="the folder of the cells' param files, "
                        "named mmnist_<setting>_<method>.json (default params/): your own edited copies run as the "
                        "cells")
    parser.add_argument("--subset", type=cli.positive_int, help="train on N images (N/5 val/test): smoke sweeps only")
    cli.set_argument(parser)
    parser.add_argument("--workers", type=cli.positive_int,
                        help=f"training processes at once: on CPU (default 1) each gets cores // N threads; "
                             f"on a GPU (default {GPU_WORKERS}) they share it")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--runs_dir", default="runs/table2", help="cells go to <runs_dir>/<setting>/<method>/seed<k>; "
                        "the sweep's log to <runs_dir>/sweep.log")
    parser.add_argument("--out_dir", default="runs/tables", help="where experiments/table2.py writes table2.{json,md} "
                        "(default runs/tables: a committed table is only replaced when its folder is named)")
    parser.add_argument("--stacked", action="store_true", help="train the seeds of a cell in one process as one "
                        "stacked model (--seeds; the methods whose weighting has a stacked form)")
    parser.add_argument("--shard", type=shard, default=(1, 1), metavar="K/N",
                        help="only the cells (a method on a setting, all its seeds) at places K, K+N, K+2N, ... of "
                             "the settings x methods grid (default 1/1: all)")
    parser.add_argument("--status_every", type=cli.positive_float, default=60.0, metavar="SECONDS",
                        help="seconds between status lines (running cells' epochs, time left) in the sweep log and "
                             "on a stdout that is not a terminal (default 60)")
    parser.add_argument("--no_table", action="store_true", help="only train, do not build the table")
    parser.add_argument("--dry_run", action="store_true", help="list the cells and their state, train nothing")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        parser.error(f"argument --device: unknown device {args.device!r}; valid choices: auto, cpu, cuda, cuda:N")
    if not args.params_dir.is_dir():
        parser.error(f"argument --params_dir: {args.params_dir} is not a folder")
    return args


def shard(text):
    """'K/N' -> (K, N) with 1 <= K <= N."""
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise argparse.ArgumentTypeError(f"expected K/N with 1 <= K <= N (e.g. 2/4), got {text!r}")
    return int(match[1]), int(match[2])


def grid(settings, methods, part, parts):
    """The (setting, method) places of the grid in shard ``part`` of ``parts``: every ``parts``-th from the
    ``part``-th."""
    return [place for index, place in enumerate(itertools.product(settings, methods)) if index % parts == part - 1]


def param_file(args, setting, method):
    return Path(getattr(args, "params_dir", None) or PARAMS_DIR) / f"mmnist_{setting}_{method}.json"


def cell_params(args, setting, method):
    """The params a cell trains with (its param file, ``--set``), checked as the training script checks them, and
    naming the cell's own method and setting; ParamError (one line) otherwise."""
    path = param_file(args, setting, method)
    params = config.load_params(path, args.set)
    for key, value in (("method", method), ("setting", setting)):
        if params[key] != value:
            raise config.ParamError(f"{path}: key '{key}' is {params[key]!r}, but the file names the cell "
                                    f"{setting}/{method} (mmnist_<setting>_<method>.json)")
    return params


def plan(args, runs_dir):
    """(the cells of this shard with their state, one line per (setting, method) whose params do not check)."""
    cells, bad = [], []
    for setting, method in grid(args.settings, args.methods, *args.shard):
        try:
            params = cell_params(args, setting, method)
        except config.ParamError as err:
            bad.append(f"{setting}/{method}: {err}")
            continue
        for seed in args.seeds:
            out = runs_dir / setting / method / f"seed{seed}"
            state, why = cell_state(out, args.epochs, args.subset, params)
            cells.append({"setting": setting, "method": method, "seed": seed, "out": out, "params": params,
                          "name": f"{setting}/{method}/seed{seed}", "state": state, "why": why})
    return cells, bad


def jobs_of(todo, stacked):
    """The training processes of the sweep, each a list of cells: one cell each, or with ``stacked`` the seeds of a
    stackable method's cell (``training.engine.check_stackable``) that start together or resume from the same
    epoch."""
    if not stacked:
        return [[cell] for cell in todo]
    from loaders import NUM_TASKS
    from training import checkpoint, engine

    def group(cell):
        """The cell's group key; its name (alone) for a method that does not stack or a checkpoint that the run
        will report."""
        try:
            engine.check_stackable(cell["params"], NUM_TASKS[cell["setting"]], "auto")
            epoch = checkpoint.load(cell["out"] / "checkpoint.pt")["epoch"] if cell["state"] == "resume" else 0
        except (config.ParamError, checkpoint.CheckpointError, OSError, KeyError, TypeError):
            return cell["name"]
        return cell["setting"], cell["method"], epoch

    groups = {}
    for cell in todo:
        groups.setdefault(group(cell), []).append(cell)
    return list(groups.values())


def device_type(name):
    """'cuda' or 'cpu', as the training script resolves --device (torch is imported only here: fast --dry_run)."""
    import torch
    if name.startswith("cuda") and not torch.cuda.is_available():
        return None
    return "cuda" if name.startswith("cuda") or (name == "auto" and torch.cuda.is_available()) else "cpu"


def cell_state(out, epochs, subset, params=None):
    """('done' | 'resume' | 'start' | 'busy' | 'conflict', why the dir cannot take this run or None). With
    ``params`` (the cell's), a finished run is done only if it was trained with them too; 'busy': another live
    process (a second sweep) holds the folder's run lock."""
    if (out / "results.json").exists():
        try:
            done = json.loads((out / "results.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            return "conflict", f"unreadable results.json ({err}); move the dir away to rerun it"
        if (done.get("epochs"), done.get("subset")) != (epochs, subset):
            return "conflict", (f"holds a finished run with epochs {done.get('epochs')}, subset {done.get('subset')}; "
                                f"use another --runs_dir")
        differ = other_params(done, params) if params is not None else []
        if differ:
            return "conflict", f"holds a finished run with other params ({', '.join(differ)}); use another --runs_dir"
        return "done", None
    holder = run_lock.holder(out)
    if holder is not None:
        return "busy", f"in use by another run ({run_lock.describe(holder)}); left to it"
    return ("resume" if (out / "checkpoint.pt").exists() else "start"), None


def other_params(done, params):
    """The params in which a finished run differs from ``params``: 'key recorded (here value)'. A key the run's
    record lacks (a run older than the key) reads as what the training script fills in for it today."""
    recorded = done.get("params", {})
    defaults = method_defaults(params["method"], params["dataset"], params["setting"])
    differ = []
    for key, value in params.items():
        before = recorded.get(key, defaults.get(key))
        if key not in IGNORED_PARAMS and before != value:
            differ.append(f"{key} {json.dumps(before)} (here {json.dumps(value)})")
    return differ


@functools.lru_cache(maxsize=None)
def method_defaults(method, dataset, setting):
    """The params of a minimal param file of this method, data set and setting (every other key its default)."""
    return config.validate({"exp_id": "defaults", "method": method, "dataset": dataset, "setting": setting},
                           "defaults")


def progress(out, epochs):
    """How far a resumable cell got, from its metrics.jsonl: 'epoch k of N' and, when the run records its epoch
    times, the median seconds per epoch lately and the time left; None when it has no readable epoch record yet."""
    epoch, per_epoch = cell_progress(out)
    if not epoch:
        return None
    text = f"epoch {epoch} of {epochs}"
    if per_epoch is not None:
        text += f"; {per_epoch:.1f} s per epoch lately: about {per_epoch * (epochs - epoch) / 3600:.1f} h left"
    return text


def run_job(job, args, env, started=None):
    """Trains the cells of one job in a subprocess (one seed, or with several a stacked group into their cell's
    folder), its stderr streamed into the first cell's stderr.txt (every cell's folder is made first); calls
    ``started(job)`` as it starts; returns (job, return code, stderr)."""
    cell = job[0]
    command = [sys.executable, str(SCRIPT), "--param_file", str(param_file(args, cell["setting"], cell["method"])),
               "--epochs", str(args.epochs), "--device", args.device]
    if len(job) == 1:
        command += ["--seed", str(cell["seed"]), "--out", str(cell["out"])]
    else:
        command += ["--seeds", ",".join(str(c["seed"]) for c in job), "--out", str(cell["out"].parent)]
    if args.subset:
        command += ["--subset", str(args.subset)]
    for setting in args.set:
        command += ["--set", setting]
    if cell["state"] == "resume":
        command.append("--resume")
    stderr_path = cell["out"] / "stderr.txt"
    try:
        for each in job:
            each["out"].mkdir(parents=True, exist_ok=True)
            (each["out"] / "stderr.txt").unlink(missing_ok=True)  # a failure of before: this run's replaces it
        with open(stderr_path, "w", encoding="utf-8") as stderr:
            if started is not None:
                started(job)
            returncode = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr).returncode
        return job, returncode, stderr_path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        return job, 1, f"error: cannot run the cell in {cell['out']}: {err.strerror or err}"


def report_failure(cell, returncode, stderr):
    """'FAILED <cell> (exit N): <its last error line>'; its stderr.txt keeps the run's stderr (the cells of a stacked
    group other than the first, which holds the whole stream, and a run that could not write it get its last 40
    lines)."""
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()][-40:]
    errors = [line for line in lines if line.startswith("error:")] or lines or ["(no stderr)"]
    saved = cell["out"] / "stderr.txt"
    try:
        if not saved.exists():
            cell["out"].mkdir(parents=True, exist_ok=True)
            files.write_text("\n".join(lines) + "\n", saved)
        where = f"  [stderr: {saved}]"
    except OSError as err:
        where = f"  [stderr not kept: {err.strerror or err}]"
    return f"FAILED {cell['name']} (exit {returncode}): {errors[-1]}{where}"


def launch(job, args, env, progress):
    """Runs one job, less the cells that another sweep has taken or finished since the plan: ([(job run, return
    code, stderr)], [(cell, its state now, why) of the cells left out]). A stacked group whose cells no longer
    start alike runs one cell after the other."""
    left_out = []
    for cell in job:
        cell["state"], why = cell_state(cell["out"], args.epochs, args.subset, cell["params"])
        if cell["state"] not in ("start", "resume"):
            left_out.append((cell, cell["state"], why or "finished by another run meanwhile"))
    job = [cell for cell in job if cell["state"] in ("start", "resume")]
    if not job:
        return [], left_out
    parts = [job] if len({cell["state"] for cell in job}) == 1 else [[cell] for cell in job]
    return [run_job(part, args, env, progress.started) for part in parts], left_out


def outcome(cell, args, returncode, stderr):
    """How a cell of a job that ended came out: ('trained' | 'finished_meanwhile' | 'busy' | 'failed', the line to
    report). A run that stopped because another sweep holds or finished its cell is no failure."""
    if returncode == 0:
        (cell["out"] / "stderr.txt").unlink(missing_ok=True)
        return "trained", f"finished {cell['name']}" + result_note(cell["out"])
    state, why = cell_state(cell["out"], args.epochs, args.subset, cell["params"])
    if state == "done":
        (cell["out"] / "stderr.txt").unlink(missing_ok=True)
        return "finished_meanwhile", f"skipped {cell['name']}: finished by another run meanwhile"
    if state == "busy":
        return "busy", f"skipped {cell['name']}: {why}"
    return "failed", report_failure(cell, returncode, stderr)


def result_note(out):
    """': test accuracy 95.12 at the best-validation epoch 60, 1.4 h' from a finished run's results.json."""
    try:
        done = json.loads((out / "results.json").read_text())
        return (f": test accuracy {done['test_acc_mean']:.2f} at the best-validation epoch {done['best_epoch']}, "
                f"{sweep_progress.duration(done['wall_time_s'])}")
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def main(argv=None):
    args = parse_args(argv)
    command = cli.command_line(__spec__.name, argv)
    runs_dir = Path(args.runs_dir).resolve()
    cells, bad = plan(args, runs_dir)
    if bad:
        for line in bad:
            print(f"error: {line}", file=sys.stderr)
        print(f"nothing was run: {len(bad)} cell(s) above cannot run; fix them or leave them out (--methods, "
              f"--settings)", file=sys.stderr)
        return 2
    summary = describe(cells, args)
    if args.dry_run:
        for cell in cells:
            why = cell["why"] or (progress(cell["out"], args.epochs) if cell["state"] == "resume" else None)
            print(f"{cell['state']:<8} {cell['name']}" + (f"  ({why})" if why else ""))
        print(summary)
        return 0
    device = device_type(args.device)
    if device is None:
        print(f"error: --device {args.device}: CUDA is not available here; use auto or cpu", file=sys.stderr)
        return 2
    return train_cells(args, cells, summary, device, runs_dir, command)


def describe(cells, args):
    """'36 cell(s) (100 epochs): 20 done, 1 to resume, 15 to start[, k in use by another run][, k in conflict]'."""
    count = {state: sum(cell["state"] == state for cell in cells) for state in ("done", "resume", "start", "busy",
                                                                               "conflict")}
    protocol = f"{args.epochs} epochs" + (f", subset {args.subset}" if args.subset else "")
    return (f"{len(cells)} cell(s) ({protocol}): {count['done']} done, {count['resume']} to resume, "
            f"{count['start']} to start" + (f", {count['busy']} in use by another run" if count["busy"] else "") +
            (f", {count['conflict']} in conflict" if count["conflict"] else ""))


def train_cells(args, cells, summary, device, runs_dir, command):
    """Trains the cells to start or resume, ``workers`` processes at a time, showing and logging their progress;
    then the summary and the table. The exit code: 1 if a cell failed or is in conflict, 130 on Ctrl-C, else 0."""
    todo = [cell for cell in cells if cell["state"] in ("start", "resume")]
    results = {state: [cell for cell in cells if cell["state"] == state] for state in ("done", "busy", "conflict")}
    results.update(trained=[], failed=[], finished_meanwhile=[])
    workers = args.workers or (GPU_WORKERS if device == "cuda" else 1)
    env = dict(os.environ)
    if device == "cpu" and workers > 1:  # share the cores; torch sizes its thread pool from OMP_NUM_THREADS
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    jobs = jobs_of(todo, args.stacked)
    runs_dir.mkdir(parents=True, exist_ok=True)
    shard_note = f" (shard {args.shard[0]}/{args.shard[1]})" if args.shard[1] > 1 else ""
    shown = Progress(jobs, results["done"], args.epochs, workers, runs_dir / "sweep.log", args.status_every,
                     tag=f"[shard {args.shard[0]}/{args.shard[1]}] " if shard_note else "")
    shown.write_log(f"start: {command}")
    for cell in results["conflict"] + results["busy"]:
        shown.say(f"skipped {cell['name']}: {cell['why']}", error=cell["state"] == "conflict")
    shown.say(f"{summary}; running {len(todo)} in {len(jobs)} process(es){shard_note} on {device} with {workers} "
              f"worker(s)")
    start, wall_start = datetime.now(timezone.utc), time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        pending = {pool.submit(launch, job, args, env, shown) for job in jobs}
        while pending:
            finished, pending = wait(pending, timeout=REFRESH_S, return_when=FIRST_COMPLETED)
            for future in finished:
                collect(future.result(), args, shown, results)
            shown.tick()
    except KeyboardInterrupt:
        shown.close()
        shown.say("interrupted: rerun the same command to continue (finished cells are kept, the others resume)",
                  error=True)
        return 130
    finally:
        pool.shutdown(cancel_futures=True)  # on Ctrl-C, start no further cell
        log_invocation(runs_dir, {"start": start.isoformat(timespec="seconds"),
                                  "end": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                  "wall_s": round(time.perf_counter() - wall_start, 2),
                                  "cells_run": len(results["trained"]) + len(results["failed"]),
                                  "cells_failed": len(results["failed"]),
                                  "cells_left_to_other_runs": len(results["busy"] + results["finished_meanwhile"]),
                                  "workers": workers, "device": device, "command": command})
    shown.close()
    finish(args, shown, results)
    return 1 if results["failed"] or results["conflict"] else 0


def collect(result, args, shown, results):
    """Reports the cells of one ended job, each into its list of ``results``."""
    ran, left_out = result
    shown.announce([cell for job, _, _ in ran for cell in job])  # started since the last tick: its start first
    for cell, state, why in left_out:
        shown.say(f"skipped {cell['name']}: {why}", error=state == "conflict")
        shown.left_out(cell, done=state == "done")
        results["finished_meanwhile" if state == "done" else state].append({**cell, "why": why})
    for job, returncode, stderr in ran:
        failed = 0
        for cell in job:
            kind, line = outcome(cell, args, returncode, stderr)
            results[kind].append({**cell, "why": line})
            shown.say(line, error=kind == "failed")
            failed += kind == "failed"
        shown.finished(job, failed)


def finish(args, shown, results):
    """The summary (every failed cell named again with its error), then the table."""
    counts = {"trained": "trained", "failed": "failed",
              "conflict": "in conflict (their folder holds a run of other settings)",
              "busy": "left to another run that holds them",
              "finished_meanwhile": "finished by another run meanwhile", "done": "done before"}
    shown.say("sweep: " + ", ".join(f"{len(results[key])} {what}" for key, what in counts.items()
                                     if results[key] or key in ("trained", "failed")))
    for cell in results["failed"]:
        shown.say(cell["why"], error=True)
    for cell in results["conflict"]:
        shown.say(f"CONFLICT {cell['name']}: {cell['why']}", error=True)
    if args.no_table:
        return
    table = table2.aggregate(args.runs_dir, (args.epochs, args.subset))
    if table["num_runs"] == 0:
        print(f"no finished run of this protocol under {args.runs_dir}: no table written", file=sys.stderr)
    for path in table2.write_tables(table, args.out_dir) if table["num_runs"] else ():
        shown.say(f"wrote {path}")


def log_invocation(runs_dir, entry):
    """Appends one invocation to <runs_dir>/sweep.json, whose total_wall_s sums all of them (under a lock on the
    folder: two sweeps may share it)."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    path = runs_dir / "sweep.json"
    folder = os.open(runs_dir, os.O_RDONLY)  # locked while the log is read and written
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        log = json.loads(path.read_text()) if path.exists() else {"invocations": []}
        log["invocations"].append(entry)
        log["total_wall_s"] = round(sum(item["wall_s"] for item in log["invocations"]), 2)
        files.write_json(log, path)
    finally:
        os.close(folder)


if __name__ == "__main__":
    cli.exit_with(main)
