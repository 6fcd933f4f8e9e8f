"""Speed of one run's training step at this checkout against another revision of the repository (a speed
regression check, e.g. issue 19: a single run must not get slower on CPU when the step became a stack of one).

    OMP_NUM_THREADS=1 python benchmarks/bench_revisions.py --base 70b2c76 --quick

Both revisions are imported into this one process (the base from ``git archive <base>`` into a temporary folder, its
modules kept apart from this checkout's), each builds the run of every method from its own param file
(params/mmnist_<setting>_<method>.json, seed 0) and trains it with its own ``training.loop.train_epoch`` on the same
random data (uint8 images and digit labels; by reference half of the labels undefined). Each path trains one warm-up
epoch, then ``--epochs`` timed epochs of ``--steps`` steps, the two revisions taking turns within every epoch so that
both see the same load of a shared machine; a figure is the fastest timed epoch's time per step in ms. Two ratios
this checkout / base (below 1: this checkout is faster): of the fastest epochs, and the median over the timed epochs
of the two revisions' times in the same epoch (steadier when the load changes during the run). The figures go to
runs/benchmarks/revisions-<base>-<device-tag>[-quick].json (or ``--out``), only when this checkout is a clean
commit. The base must have the package layout of docs/architecture.md (``training/loop.py``).
"""
import argparse
import importlib
import inspect
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
os.environ.setdefault("TQDM_DISABLE", "1")  # train_epoch's progress bar; must be set before tqdm is imported

import torch  # noqa: E402

from bench_stacked import TABLE2, device_tag, out_path, random_data, short_revision, step_ms, \
    write_if_clean  # noqa: E402
from training import cli  # noqa: E402
from training.provenance import describe_device, git_commit  # noqa: E402

PACKAGES = ("loaders", "models", "training", "weighting", "runtime", "losses", "metrics")


