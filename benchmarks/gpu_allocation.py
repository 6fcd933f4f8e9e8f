"""The prepared command for a short GPU allocation (issue 19, item 6): measure every stacked Table 2 group on this
device, project the time of the full protocol, then train as many groups as fit in the rest of ``--budget_s``.

    python benchmarks/gpu_allocation.py --device cuda                       # the full Table 2 grid, batch 512
    OMP_NUM_THREADS=1 python benchmarks/gpu_allocation.py --device cpu --methods controlnet,mgda \\
        --settings 2digits --batch_size 64 --probe_steps 1 --eval_images 64 --epochs 2 --subset 256 \\
        --runs_dir /tmp/alloc --budget_s 120                                # a tiny check of the command on CPU

A group is one cell of Table 2 (a method on a setting) with its ``--replicas`` seeds stacked (training/stacked.py).
For each group, stacking mode (``loop``, ``vmap``) and, on CUDA, without and with CUDA graphs of the step
(``+graphs``: training/step_graph.py) the command trains one warm-up epoch and one timed epoch of ``--probe_steps``
steps on random data of the right shapes (a graphed path captures after 3 eager steps and is used only if its
weights and weighting state then equal its eager mode's parameter by parameter: bit for bit, or within what a second
eager run of the mode differs by there on this device; ``graph_check``, with the worst difference of every parameter
in ``graph_differences`` and the eager run-to-run ones in ``eager_run_to_run``), and times the evaluation of all
replicas on ``--eval_images`` images (as the stacked group evaluates: every replica in a separate run's model, all
tasks of an image at once). The projection of a group is ``epochs x (steps per epoch x ms/step of its fastest path
+ 2 x val/test images / eval_images x eval time)`` with the protocol's 50,000 training, 10,000 validation and
10,000 test images; the total is the sum over the groups run one after the other. Then the groups train, quickest
first, each as one process of the training script (``--seeds``, its fastest path: ``--stack_mode``,
``--cuda_graphs``) into <runs_dir>/<setting>/<method>/seed<k>, resumed where an earlier allocation stopped; when the
budget runs out the running group gets Ctrl-C (its last finished epoch is kept). Figures (device, float32 precision,
per-group ms/step of each path, the chosen one, the graph checks, projected seconds, the cells finished) go to
runs/benchmarks/gpu_allocation-<device>.json (or ``--out``) when the code is a clean commit.
"""
import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from loaders import NUM_TASKS  # noqa: E402
from runtime import precision  # noqa: E402
from training import cli, config, engine, stacked as stacking, step_graph  # noqa: E402
from training.data import MEMORY_FORMATS  # noqa: E402
from training.evaluate import eval_rows, evaluate  # noqa: E402
from training.provenance import describe_device, git_commit  # noqa: E402

from bench_stacked import (  # noqa: E402
    TABLE2, build_runs, device_tag, fastest_step_ms, out_path, random_data, synchronize, write_if_clean)

