"""Reproduce Table 2 (Multi-MNIST): train every method x setting x seed, resumably, then build the table.

    python -m experiments.table2_sweep                      # the paper's protocol: every method (table2.METHODS) x 4 settings x 5 seeds, 100 epochs
    python -m experiments.table2_sweep --methods controlnet,ch_mod --settings 9digits --seeds 3 --workers 4 --device cuda
    python -m experiments.table2_sweep --dry_run            # what would run, what is done

Each cell trains params/mmnist_<setting>_<method>.json with train_multi_task_counter_stream.py into
<runs_dir>/<setting>/<method>/seed<k>. A cell whose results.json has the same epochs and subset is done and
never redone; a cell with a checkpoint but no results is resumed; the others start fresh. Interrupt and rerun
the same command to continue. A failing cell is reported (stderr tail in its stderr.txt) and the sweep goes on;
the exit code is 1 if any cell failed (or holds a run of another protocol). Every invocation is logged in <runs_dir>/sweep.json; then
experiments/table2.py writes <out_dir>/table2.{json,md}. With --stacked the seeds of a cell that start together (or
resume from the same epoch) train in one process as one stacked model (the training script's --seeds,
docs/stacked.md), with the same files; --shard K/N takes every N-th cell of the settings x methods grid from the
K-th (a job array, N hosts).
"""
import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from runtime import files
from training import cli
from experiments import table2
from runtime.files import REPO

SCRIPT = REPO / "train_multi_task_counter_stream.py"
METHODS = table2.METHODS
SETTINGS = tuple(table2.SETTINGS)
GPU_WORKERS = 4  # default concurrent runs on one GPU (LeNet-sized models leave it mostly idle one at a time)


def parse_args(argv):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=cli.positive_int, default=100, help="epochs per run (default 100, the paper's)")
    parser.add_argument("--seeds", type=cli.seed_list, default=list(range(5)),
                        help="a count (default 5: seeds 0..4) or a comma list of seeds")
    parser.add_argument("--methods", type=cli.comma_list(METHODS, "method"), default=list(METHODS),
                        help=f"comma list (default all): {','.join(METHODS)}")
    parser.add_argument("--settings", type=cli.comma_list(SETTINGS, "setting"), default=list(SETTINGS),
                        help=f"comma list (default all): {','.join(SETTINGS)}")
    parser.add_argument("--subset", type=cli.positive_int, help="train on N images (N/5 val/test): smoke sweeps only")
    cli.set_argument(parser)
    parser.add_argument("--workers", type=cli.positive_int,
                        help=f"training processes at once: on CPU (default 1) each gets cores // N threads; "
                             f"on a GPU (default {GPU_WORKERS}) they share it")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--runs_dir", default="runs/table2", help="cells go to <runs_dir>/<setting>/<method>/seed<k>")
    parser.add_argument("--out_dir", default="runs/tables", help="where experiments/table2.py writes table2.{json,md} "
                        "(default runs/tables: a committed table is only replaced when its folder is named)")
    parser.add_argument("--stacked", action="store_true", help="train the seeds of a cell in one process as one "
                        "stacked model (--seeds; the methods whose weighting has a stacked form)")
    parser.add_argument("--shard", type=shard, default=(1, 1), metavar="K/N",
                        help="only the cells (a method on a setting, all its seeds) at places K, K+N, K+2N, ... of "
                             "the settings x methods grid (default 1/1: all)")
    parser.add_argument("--no_table", action="store_true", help="only train, do not build the table")
    parser.add_argument("--dry_run", action="store_true", help="list the cells and their state, train nothing")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        parser.error(f"argument --device: unknown device {args.device!r}; valid choices: auto, cpu, cuda, cuda:N")
    return args


def shard(text):
    """'K/N' -> (K, N) with 1 <= K <= N."""
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise argparse.ArgumentTypeError(f"expected K/N with 1 <= K <= N (e.g. 2/4), got {text!r}")
    return int(match[1]), int(match[2])


