"""Table 6a ("scaling the number of tasks", paper §4.5) from our runs on generated CLEVR-like data, beside the paper's.

    python -m experiments.table6a --runs_dir results/table6a_clevr_like --out results/table6a_clevr_like/table6a.md

Reads <runs_dir>/<N>tasks/<method>/results.json (N in 40, 80, 160, 1645; method in uniform_scaling, ch_mod,
controlnet), as the training script writes it, and writes --out (default runs/tables/table6a.md). Accuracy is the test accuracy at
the best-validation evaluation, averaged over the tasks that have test images (percent). The paper's numbers are
on the real CLEVR with the full protocol; ours are on a different data set with a reduced protocol, and the
table says so. A reference row gives each task's most frequent training answer (the accuracy of a model that
ignores the image), computed from the same data.
"""
import json
from pathlib import Path

import torch

from loaders import LOADERS
from runtime import files
from runtime.files import REPO
from training import cli

PAPER = json.loads((REPO / "paper" / "paper_tables.json").read_text())["table6a_clevr_scaling"]
TASKS = tuple(PAPER["tasks"])
METHODS = tuple(PAPER["rows"])  # uniform_scaling, ch_mod, controlnet
TITLES = {"uniform_scaling": "Uniform scaling", "ch_mod": "ch-mod", "controlnet": "ControlNet"}


def parse_args(argv):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs_dir", default="results/table6a_clevr_like", help="holds <N>tasks/<method>/results.json")
    parser.add_argument("--out", default="runs/tables/table6a.md", help="the Markdown table to write (default "
                        "runs/tables/table6a.md: a committed table is only replaced when it is named)")
    return parser.parse_args(argv)


def read_runs(runs_dir):
    """{(method, N): results.json content} for the cells that have one."""
    runs = {}
    for n in TASKS:
        for method in METHODS:
            path = runs_dir / f"{n}tasks" / method / "results.json"
            if path.exists():
                runs[method, n] = json.loads(path.read_text())
    return runs


def majority_accuracy(params):
    """Test accuracy (percent, mean over tasks with test images) of answering each task with its most frequent
    training label: what a model that ignores the image can reach."""
    data = LOADERS[params["dataset"]].load(params["setting"], params, params["data_root"])
    train, test = data["train"][1].long(), data["test"][1].long()
    classes = int(train.max()) + 1
    counts = torch.stack([torch.bincount(column[column >= 0], minlength=classes) for column in train.t()])
    answer = counts.argmax(dim=1)
    valid = test >= 0
    correct = ((test == answer) & valid).sum(0).double()
    per_task = 100 * correct / valid.sum(0).double()
    return float(per_task.nanmean())


def cell(run, paper):
    ours = "–" if run is None else f"{run['test_acc_mean']:.2f}"
    theirs = "n.a." if paper is None else f"{paper:.2f}"
    return f"{ours} ({theirs})"


