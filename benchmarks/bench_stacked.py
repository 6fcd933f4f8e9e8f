"""Speed of stacked runs (issue 19, training/stacked.py) against the same runs trained one after the other.

    OMP_NUM_THREADS=1 python benchmarks/bench_stacked.py --quick       # batch 128, a few minutes on one CPU core
    python benchmarks/bench_stacked.py --device cuda                   # batch 512 (the paper's), on a GPU

For every Table 2 method (params/mmnist_<setting>_<method>.json) and both memory formats, R runs (seeds 0..R-1)
are timed over the same training steps: separately (the training loop's ``train_epoch``, one run after the other),
stacked replica after replica (``loop``) and stacked under ``torch.func.vmap`` (``vmap``); and one run against a
``StackedModel`` of one replica (``separate_1``, ``loop_1``: the price of the stacking machinery itself; the loop
trains a single run as its model as it is). Evaluation likewise (``eval_ms``: ms per evaluation of the same images,
with the loss, as the training loop evaluates a split): every replica's model with ``evaluate``, one after the
other, against a stacked group's evaluation (each replica in a separate run's model). The data are random uint8
images with random digit labels (the speed of a step does not depend on them; by reference, half of the labels are
undefined). Each path trains one warm-up epoch (or evaluates once), then ``--epochs`` timed epochs of ``--steps``
steps (evaluations), the paths taking turns; a figure is the fastest timed epoch's time per step (evaluation), in
ms, for all R runs together. Ratios are stacked / separate, within one run
of this script (below 1: stacked is faster). The figures go to runs/benchmarks/stacked-<device-tag>[-quick].json (or
``--out``), and only when the code is a clean commit.
"""
import argparse
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]
os.environ.setdefault("TQDM_DISABLE", "1")  # train_epoch's progress bar; must be set before tqdm is imported

import torch  # noqa: E402

from loaders import NUM_TASKS  # noqa: E402
from models import build_model  # noqa: E402
from runtime import files  # noqa: E402
from training import cli, config, engine, evaluate, loop, stacked as stacking  # noqa: E402
from training.data import MEMORY_FORMATS  # noqa: E402
from training.optim import make_optimizer, parameter_groups  # noqa: E402
from training.provenance import describe_device, git_commit  # noqa: E402
from weighting import build_weighting  # noqa: E402

TABLE2 = ("single_task", "uniform_scaling", "gradnorm", "kendall", "mgda", "task_routing", "ch_mod",
          "ch_mod_extended", "controlnet", "gumbel_matrix")
FORMATS = ("contiguous", "channels_last")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 128 instead of the paper's 512")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--setting", default="9digits", choices=("2digits", "4digits", "9digits", "9digits_byref"))
    parser.add_argument("--replicas", type=int, default=5, help="runs per stack (default 5, the seeds of a cell)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per epoch (default 3)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after the warm-up one (default 2)")
    parser.add_argument("--methods", default=",".join(TABLE2), help="comma list (default: the Table 2 methods)")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma list of memory formats")
    parser.add_argument("--out", help="results JSON (default runs/benchmarks/stacked-<device-tag>[-quick].json)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods.split(",")) - set(config.METHODS)) + \
        sorted(set(args.formats.split(",")) - set(FORMATS))
    if unknown or min(args.replicas, args.steps, args.epochs) < 1:
        parser.error(f"unknown methods or formats {unknown} (valid: {', '.join(config.METHODS)}; "
                     f"{', '.join(FORMATS)}), or a count below 1")
    return args


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_ms(paths, epochs, steps, device):
    """{name: [ms per step of each timed epoch]}: every path (a function of the epoch) trains the warm-up epoch 0,
    then ``epochs`` more, the paths taking turns within each epoch so that all see the same load of a shared
    machine."""
    times = {name: [] for name in paths}
    for epoch in range(epochs + 1):
        for name, train_epoch in paths.items():
            synchronize(device)
            start = time.perf_counter()
            train_epoch(epoch)
            synchronize(device)
            times[name].append(1000 * (time.perf_counter() - start) / steps)
    return {name: ms[1:] for name, ms in times.items()}


def fastest_step_ms(paths, epochs, steps, device):
    """{name: ms per step} of every path's fastest timed epoch (``step_ms``)."""
    return {name: min(ms) for name, ms in step_ms(paths, epochs, steps, device).items()}


def build_runs(params, seeds, num_tasks, device):
    """The separate runs of ``seeds`` as the training script builds them: (model, weighting, optimizer)."""
    runs = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = build_model(params["model"], num_tasks, **config.model_kwargs(params))
        model = model.to(device, memory_format=MEMORY_FORMATS[params["memory_format"]])
        weighting = build_weighting(params["weighting"], num_tasks, params["weighting_options"]).to(device) \
            if params["weighting"] else None
        runs.append((model, weighting, make_optimizer(params, parameter_groups(params, model,
                                                                                             weighting))))
    return runs


def random_data(setting, n, num_tasks, device):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (n, num_tasks), generator=generator)
    if setting.endswith("byref"):
        labels[torch.rand(n, num_tasks, generator=generator) < 0.5] = -1
    return images.to(device), labels.to(device)