SETTINGS = ("2digits", "4digits", "9digits", "9digits_byref")
TRAIN_IMAGES, EVAL_IMAGES = 50_000, 10_000  # the held-out protocol: MNIST train[:50k], val train[50k:], test
GRAPHED = "+graphs"  # a path with its full-batch steps replayed from a CUDA graph (training/step_graph.py)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--methods", default=",".join(TABLE2), help="comma list (default: every Table 2 method)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma list (default: all four)")
    parser.add_argument("--replicas", type=int, default=5, help="seeds per group (default 5)")
    parser.add_argument("--epochs", type=int, default=100, help="epochs of the projected protocol (default 100)")
    parser.add_argument("--batch_size", type=int, default=512, help="training batch (default 512, the paper's)")
    parser.add_argument("--probe_steps", type=int, default=10, help="timed training steps per group and mode")
    parser.add_argument("--eval_images", type=int, default=2048, help="images of the timed evaluation")
    parser.add_argument("--runs_dir", default=str(REPO / "runs" / "table2_stacked"), help="where the groups train")
    parser.add_argument("--budget_s", type=float, default=540.0, help="seconds for the whole command, measurement "
                        "included (default 540: a 10-minute allocation less a margin); 0 = measure only")
    parser.add_argument("--subset", type=int, help="train on N images (the check on CPU)")
    parser.add_argument("--out", help="the figures' file (default runs/benchmarks/gpu_allocation-<device>.json)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods.split(",")) - set(TABLE2)) + sorted(set(args.settings.split(",")) - set(SETTINGS))
    if unknown or min(args.replicas, args.epochs, args.batch_size, args.probe_steps, args.eval_images) < 1:
        parser.error(f"unknown methods or settings {unknown} (valid: {', '.join(TABLE2)}; {', '.join(SETTINGS)}), "
                     f"or a count below 1")
    return args


def measure_group(method, setting, args, device):
    """ms per training step of the stacked group in each mode, and the seconds of one stacked evaluation of all
    replicas over ``eval_images`` images in the faster mode."""
    params = config.load_params(REPO / "params" / f"mmnist_{setting}_{method}.json",
                                [f"batch_size={args.batch_size}"])
    num_tasks = NUM_TASKS[params["setting"]]
    data = random_data(setting, args.batch_size * args.probe_steps, num_tasks, device)
    seeds = list(range(args.replicas))
    runs = build_runs(params, seeds, num_tasks, device)
    paths, ms_per_step, stacks, graphs = {}, {}, {}, {}
    for mode in stacking.MODES:
        for graphed in (False, True):
            path = f"{mode}{GRAPHED if graphed else ''}"
            if graphed and device.type != "cuda":
                ms_per_step[path] = "n/a: CUDA graphs need a CUDA device"
                continue
            try:
                stacks[path] = stacking.stack_runs(runs, params, mode)
            except ValueError as err:  # e.g. vmap with dropout
                ms_per_step[path] = f"n/a: {err}"
                continue
            graphs[path] = step_graph.StepGraph(step_graph.CudaBackend(device)) if graphed else None
            paths[path] = lambda epoch, stack=stacks[path], graph=graphs[path]: probe_epoch(
                stack, data, params, seeds, epoch, graph)
    ms_per_step.update({path: round(ms, 3) for path, ms in fastest_step_ms(paths, 1, args.probe_steps, device).items()})
    repeats = {}  # every eager mode trained again, the same epochs: its run-to-run differences on this device
    for mode in stacking.MODES:
        if mode in stacks:
            repeats[mode] = stacking.stack_runs(runs, params, mode)
            for epoch in range(2):
                probe_epoch(repeats[mode], data, params, seeds, epoch, None)
    run_to_run = {mode: worst_differences(repeats[mode], stacks[mode], len(seeds)) for mode in repeats}
    graph_check, graph_differences = check_graphs(stacks, graphs, run_to_run, len(seeds))
    for path, check in graph_check.items():
        if not check.startswith("equal"):
            ms_per_step[path] = f"not used: {check} ({ms_per_step[path]} ms/step)"
    timed = {path: value for path, value in ms_per_step.items() if isinstance(value, float)}
    fastest = min(timed, key=timed.get)
    images, labels = random_data(setting, args.eval_images, num_tasks, device)
    memory_format, rows = MEMORY_FORMATS[params["memory_format"]], eval_rows(params, device)
    group = engine.StackedGroup(runs, params, seeds, "loop")
    evaluation = partial(evaluate, num_tasks=num_tasks, rows=rows, memory_format=memory_format, with_loss=True)
    eval_s = []
    for _ in range(2):  # the first pass warms up
        synchronize(device)
        start = time.perf_counter()
        group.evaluate(evaluation, images, labels)
        synchronize(device)
        eval_s.append(time.perf_counter() - start)
    steps = math.ceil(TRAIN_IMAGES / args.batch_size)
    projected = args.epochs * (steps * timed[fastest] / 1000 + 2 * EVAL_IMAGES / args.eval_images * eval_s[1])
    return {"ms_per_step": ms_per_step, "mode": fastest.removesuffix(GRAPHED), "cuda_graphs": fastest.endswith(GRAPHED),
            "graph_check": graph_check, "graph_differences": graph_differences,
            "eager_run_to_run": {mode: summary(worst) for mode, worst in run_to_run.items()},
            "eval_s_per_pass": round(eval_s[1], 4), "projected_s": round(projected, 1)}


def probe_epoch(stack, data, params, seeds, epoch, graph):
    """One epoch of a measured path; an error of a graphed one (not yet run on a GPU) is its graph's failure, so
    that the command goes on without that path."""
    try:
        engine.train_stacked_epoch(*stack, data, params, seeds, epoch, graphs=graph)
    except Exception as err:
        if graph is None:
            raise
        graph.failed = graph.failed or f"{type(err).__name__}: {err}".splitlines()[0]
        graph.replay = None


def check_graphs(stacks, graphs, run_to_run, replicas):
    """Every graphed path against its eager mode, both trained the same epochs from the same runs, parameter by
    parameter (``worst_differences``): ({path: verdict}, {path: {parameter: worst |graphed - eager|}}). A replay runs
    the eager step's kernels, so the only difference allowed in a parameter is what two eager runs of the mode differ
    by there (``run_to_run``: the order of atomic additions on a GPU; nothing on a deterministic device): 'equal: bit
    for bit', 'equal within the eager run-to-run differences' (the worst parameter against its eager figure), else
    'differs' (the parameter furthest above its eager figure; a stale noise draw or step index moves every weight by
    an update's size) or 'not captured' with the capture's error."""
    checks, differences = {}, {}
    for path, graph in graphs.items():
        if graph is None:
            continue
        if graph.failed is not None or graph.replay is None:
            checks[path] = f"not captured: {graph.failed or 'too few steps'}"
            continue
        mode = path.removesuffix(GRAPHED)
        worst, floor = worst_differences(stacks[path], stacks[mode], replicas), run_to_run[mode]
        differences[path] = summary(worst)
        key = max(worst, key=lambda name: (worst[name] - floor[name], worst[name]))
        figures = f"worst |graphed - eager| {worst[key]:.3g} in {key} (eager run to run there: {floor[key]:.3g})"
        checks[path] = "equal: bit for bit" if not any(worst.values()) else \
            f"equal within the eager run-to-run differences: {figures}" if worst[key] <= floor[key] else \
            f"differs: {figures}"
    return checks, differences


def worst_differences(stack, other, replicas):
    """{name: the largest |stack - other| over the replicas} of every parameter and buffer of two stacks' models and
    weightings (a non-float tensor: 0 if equal, else inf)."""
    worst = {}
    for r in range(replicas):
        pairs = [("", stack[0].replica_state_dict(r), other[0].replica_state_dict(r))]
        if stack[1] is not None:
            pairs.append(("weighting.", stack[1].replica_state_dict(r), other[1].replica_state_dict(r)))
        for prefix, mine, theirs in pairs:
            for key, value in theirs.items():
                difference = float((mine[key] - value).abs().max()) if value.is_floating_point() else \
                    0.0 if torch.equal(mine[key], value) else math.inf
                worst[prefix + key] = max(worst.get(prefix + key, 0.0), difference)
    return worst


def worst_of(summaries):
    """{mode: 'bit for bit' or its largest difference} of ``summary``'s figures."""
    return {mode: worst if worst == "bit for bit" else max(worst.values()) for mode, worst in summaries.items()}


def summary(worst):
    """Per-parameter worst differences for the JSON: 'bit for bit' when all are zero."""
    return "bit for bit" if not any(worst.values()) else {key: float(f"{value:.3g}") for key, value in worst.items()}


def train_groups(groups, args, device, started):
    """Trains the groups, quickest projection first, while ``--budget_s`` lasts; {cell: finished, interrupted at
    epoch k, failed (exit code) or not started}."""
    status = {}
    for cell in sorted(groups, key=lambda cell: groups[cell]["projected_s"]):
        setting, method = cell.split("/")
        out = Path(args.runs_dir) / setting / method
        seeds = range(args.replicas)
        if all(finished(out / f"seed{seed}", args) for seed in seeds):
            status[cell] = "finished"
            continue
        left = args.budget_s - (time.perf_counter() - started)
        if left < 10:
            status[cell] = "not started"
            continue
        command = [sys.executable, str(REPO / "train_multi_task_counter_stream.py"), "--param_file",
                   str(REPO / "params" / f"mmnist_{setting}_{method}.json"), "--seeds", ",".join(map(str, seeds)),
                   "--epochs", str(args.epochs), "--out", str(out), "--device", str(device),
                   "--stack_mode", groups[cell]["mode"],
                   "--cuda_graphs", "on" if groups[cell]["cuda_graphs"] else "off"]
        command += ["--subset", str(args.subset)] if args.subset else []
        command += ["--resume"] if any((out / f"seed{seed}" / "checkpoint.pt").exists() for seed in seeds) else []
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            _, err = process.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)  # Ctrl-C: stops after the files of the last finished epoch
            _, err = process.communicate()
        epochs = [epochs_done(out / f"seed{seed}") for seed in seeds]
        status[cell] = "finished" if process.returncode == 0 else \
            f"interrupted at epoch {min(epochs)}" if process.returncode == 130 else \
            f"failed (exit {process.returncode}): {err.strip().splitlines()[-1] if err.strip() else ''}"
        print(f"{cell}: {status[cell]}", flush=True)
    return status


