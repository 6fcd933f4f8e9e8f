"""The training script end to end at this checkout against another revision: real Multi-MNIST data, a few epochs of
training and evaluation, each run its own process, the revisions taking turns.

    OMP_NUM_THREADS=1 python benchmarks/bench_e2e.py --base e5beb03            # 3 runs x 2 arms x 3 repetitions
    python benchmarks/bench_e2e.py --base e5beb03 --arms base,base_tunables,head --runs controlnet9
    python benchmarks/bench_e2e.py --base e5beb03 --dry_run                  # the schedule, nothing run

An *arm* is a revision and an environment (``ARMS``): ``base`` is ``git archive <base>`` in a temporary folder run
with glibc's default malloc (no ``GLIBC_TUNABLES``), ``head`` this checkout as it is (its own start-up settings),
``base_tunables`` the base with the allocator setting as an environment variable, ``head_default_malloc`` this
checkout with glibc's default malloc, ``head_tunables`` this checkout with the environment variable instead of its
``mallopt``. Every process is ``train_multi_task_counter_stream.py --param_file <run's
file> --epochs E --subset N --seed 0 --device cpu`` of its arm's revision, with ``OMP_NUM_THREADS`` threads. Within a
repetition every run is timed once per arm, the arms in turn, their order reversed in every other repetition (ABBA),
so that a change of the machine's load falls on both sides of a pair.

Figures per run and arm: ``epoch_cpu_s``, the process's CPU time (user + system, page faults included) from the end
of its first epoch to the end of its last (read from /proc as each epoch's metrics.jsonl line appears: the
steadiest figure on a shared machine, which slows a process's wall time but hardly its CPU time), ``epochs_s``, the
training script's own wall-clock epoch times summed (training and evaluation of every epoch), ``cpu_s`` and
``process_s``, the whole process's CPU and wall time (start-up and data loading included), and ``minor_faults``.
Ratios arm / first arm (below 1: faster) of every repetition (paired), their median, min and max, and the ratio of
the medians. ``identical``: whether the arm's metrics (losses and accuracies of every epoch) equal the first arm's
exactly, in every repetition. The figures go to runs/benchmarks/e2e-<base>-cpu.json (or ``--out``), only from a
clean commit.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from bench_stacked import out_path, short_revision, write_if_clean  # noqa: E402
from training import cli  # noqa: E402
from training.provenance import describe_device, git_commit  # noqa: E402

SCRIPT = "train_multi_task_counter_stream.py"
RUNS = {"controlnet9": "params/mmnist_counter_9tasks_params.json",
        "single_task9": "params/mmnist_9digits_single_task.json",
        "uniform_scaling9": "params/mmnist_9digits_uniform_scaling.json"}
TUNABLES = ("glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=17179869184:"
            "glibc.malloc.top_pad=268435456")
ARMS = {  # name -> (revision: "base" or "head", GLIBC_TUNABLES or None for none)
    "base": ("base", None),
    "base_tunables": ("base", TUNABLES),
    "head": ("head", None),
    "head_default_malloc": ("head", "glibc.malloc.perturb=0"),  # any malloc tunable: runtime/allocator.py stands back
    "head_tunables": ("head", TUNABLES),  # the environment variable instead of runtime/allocator.py's mallopt
}
TIMING_KEYS = {"epoch_time_s", "time"}
FIGURES = ("epoch_cpu_s", "epochs_s", "cpu_s", "process_s", "minor_faults")


def parse_args(argv):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="e5beb03", help="the revision to compare with (default e5beb03)")
    parser.add_argument("--runs", type=cli.comma_list(RUNS, "run"), default=list(RUNS),
                        help=f"comma list of {', '.join(RUNS)} (default all)")
    parser.add_argument("--arms", type=cli.comma_list(ARMS, "arm"), default=["base", "head"],
                        help=f"comma list of {', '.join(ARMS)}; ratios are to the first (default base,head)")
    parser.add_argument("--repeats", type=cli.positive_int, default=3, help="repetitions (default 3)")
    parser.add_argument("--epochs", type=cli.positive_int, default=2, help="epochs per process (default 2)")
    parser.add_argument("--subset", type=cli.positive_int, default=10000,
                        help="training images; val and test get a fifth each (default 10000)")
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="OMP_NUM_THREADS of every process "
                        "(default 1, as the sweep's workers)")
    parser.add_argument("--dry_run", action="store_true", help="print the schedule of processes, run nothing")
    parser.add_argument("--out", help="results JSON (default runs/benchmarks/e2e-<base>-cpu.json)")
    args = parser.parse_args(argv)
    if len(args.arms) < 2:
        parser.error(f"--arms: name two or more to compare, the first is the reference (valid: {','.join(ARMS)})")
    args.base = short_revision(parser, args.base)
    return args


def schedule(arms, runs, repeats):
    """(repetition, run, arm) in the order they are timed: in each repetition every run with every arm, the arms'
    order reversed in every other repetition."""
    return [(rep, run, arm) for rep in range(repeats) for run in runs
            for arm in (arms if rep % 2 == 0 else arms[::-1])]


def command(root, run, args, out):
    return [sys.executable, str(root / SCRIPT), "--param_file", str(root / RUNS[run]), "--epochs", str(args.epochs),
            "--subset", str(args.subset), "--seed", "0", "--device", "cpu", "--out", str(out)]


def environment(arm, threads):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update({"OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"})
    if ARMS[arm][1] is not None:
        env["GLIBC_TUNABLES"] = ARMS[arm][1]
    return env


def cpu_seconds(pid):
    """User + system CPU seconds of a running process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_one(root, run, arm, args, out):
    """Figures of one training process: ``epochs_s`` (its epoch times summed), ``process_s`` (wall), ``cpu_s`` (its
    user + system CPU time), ``epoch_cpu_s`` (CPU time from the end of epoch 1 to the end of the last epoch: the
    epochs after the first, read from /proc when each epoch's metrics.jsonl line appears), ``minor_faults``; and
    its metrics without timing."""
    out.mkdir()
    log = out.parent / f"{out.name}.log"
    marks = []  # CPU seconds of the process when metrics.jsonl gained a line
    start = time.perf_counter()
    with open(log, "w") as stream:
        proc = subprocess.Popen(command(root, run, args, out), cwd=root, env=environment(arm, args.threads),
                                stdout=stream, stderr=subprocess.STDOUT)
        while True:  # os.wait4 rather than Popen.poll: it returns the child's resource usage
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            lines = (out / "metrics.jsonl").read_text().count("\n") if (out / "metrics.jsonl").exists() else 0
            if lines > len(marks):
                try:
                    marks += [cpu_seconds(proc.pid)] * (lines - len(marks))
                except (OSError, IndexError, ValueError):  # it ended just now
                    pass
            time.sleep(0.01)
    process_s = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise cli.RunError(f"{arm} {run} failed (exit {proc.returncode}): {log.read_text().strip()[-500:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    metrics = [{k: v for k, v in record.items() if k not in TIMING_KEYS} for record in records]
    cpu_s = usage.ru_utime + usage.ru_stime
    figures = {"epochs_s": sum(record["epoch_time_s"] for record in records), "process_s": process_s, "cpu_s": cpu_s,
               "epoch_cpu_s": marks[-1] - marks[0] if len(marks) == len(records) > 1 else float("nan"),
               "minor_faults": usage.ru_minflt}
    return figures, metrics


def summary(times, arms):
    """Per arm: the figures, their median, and the paired ratios to the first arm."""
    first = arms[0]
    out = {}
    for arm in arms:
        row = {key: [round(t, 3) for t in times[arm][key]] for key in FIGURES}
        row.update({f"median_{key}": round(statistics.median(times[arm][key]), 3) for key in FIGURES})
        if arm != first:
            for key in FIGURES:
                paired = [a / b for a, b in zip(times[arm][key], times[first][key])]
                row[f"ratio_{key}"] = {"paired": [round(r, 3) for r in paired],
                                       "median": round(statistics.median(paired), 3),
                                       "min": round(min(paired), 3), "max": round(max(paired), 3),
                                       "of_medians": round(row[f"median_{key}"] / out[first][f"median_{key}"], 3)}
            row["identical"] = all(m == times[first]["metrics"][0] for m in times[arm]["metrics"])
        out[arm] = row
    out[first]["repeatable"] = all(m == times[first]["metrics"][0] for m in times[first]["metrics"])
    out["final_train_loss"] = times[first]["metrics"][0][-1]["train_loss"]
    return out


def main(argv=None):
    args = parse_args(argv)
    plan = schedule(args.arms, args.runs, args.repeats)
    if args.dry_run:
        for rep, run, arm in plan:
            root = Path("<base>") if ARMS[arm][0] == "base" else REPO
            tunables = ARMS[arm][1]
            print(f"rep {rep + 1}  {run:16s} {arm:20s} " + (f"GLIBC_TUNABLES={tunables} " if tunables else "")
                  + " ".join(command(root, run, args, Path("<tmp>"))[1:]))
        return 0
    results = {"command": " ".join(["python", "benchmarks/bench_e2e.py"] + (sys.argv[1:] if argv is None else argv)),
               "git_commit": git_commit(), "base_commit": args.base, "device": describe_device(cli.resolve_device("cpu")),
               "protocol": {"epochs": args.epochs, "subset": args.subset, "threads": args.threads, "seed": 0,
                            "repeats": args.repeats, "arms": {arm: {"revision": ARMS[arm][0],
                                                                     "GLIBC_TUNABLES": ARMS[arm][1]}
                                                              for arm in args.arms}},
               "load_average_start": os.getloadavg(), "runs": {}}
    times = {run: {arm: {key: [] for key in FIGURES + ("metrics",)} for arm in args.arms} for run in args.runs}
    with tempfile.TemporaryDirectory() as folder:
        roots = {"head": REPO, "base": Path(folder) / "base"}
        roots["base"].mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.base], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(roots["base"])], input=archive.stdout, check=True)
        for i, (rep, run, arm) in enumerate(plan):
            figures, metrics = time_one(roots[ARMS[arm][0]], run, arm, args, Path(folder) / f"out{i}")
            for key, value in (*figures.items(), ("metrics", metrics)):
                times[run][arm][key].append(value)
            print(f"rep {rep + 1}  {run:16s} {arm:20s} " + "  ".join(f"{key} {figures[key]:.2f}" for key in FIGURES)
                  + f"  load {os.getloadavg()[0]:.2f}", flush=True)
    for run in args.runs:
        results["runs"][run] = {"param_file": RUNS[run], **summary(times[run], args.arms)}
        for arm in args.arms[1:]:
            ratio = results["runs"][run][arm]["ratio_epoch_cpu_s"]
            wall = results["runs"][run][arm]["ratio_epochs_s"]
            print(f"{run:16s} {arm}/{args.arms[0]}: CPU time of the epochs after the first {ratio['median']:.3f} "
                  f"(median of pairs; {ratio['min']:.3f}-{ratio['max']:.3f}), wall time of every epoch "
                  f"{wall['median']:.3f} ({wall['min']:.3f}-{wall['max']:.3f}); identical: "
                  f"{results['runs'][run][arm]['identical']}")
    results["load_average_end"] = os.getloadavg()
    write_if_clean(results, out_path(args.out, f"e2e-{args.base}-cpu.json"))
    return 0


if __name__ == "__main__":
    cli.exit_with(main)