def bench_method(method, memory_format, args, device):
    """ms per step of every path for one method and memory format, and the ratios."""
    batch = 128 if args.quick else 512
    params = config.load_params(REPO / "params" / f"mmnist_{args.setting}_{method}.json",
                                [f"batch_size={batch}", f"memory_format=\"{memory_format}\""])
    num_tasks = NUM_TASKS[params["setting"]]
    data = random_data(args.setting, batch * args.steps, num_tasks, device)
    seeds = list(range(args.replicas))
    runs = build_runs(params, seeds, num_tasks, device)

    def separate(epoch, which=runs):
        for seed, (model, weighting, optimizer) in zip(seeds, which):
            loop.train_epoch(model, weighting, optimizer, data, params, seed, epoch)

    def stacked(mode, replicas):
        model, weighting, optimizer = stacking.stack_runs(runs[:replicas], params, mode)
        return lambda epoch: engine.train_stacked_epoch(model, weighting, optimizer, data, params, seeds[:replicas],
                                                        epoch)

    figures = fastest_step_ms({"separate": separate, "loop": stacked("loop", args.replicas),
                               "vmap": stacked("vmap", args.replicas),
                               "separate_1": lambda epoch: separate(epoch, runs[:1]), "loop_1": stacked("loop", 1)},
                              args.epochs, args.steps, device)
    figures = {key: round(value, 2) for key, value in figures.items()}
    ratios = {"loop": figures["loop"] / figures["separate"], "vmap": figures["vmap"] / figures["separate"],
              "loop_1": figures["loop_1"] / figures["separate_1"]}
    return {"ms_per_step": figures, "stacked_over_separate": {k: round(v, 3) for k, v in ratios.items()},
            **bench_evaluation(runs, params, data, num_tasks, args, device)}


def bench_evaluation(runs, params, data, num_tasks, args, device):
    """ms per evaluation of ``data`` (every task, with the loss) of R runs: separately, and as a stacked group
    evaluates them (every replica in a separate run's model, ``engine.StackedGroup.evaluate``)."""
    rows, memory_format = evaluate.eval_rows(params, device), MEMORY_FORMATS[params["memory_format"]]
    evaluation = partial(evaluate.evaluate, num_tasks=num_tasks, rows=rows, memory_format=memory_format,
                         with_loss=True)

    def separate(epoch):
        for model, _, _ in runs:
            evaluation(model, *data)

    group = engine.StackedGroup(runs, params, list(range(len(runs))), "loop")
    figures = fastest_step_ms({"separate": separate, "group": lambda epoch: group.evaluate(evaluation, *data)},
                              args.epochs, 1, device)
    return {"eval_ms": {key: round(value, 2) for key, value in figures.items()},
            "eval_stacked_over_separate": {"group": round(figures["group"] / figures["separate"], 3)}}


def main(argv=None):
    args = parse_args(argv)
    device = cli.resolve_device(args.device)
    commit = git_commit()
    results = {"command": " ".join(["python", "benchmarks/bench_stacked.py"] + (argv or sys.argv[1:])),
               "git_commit": commit, "device": describe_device(device), "torch": torch.__version__,
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
               "protocol": {"setting": args.setting, "replicas": args.replicas,
                            "batch_size": 128 if args.quick else 512,
                            "steps_per_epoch": args.steps, "timed_epochs": args.epochs,
                            "data": "random uint8 images and labels"},
               "methods": {}}
    for method in args.methods.split(","):
        for memory_format in args.formats.split(","):
            figures = bench_method(method, memory_format, args, device)
            results["methods"].setdefault(method, {})[memory_format] = figures
            print(f"{method:16s} {memory_format:13s} ms/step {figures['ms_per_step']}  stacked/separate "
                  f"{figures['stacked_over_separate']}  evaluation ms {figures['eval_ms']}  stacked/separate "
                  f"{figures['eval_stacked_over_separate']}", flush=True)
    name = f"stacked-{device_tag(device)}{'-quick' if args.quick else ''}.json"
    write_if_clean(results, out_path(args.out, name))
    return 0


def device_tag(device):
    """'cpu', or the GPU's name without spaces: the suffix of a results file."""
    return "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).replace(" ", "-")


def out_path(out, name):
    """Where a benchmark writes its figures: ``--out``, else runs/benchmarks/<name> (never over a committed file of
    benchmarks/results/ unless told to)."""
    return Path(out) if out else REPO / "runs" / "benchmarks" / name


def short_revision(parser, revision):
    """``revision`` (a commit, tag or branch) as git's short hash; a parser error naming it when git does not know
    it."""
    found = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", revision], capture_output=True, text=True)
    if found.returncode != 0:
        parser.error(f"--base: {revision!r} is not a revision of {REPO}")
    return found.stdout.strip()


def write_if_clean(results, out):
    """Writes ``results`` to ``out`` only when its ``git_commit`` is a clean commit (a committed figure must name the
    code that made it)."""
    commit = results["git_commit"]
    if commit.endswith("-dirty") or commit == "unknown":
        print(f"not written to {out}: the code is not a clean commit ({commit})")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(results, out)
    print(f"written to {out}")


if __name__ == "__main__":
    cli.exit_with(main)