def protocol(runs):
    """Lines describing the runs' common protocol, read off their results.json."""
    first = next(iter(runs.values()))
    p = first["params"]
    walls = sum(run["wall_time_s"] for run in runs.values())
    commits = sorted({run["git_commit"] for run in runs.values()})
    devices = sorted({run["device"] for run in runs.values()})
    varying = ("exp_id", "method", "setting", "model", "weighting", "spatial_loss_weight")
    same = all({k: v for k, v in run["params"].items() if k not in varying} ==
               {k: v for k, v in p.items() if k not in varying} and run["epochs"] == first["epochs"]
               for run in runs.values())
    epochs = first["epochs"]  # the run's (--epochs overrides the param file's)
    train_images = round(p["clevr_like_train"] * (1 - p["val_fraction"]))
    steps = epochs * -(-train_images // p["batch_size"])
    return [
        f"- Data: {p['clevr_like_train']} generated CLEVR-like train scenes ({1 - p['val_fraction']:.0%} train, "
        f"{p['val_fraction']:.0%} val) and {p['clevr_like_test']} test scenes, data seed {p['data_seed']}, rendered "
        f"{p['input_size']} px wide and resized to {p['input_size']}x{p['input_size']} (`loaders/clevr_like.py`; "
        f"CLEVR's 480x320 at 224x224 in the paper); tasks and labels by `loaders/clevr.py` ({p['relation_rule']}).",
        f"- Model: VGG-11 (the authors' CLEVR variant) at width {p['model_options'].get('width', 1.0)}; ControlNet "
        f"with the localisation loss at the bottom of TD (weight {runs.get(('controlnet', 40), first)['params']['spatial_loss_weight']}), "
        f"ch-mod and uniform scaling without it.",
        f"- Training: {p['optimizer']}, lr {p['lr']}, batch {p['batch_size']}, {epochs} epochs ({steps} "
        f"optimiser steps), lr schedule {p['lr_schedule']}, one seed ({first['seed']}); evaluated every "
        f"{p['eval_every']} epochs and after the last. "
        f"{'The same protocol in every cell.' if same else 'NOTE: the cells differ in protocol.'}",
        f"- Device: {', '.join(devices)}; total wall time of the shown runs {walls / 60:.1f} min (training and "
        f"evaluation); commit(s) {', '.join(f'`{c}`' for c in commits)}.",
    ]


def markdown(runs, majority, runs_dir, out=None):
    lines = ["# Table 6a on CLEVR-like data (reduced protocol)", "",
             "**A different data set and protocol from the paper's.** Ours: generated CLEVR-like scenes, a reduced "
             "VGG-11 and a short training on a CPU (protocol below). Paper (in brackets): CLEVR v1.0 at 224 px, the "
             "full VGG-11, 100 epochs on 70K images, mean of 5 runs. The numbers are not comparable; at most the "
             "trend over the number of tasks is.", "",
             "Test accuracy (%) at the best-validation evaluation, mean over tasks with test images; (paper). "
             "#P: parameters as a multiple of the plain backbone at the same width and input size.", "",
             "| Method | " + " | ".join(f"{n} tasks" for n in TASKS) + " | #P (ours) |",
             "|---|" + "---|" * (len(TASKS) + 1)]
    for method in METHODS:
        cells = [cell(runs.get((method, n)), PAPER["rows"][method][i]) for i, n in enumerate(TASKS)]
        sizes = ", ".join(f"x{runs[method, n]['params_x']:.2f}" for n in TASKS if (method, n) in runs)
        lines.append(f"| {TITLES[method]} | " + " | ".join(cells) + f" | {sizes} |")
    lines.append("| most frequent training answer (no image) | " +
                 " | ".join(f"{majority[n]:.2f}" if n in majority else "–" for n in TASKS) + " | |")
    missing = [f"{TITLES[m]} {n}" for n in TASKS for m in METHODS if (m, n) not in runs]
    above = [key for key, run in runs.items() if run["test_acc_mean"] > majority[key[1]]]
    lines += ["", "–: not run here" + (f" ({', '.join(missing)})" if missing else "") +
              "; n.a.: not run in the paper (uniform scaling above 80 tasks did not fit in memory).",
              f"Cells above the no-image answer: {len(above)} of {len(runs)}" +
              (" (at this budget no model beats answering without looking at the image)." if not above else "."), "",
              "Protocol (read off the runs' results.json):", ""] + protocol(runs) + [
              "", f"Generated by `python -m experiments.table6a --runs_dir {runs_dir}" + (f" --out {out}`." if out else "`.")]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    runs_dir = Path(args.runs_dir)
    runs = read_runs(runs_dir)
    if not runs:
        raise SystemExit(f"error: no <N>tasks/<method>/results.json under {runs_dir}")
    majority = {n: majority_accuracy(next(run for (_, m), run in runs.items() if m == n)["params"])
                for n in sorted({n for _, n in runs})}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    files.write_text(markdown(runs, majority, runs_dir, out), out)
    print(out)
    return 0


if __name__ == "__main__":
    cli.exit_with(main)