def jobs_of(todo, stacked, overrides):
    """The training processes of the sweep, each a list of cells: one cell each, or with ``stacked`` the seeds of a
    stackable method's cell (``training.engine.check_stackable``) that start together or resume from the same epoch
    (torch is imported only here)."""
    if not stacked:
        return [[cell] for cell in todo]
    from loaders import NUM_TASKS
    from training import checkpoint, config, engine

    def group(cell):
        """The cell's group key; its name (alone) for a method that does not stack or a checkpoint that the run
        will report."""
        try:
            params = config.load_params(REPO / "params" / f"mmnist_{cell['setting']}_{cell['method']}.json", overrides)
            engine.check_stackable(params, NUM_TASKS[params["setting"]], "auto")
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


def cell_state(out, epochs, subset):
    """('done' | 'resume' | 'start' | 'conflict', why the dir cannot take this run or None)."""
    if (out / "results.json").exists():
        try:
            done = json.loads((out / "results.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            return "conflict", f"unreadable results.json ({err}); move the dir away to rerun it"
        if (done.get("epochs"), done.get("subset")) == (epochs, subset):
            return "done", None
        return "conflict", (f"holds a finished run with epochs {done.get('epochs')}, subset {done.get('subset')}; "
                            f"use another --runs_dir")
    return ("resume" if (out / "checkpoint.pt").exists() else "start"), None


def progress(out, epochs):
    """How far a resumable cell got, from its metrics.jsonl: 'epoch k of N' and, when the run records its epoch
    times, the seconds per epoch lately and the time left; None when it has no readable epoch record yet (a line
    being written, or unreadable, is skipped)."""
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records.append(record)
    if not records:
        return None
    times = [record["epoch_time_s"] for record in records[-10:] if "epoch_time_s" in record]
    epoch = records[-1]["epoch"]
    text = f"epoch {epoch} of {epochs}"
    if times:
        per_epoch = sum(times) / len(times)
        text += f"; {per_epoch:.1f} s per epoch lately: about {per_epoch * (epochs - epoch) / 3600:.1f} h left"
    return text


def run_job(job, args, env):
    """Trains the cells of one job in a subprocess (one seed, or with several a stacked group into their cell's
    folder); returns (job, return code, stderr)."""
    cell = job[0]
    param_file = REPO / "params" / f"mmnist_{cell['setting']}_{cell['method']}.json"
    command = [sys.executable, str(SCRIPT), "--param_file", str(param_file), "--epochs", str(args.epochs),
               "--device", args.device]
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
    proc = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return job, proc.returncode, proc.stderr


def report_failure(cell, returncode, stderr):
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()][-40:]
    files.write_text("\n".join(lines) + "\n", cell["out"] / "stderr.txt")
    errors = [line for line in lines if line.startswith("error:")] or lines or ["(no stderr)"]
    return f"FAILED {cell['name']} (exit {returncode}): {errors[-1]}  [stderr tail: {cell['out'] / 'stderr.txt'}]"


def main(argv=None):
    args = parse_args(argv)
    command = cli.command_line(__spec__.name, argv)
    runs_dir = Path(args.runs_dir).resolve()
    cells = []
    part, parts = args.shard
    for place, (setting, method) in enumerate(itertools.product(args.settings, args.methods)):
        if place % parts != part - 1:  # another shard's cell
            continue
        for seed in args.seeds:
            out = runs_dir / setting / method / f"seed{seed}"
            state, why = cell_state(out, args.epochs, args.subset)
            cells.append({"setting": setting, "method": method, "seed": seed, "out": out,
                          "name": f"{setting}/{method}/seed{seed}", "state": state, "why": why})
    todo = [cell for cell in cells if cell["state"] in ("start", "resume")]
    conflicts = [cell for cell in cells if cell["state"] == "conflict"]
    num_done = len(cells) - len(todo) - len(conflicts)
    protocol = f"{args.epochs} epochs" + (f", subset {args.subset}" if args.subset else "")
    num_resume = sum(cell["state"] == "resume" for cell in todo)
    summary = (f"{len(cells)} cell(s) ({protocol}): {num_done} done, {num_resume} to resume, "
               f"{len(todo) - num_resume} to start" + (f", {len(conflicts)} in conflict" if conflicts else ""))
    if args.dry_run:
        for cell in cells:
            why = cell["why"] or (progress(cell["out"], args.epochs) if cell["state"] == "resume" else None)
            print(f"{cell['state']:<8} {cell['name']}" + (f"  ({why})" if why else ""))
        print(summary)
        return 0
    for cell in conflicts:
        print(f"skipped {cell['name']}: {cell['why']}", file=sys.stderr)

    device = device_type(args.device)
    if device is None:
        print(f"error: --device {args.device}: CUDA is not available here; use auto or cpu", file=sys.stderr)
        return 2
    workers = args.workers or (GPU_WORKERS if device == "cuda" else 1)
    env = dict(os.environ)
    if device == "cpu" and workers > 1:  # share the cores; torch sizes its thread pool from OMP_NUM_THREADS
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    jobs = jobs_of(todo, args.stacked, args.set)
    shard_note = f" (shard {part}/{parts})" if parts > 1 else ""
    print(f"{summary}; running {len(todo)} in {len(jobs)} process(es){shard_note} on {device} with {workers} "
          f"worker(s)", flush=True)

    start, wall_start = datetime.now(timezone.utc), time.perf_counter()
    finished, failed = 0, []
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        with tqdm(total=len(cells), initial=num_done, unit="cell", desc="table 2 sweep") as bar:
            futures = [pool.submit(run_job, job, args, env) for job in jobs]
            for future in as_completed(futures):
                job, returncode, stderr = future.result()
                finished += len(job)
                for cell in job:
                    if returncode == 0:
                        (cell["out"] / "stderr.txt").unlink(missing_ok=True)
                    else:
                        failed.append(cell)
                        tqdm.write(report_failure(cell, returncode, stderr), file=sys.stderr)
                        bar.set_postfix(failed=len(failed))
                bar.update(len(job))
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to continue (finished cells are kept, the others resume)",
              file=sys.stderr)
        return 130
    finally:
        pool.shutdown(cancel_futures=True)  # on Ctrl-C, start no further cell
        log_invocation(runs_dir, {"start": start.isoformat(timespec="seconds"),
                                  "end": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                  "wall_s": round(time.perf_counter() - wall_start, 2), "cells_run": finished,
                                  "cells_failed": len(failed), "workers": workers, "device": device,
                                  "command": command})
    print(f"sweep: {len(todo) - len(failed)} of {len(todo)} cells trained, {len(failed) + len(conflicts)} failed or "
          f"skipped, {num_done} were already done")
    if not args.no_table:
        table = table2.aggregate(args.runs_dir, (args.epochs, args.subset))
        if table["num_runs"] == 0:
            print(f"no finished run of this protocol under {args.runs_dir}: no table written", file=sys.stderr)
        for path in table2.write_tables(table, args.out_dir) if table["num_runs"] else ():
            print(f"wrote {path}")
    return 1 if failed or conflicts else 0


def log_invocation(runs_dir, entry):
    """Appends one invocation to <runs_dir>/sweep.json, whose total_wall_s sums all of them."""
    path = runs_dir / "sweep.json"
    log = json.loads(path.read_text()) if path.exists() else {"invocations": []}
    log["invocations"].append(entry)
    log["total_wall_s"] = round(sum(item["wall_s"] for item in log["invocations"]), 2)
    runs_dir.mkdir(parents=True, exist_ok=True)
    files.write_json(log, path)


if __name__ == "__main__":
    cli.exit_with(main)