def parse_args(argv):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the revision to compare with (a commit, tag or branch)")
    parser.add_argument("--quick", action="store_true", help="batch 128 instead of the paper's 512")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--setting", default="9digits", choices=("2digits", "4digits", "9digits", "9digits_byref"))
    parser.add_argument("--steps", type=int, default=4, help="training steps per epoch (default 4)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after the warm-up one (default 3)")
    parser.add_argument("--methods", default=",".join(TABLE2), help="comma list (default: the Table 2 methods)")
    parser.add_argument("--out", help="results JSON (default runs/benchmarks/revisions-<base>-<device>[-quick].json)")
    parser.add_argument("--numbers", action="store_true", help="instead of timing: one epoch of every method by both "
                        "revisions on the same data, the largest differences of weights, optimiser state, loss and "
                        "accuracies (0.0: bit for bit)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods.split(",")) - set(TABLE2))
    if unknown or min(args.steps, args.epochs) < 1:
        parser.error(f"--methods: unknown {unknown} (valid: {', '.join(TABLE2)}), or a count below 1")
    args.base = short_revision(parser, args.base)
    return args


def project_modules():
    return {name: module for name, module in sys.modules.items() if name.split(".")[0] in PACKAGES}


def import_revision(root):
    """The modules of the checkout at ``root`` that build and train a run, imported apart from this checkout's:
    this checkout's project modules are set aside while they load and put back after (the base's functions keep
    their own module globals)."""
    ours = project_modules()
    for name in ours:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        names = ("loaders", "models", "training.config", "training.data", "training.evaluate", "training.loop",
                 "training.optim", "weighting")
        return argparse.Namespace(root=root, **{name.split(".")[-1]: importlib.import_module(name) for name in names})
    finally:
        sys.path.remove(str(root))
        for name in project_modules():
            del sys.modules[name]
        sys.modules.update(ours)


def build_run(rev, method, setting, batch, device):
    """Seed 0's (params, model, weighting, optimizer) of ``method`` as revision ``rev``'s training script builds it."""
    params = rev.config.load_params(rev.root / "params" / f"mmnist_{setting}_{method}.json", [f"batch_size={batch}"])
    num_tasks = rev.loaders.NUM_TASKS[params["setting"]]
    torch.manual_seed(0)
    model = rev.models.build_model(params["model"], num_tasks, **rev.config.model_kwargs(params))
    model = model.to(device, memory_format=rev.data.MEMORY_FORMATS[params["memory_format"]])
    weighting = rev.weighting.build_weighting(params["weighting"], num_tasks, params["weighting_options"]).to(device) \
        if params["weighting"] else None
    optimizer = rev.optim.make_optimizer(params, rev.optim.parameter_groups(params, model, weighting))
    return params, model, weighting, optimizer


def epoch_of(rev, run, data):
    """One epoch of the run by revision ``rev``'s ``training.loop.train_epoch``, whichever of its two signatures
    (before the plain step: with the run dir and state, returning the loss; after: returning ``Epoch``)."""
    params, model, weighting, optimizer = run
    if "out" in inspect.signature(rev.loop.train_epoch).parameters:
        return lambda epoch: rev.loop.train_epoch(model, weighting, optimizer, data, params, 0, epoch, None,
                                                  {"epoch": 0})
    return lambda epoch: rev.loop.train_epoch(model, weighting, optimizer, data, params, 0, epoch).loss


def same_numbers(revisions, method, setting, batch, steps, device):
    """One epoch of ``method`` by each revision on the same random data (float32, seed 0), then the accuracies and
    loss of each on held-out random data: the largest absolute differences of the weights, the optimiser state,
    the training loss and the accuracies (0.0 everywhere: bit for bit)."""
    num_tasks = revisions["head"].loaders.NUM_TASKS[setting]
    train, test = random_data(setting, batch * steps, num_tasks, device), random_data(setting, 256, num_tasks, device)
    test = (test[0].flip(0), test[1])
    got = {}
    for name, rev in revisions.items():
        params, model, weighting, optimizer = run = build_run(rev, method, setting, batch, device)
        loss = epoch_of(rev, run, train)(0)
        rows = rev.evaluate.eval_rows(params, device)
        accuracy = rev.evaluate.evaluate(model, *test, num_tasks, rows, torch.contiguous_format)
        got[name] = (loss, model.state_dict(), optimizer.state_dict()["state"], accuracy)

    def most(a, b):
        return max((float((x.double() - y.double()).abs().max()) for x, y in zip(a, b) if torch.is_tensor(x)),
                   default=0.0)
    (loss, model, state, accuracy), (loss0, model0, state0, accuracy0) = got["head"], got["base"]
    return {"train_loss": abs(loss - loss0), "weights": most(model.values(), model0.values()),
            "optimizer_state": most([v for s in state.values() for v in s.values()],
                                    [v for s in state0.values() for v in s.values()]),
            "accuracy": most([accuracy], [accuracy0])}


def main(argv=None):
    args = parse_args(argv)
    device = cli.resolve_device(args.device)
    base_commit = args.base
    batch = 128 if args.quick else 512
    results = {"command": " ".join(["python", "benchmarks/bench_revisions.py"] + (argv or sys.argv[1:])),
               "git_commit": git_commit(), "base_commit": base_commit, "device": describe_device(device),
               "torch": torch.__version__, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
               "protocol": {"setting": args.setting, "batch_size": batch, "steps_per_epoch": args.steps,
                            "timed_epochs": args.epochs, "seed": 0, "data": "random uint8 images and labels"},
               "methods": {}}
    with tempfile.TemporaryDirectory() as folder:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", base_commit], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", folder], input=archive.stdout, check=True)
        revisions = {"base": import_revision(Path(folder)), "head": import_revision(REPO)}
        if args.numbers:
            for method in args.methods.split(","):
                differences = same_numbers(revisions, method, args.setting, batch, args.steps, device)
                results["methods"][method] = {"largest_difference_head_base": differences}
                print(f"{method:16s} largest |head - base|: {differences}", flush=True)
            write_if_clean(results, out_path(args.out, f"numbers-{base_commit}-{device_tag(device)}.json"))
            return 0
        for method in args.methods.split(","):
            num_tasks = revisions["head"].loaders.NUM_TASKS[args.setting]
            data = random_data(args.setting, batch * args.steps, num_tasks, device)
            paths = {name: epoch_of(rev, build_run(rev, method, args.setting, batch, device), data)
                     for name, rev in revisions.items()}
            times = step_ms(paths, args.epochs, args.steps, device)
            figures = {name: round(min(ms), 2) for name, ms in times.items()}
            ratios = {"fastest": round(figures["head"] / figures["base"], 3),
                      "median_paired": round(statistics.median(h / b for h, b in zip(times["head"], times["base"])), 3)}
            results["methods"][method] = {"ms_per_step": figures, "head_over_base": ratios,
                                          "ms_per_step_each_epoch": {name: [round(t, 2) for t in ms]
                                                                     for name, ms in times.items()}}
            print(f"{method:16s} ms/step base {figures['base']:8.2f}  head {figures['head']:8.2f}  head/base "
                  f"{ratios['fastest']:.3f} (fastest epochs), {ratios['median_paired']:.3f} (median of the epochs)",
                  flush=True)
    name = f"revisions-{base_commit}-{device_tag(device)}{'-quick' if args.quick else ''}.json"
    write_if_clean(results, out_path(args.out, name))
    return 0


if __name__ == "__main__":
    cli.exit_with(main)
