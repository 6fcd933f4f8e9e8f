"""What the fidelity switches do (docs/fidelity.md): ControlNet and uniform scaling on 9 digits by location under
each Multi-MNIST resize (nearest, bicubic_clipped, bicubic_wrap) and each protocol (held_out, authors), one seed.

    python -m experiments.fidelity_switches run --epochs 10 --jobs 2   # trains the 12 runs into runs/fidelity_switches
    python -m experiments.fidelity_switches table --epochs 10 --results_dir results/fidelity_switches --table results/fidelity_switches.md

``run`` writes one param file per run (the shipped params/mmnist_9digits_<method>.json with ``resize`` and
``protocol`` set) and trains it with the training script, ``--jobs`` at a time, at ``nice -n 10`` with one thread
each; a finished run is skipped, a killed one resumed. ``table`` copies every finished run's results.json and
metrics.jsonl (no checkpoints) to --results_dir (default under runs/tables/) and writes the table of its three test figures: at the
best-validation epoch (held_out only), at the best test epoch (the authors' selection: optimistic) and at the last
epoch.
"""
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loaders.multi_mnist import RESIZES
from runtime import files
from runtime.files import REPO
from training import cli

METHODS = ("controlnet", "uniform_scaling")
PROTOCOLS = ("held_out", "authors")


def variants():
    """(method, resize, protocol) of every run, ControlNet's first so that the slow runs start early."""
    return [(method, resize, protocol) for method in METHODS for resize in RESIZES for protocol in PROTOCOLS]


def name_of(method, resize, protocol):
    return f"{method}_{resize}_{protocol}"


def parse_args(argv):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("run", "table"))
    parser.add_argument("--runs_dir", default="runs/fidelity_switches", help="where the runs train")
    parser.add_argument("--results_dir", default="runs/tables/fidelity_switches",
                        help="table: where results.json and metrics.jsonl are copied (default under runs/tables/)")
    parser.add_argument("--table", default="runs/tables/fidelity_switches.md",
                        help="table: the Markdown table (default under runs/tables/)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per run (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    parser.add_argument("--jobs", type=int, default=1, help="run: runs at a time")
    return parser.parse_args(argv)


def train(args, method, resize, protocol):
    name = name_of(method, resize, protocol)
    runs_dir = Path(args.runs_dir)
    out = runs_dir / name / f"seed{args.seed}"
    if (out / "results.json").exists():
        return f"{name}: done"
    params = json.loads((REPO / "params" / f"mmnist_9digits_{method}.json").read_text())
    params.update({"exp_id": f"fidelity_{name}", "resize": resize, "protocol": protocol})
    param_file = runs_dir / f"{name}.json"
    param_file.parent.mkdir(parents=True, exist_ok=True)
    param_file.write_text(json.dumps(params, indent=4) + "\n")
    command = ["nice", "-n", "10", sys.executable, "train_multi_task_counter_stream.py",
               "--param_file", str(param_file), "--epochs", str(args.epochs), "--seed", str(args.seed),
               "--device", "cpu", "--out", str(out)]
    if (out / "checkpoint.pt").exists():
        command.append("--resume")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(runs_dir / f"{name}.log", "a") as log:
        code = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
    return f"{name}: exit {code}"


def run(args):
    with ThreadPoolExecutor(args.jobs) as pool:
        for message in pool.map(lambda v: train(args, *v), queue()):
            print(message, flush=True)
    return 0


def queue():
    """The slow ControlNet runs interleaved with the fast uniform-scaling ones (two workers: one ControlNet run
    while the other worker clears the uniform-scaling runs)."""
    slow = [v for v in variants() if v[0] == "controlnet"]
    fast = [v for v in variants() if v[0] != "controlnet"]
    return slow[:1] + fast + slow[1:]


def table(args):
    rows, results_dir = [], Path(args.results_dir)
    for method, resize, protocol in variants():
        name = name_of(method, resize, protocol)
        source = Path(args.runs_dir) / name / f"seed{args.seed}"
        target = results_dir / name / f"seed{args.seed}"
        if (source / "results.json").exists():
            target.mkdir(parents=True, exist_ok=True)
            for file in ("results.json", "metrics.jsonl"):
                shutil.copyfile(source / file, target / file)
        rows.append((method, resize, protocol, json.loads((target / "results.json").read_text())
                     if (target / "results.json").exists() else None))
    done = [run for *_, run in rows if run is not None]
    commits = sorted({run["git_commit"] for run in done})
    devices = sorted({run["device"] for run in done})
    lines = ["# Fidelity switches: resize x protocol, 9 digits by location", "",
             f"ControlNet and uniform scaling, {args.epochs} epochs, seed {args.seed}, the full data, Adam lr 1e-3, "
             "batch 512, the authors' lr halving (params/mmnist_9digits_<method>.json with `resize` and `protocol` "
             "set). held_out: trained on the 50k composites of MNIST train[:50k], best epoch on the 10k validation "
             "composites; authors: trained on the 60k composites of all MNIST training images, no validation split. "
             "The test split (10k composites of MNIST test) is generated with the run's resize. See docs/fidelity.md.",
             "", "Test accuracy (%, mean over the 9 tasks) at the best-validation epoch (held_out only), at the best "
             "test epoch (**optimistic**: the test split picks the epoch; the authors' released selection) and at "
             "the last epoch; in brackets the epoch.", "",
             "| method | resize | protocol | train images | best-val epoch | best test epoch (optimistic) | last epoch "
             "| wall time |", "|---|---|---|---|---|---|---|---|"]
    for method, resize, protocol, run in rows:
        if run is None:
            lines.append(f"| {method} | {resize} | {protocol} | – | not run | not run | not run | – |")
            continue
        at_val = "– (no validation split)" if run["best_epoch"] is None else \
            f"{run['test_acc_mean']:.2f} ({run['best_epoch']})"
        images = 60_000 if protocol == "authors" else 50_000
        lines.append(f"| {method} | {resize} | {protocol} | {images:,} | {at_val} "
                     f"| {run['test_acc_mean_best_test']:.2f} ({run['best_test_epoch']}) "
                     f"| {run['test_acc_mean_last']:.2f} ({run['last_epoch']}) | {run['wall_time_s'] / 60:.1f} min |")
    lines += ["", f"- Runs: {len(done)} of {len(rows)}; files: `{results_dir}/<method>_<resize>_<protocol>/seed"
              f"{args.seed}/` (results.json with command, commit, device, seed, epochs, protocol; metrics.jsonl).",
              f"- Git commit(s): {', '.join(f'`{c}`' for c in commits) or '–'}; "
              f"device(s): {', '.join(devices) or '–'}.",
              f"- Made by: `python -m experiments.fidelity_switches run --epochs {args.epochs} --jobs 2` then "
              f"`python -m experiments.fidelity_switches table --epochs {args.epochs} --results_dir {results_dir} "
              f"--table {args.table}`."]
    Path(args.table).parent.mkdir(parents=True, exist_ok=True)
    files.write_text("\n".join(lines) + "\n", Path(args.table))
    print(f"wrote {args.table} ({len(done)} of {len(rows)} runs)")
    return 0


def main(argv=None):
    args = parse_args(argv)
    return run(args) if args.action == "run" else table(args)


if __name__ == "__main__":
    cli.exit_with(main)