def finished(run_dir, args):
    """A run of this protocol with its results.json."""
    path = run_dir / "results.json"
    if not path.exists():
        return False
    results = json.loads(path.read_text())
    return results["epochs"] == args.epochs and results["subset"] == args.subset


def epochs_done(run_dir):
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def main(argv=None):
    args = parse_args(argv)
    device = cli.resolve_device(args.device)
    commit = git_commit()
    started = time.perf_counter()
    groups = {}
    for setting in args.settings.split(","):
        for method in args.methods.split(","):
            groups[f"{setting}/{method}"] = figures = measure_group(method, setting, args, device)
            print(f"{setting:14s} {method:16s} ms/step {figures['ms_per_step']} -> {figures['mode']}"
                  f"{GRAPHED if figures['cuda_graphs'] else ''}, eval "
                  f"{figures['eval_s_per_pass']}s per pass, projected {figures['projected_s']}s; eager run to run: "
                  f"{worst_of(figures['eager_run_to_run'])}; graphs: {figures['graph_check']}", flush=True)
    total = sum(group["projected_s"] for group in groups.values())
    results = {"command": " ".join(["python", "benchmarks/gpu_allocation.py"] + (argv or sys.argv[1:])),
               "git_commit": commit, "device": describe_device(device),
               "cuda_fp32_precision": precision.float32_precision(), "torch": torch.__version__,
               "protocol": {"replicas": args.replicas, "epochs": args.epochs, "batch_size": args.batch_size,
                            "train_images": TRAIN_IMAGES, "val_images": EVAL_IMAGES, "test_images": EVAL_IMAGES,
                            "probe_steps": args.probe_steps, "eval_images": args.eval_images,
                            "data": "random uint8 images and labels of the protocol's shapes"},
               "groups": groups, "projected_total_s": round(total, 1),
               "runs_projected": len(groups) * args.replicas, "measurement_s": round(time.perf_counter() - started, 1)}
    print(f"projected: {total / 60:.1f} min for {results['runs_projected']} runs of {args.epochs} epochs, groups one "
          f"after the other ({results['measurement_s']}s of measurement)")
    results["trained"] = train_groups(groups, args, device, started)
    results["cells_finished"] = sorted(cell for cell, status in results["trained"].items() if status == "finished")
    print(f"{len(results['cells_finished'])} of {len(groups)} cells finished in {args.runs_dir}")
    out = out_path(args.out, f"gpu_allocation-{device_tag(device)}.json")
    write_if_clean(results, Path(out))
    return 0


if __name__ == "__main__":
    cli.exit_with(main)
