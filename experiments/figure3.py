"""Figure 3: accuracy vs number of parameters on 9 digits by location, for width-scaled variants of each family.

    python -m experiments.figure3 --epochs 100 --seeds 5                         # the paper's protocol
    python -m experiments.figure3 --epochs 10 --subset 5000 --seeds 1 --out_dir results/figure3_cpu_reduced

Paper §4.5: "within each family, parameters can be changed by changing (uniformly) the number of channels along the
network"; small markers are wider LeNets (ch-mod extended) and ControlNets with reduced TD streams (1, 4 or 6
channels). Every variant is the method's param file (params/mmnist_9digits_<method>.json) with ``model_options``
scaled: c1, c2, hidden = round(m * (10, 20, 50)) for the width multipliers ``--widths``, and, for ControlNet,
``td_channels`` = (k, k) for k in ``--td_channels``. Each run trains with train_multi_task_counter_stream.py into
<runs_dir>/<variant>/seed<k> (resumable: finished runs are kept; rerun the same command to continue); then the
accuracies (mean over seeds of the test accuracy at the best-validation epoch) and #weights (x one LeNet's 24,250,
the figure's axis) go to <out_dir>/figure3.{json,md,png}, with the paper's Table 2 points (large markers) beside.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from runtime import files
from training import cli
from experiments import table2_sweep
from experiments.table2 import PAPER
from runtime.files import REPO

SCRIPT = REPO / "train_multi_task_counter_stream.py"
FAMILIES = ("single_task", "uniform_scaling", "ch_mod", "controlnet")  # the figure's four curves
LENET_WIDTHS = {"c1": 10, "c2": 20, "hidden": 50}


def parse_args(argv):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser = cli.protocol_arguments(parser, "runs/figure3", "runs/tables/figure3")
    parser.add_argument("--widths", type=float_list, default=[0.5, 1.0, 2.0], help="channel multipliers m")
    parser.add_argument("--td_channels", type=int_list, default=[1, 4, 6], help="ControlNet TD stream widths")
    return parser.parse_args(argv)


def float_list(text):
    try:
        values = [float(item) for item in text.split(",") if item]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected a comma list of multipliers > 0, got {text!r}")
    return values


def int_list(text):
    try:
        values = [int(item) for item in text.split(",") if item]
    except ValueError:
        values = []
    if min(values, default=1) < 1 or (text and not values):
        raise argparse.ArgumentTypeError(f"expected a comma list of channel counts >= 1 (or nothing), got {text!r}")
    return values


def variants(widths, td_channels):
    """[(name, family, model_options)]: every family at every width, and ControlNet with narrow TD streams."""
    found = []
    for family in FAMILIES:
        for m in widths:
            options = {} if m == 1.0 else {key: max(1, round(m * c)) for key, c in LENET_WIDTHS.items()}
            found.append((f"{family}_w{m:g}", family, options))
    found += [(f"controlnet_td{k}", "controlnet", {"td_channels": [k, k]}) for k in td_channels]
    return found


def param_file(runs_dir, name, family, options):
    """Writes the variant's param file (the method's, with scaled model_options) next to its runs."""
    params = json.loads((REPO / "params" / f"mmnist_9digits_{family}.json").read_text())
    params.update(exp_id=f"figure3_{name}", model_options={**params.get("model_options", {}), **options})
    path = runs_dir / name / "params.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_text(json.dumps(params, indent=4) + "\n", path)
    return path


def train(path, out, args, state):
    command = [sys.executable, str(SCRIPT), "--param_file", str(path), "--epochs", str(args.epochs), "--seed",
               out.name[4:], "--out", str(out), "--device", args.device]
    command += ["--subset", str(args.subset)] if args.subset else []
    command += ["--resume"] if state == "resume" else []
    return subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def main(argv=None):
    args = parse_args(argv)
    runs_dir = Path(args.runs_dir).resolve()
    points, failed = [], []
    for name, family, options in variants(args.widths, args.td_channels):
        path = param_file(runs_dir, name, family, options)
        runs = []
        for seed in args.seeds:
            out = runs_dir / name / f"seed{seed}"
            state, why = table2_sweep.cell_state(out, args.epochs, args.subset)
            if state == "conflict":
                failed.append(f"{name}/seed{seed}: {why}")
                continue
            if state != "done":
                print(f"training {name} seed {seed} ({state})", flush=True)
                proc = train(path, out, args, state)
                if proc.returncode != 0:
                    failed.append(f"{name}/seed{seed}: exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
                    continue
            runs.append(json.loads((out / "results.json").read_text()))
        if runs:
            accs = [run["test_acc_mean"] for run in runs]
            points.append({"variant": name, "family": family, "model_options": options, "n": len(runs),
                           "seeds": [run["seed"] for run in runs], "weights_x": runs[0]["weights_x"],
                           "params_x": runs[0]["params_x"], "acc_mean": statistics.fmean(accs),
                           "acc_std": statistics.stdev(accs) if len(accs) > 1 else None,
                           "devices": sorted({run["device"] for run in runs}),
                           "git_commits": sorted({run["git_commit"] for run in runs})})
    command = cli.command_line(__spec__.name, argv)
    write_outputs(points, args, command, Path(args.out_dir))
    for line in failed:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if failed else 0


def paper_points():
    """The paper's Table 2 points of the four families on 9 digits by location (the figure's large markers)."""
    column = PAPER["settings"].index("9_digits_by_loc")
    return {family: {"params_x": PAPER["rows"][family]["params_x"][column], "acc": PAPER["rows"][family]["acc"][column]}
            for family in FAMILIES}


def write_outputs(points, args, command, out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"command": command, "epochs": args.epochs, "subset": args.subset, "seeds": args.seeds,
               "setting": "9digits", "points": points, "paper_table2_points": paper_points()}
    files.write_json(summary, out_dir / "figure3.json")
    protocol = f"{args.epochs} epochs, " + (f"subset {args.subset}" if args.subset else "full data") + \
        f", seeds {', '.join(map(str, args.seeds))}"
    lines = ["# Figure 3: accuracy vs #weights, 9 digits by location", "", f"- Protocol: {protocol}.",
             f"- Generated by: `{command}`.", "",
             "| family | variant | model_options | #W (x LeNet) | acc (%) | paper's Table 2 point (#P, acc) |",
             "|---|---|---|---|---|---|"]
    for point in points:
        std = "" if point["acc_std"] is None else f" ± {point['acc_std']:.2f}"
        paper = summary["paper_table2_points"][point["family"]]
        lines.append(f"| {point['family']} | {point['variant']} | `{json.dumps(point['model_options'])}` | "
                     f"{point['weights_x']:.3f} | {point['acc_mean']:.2f}{std} (n={point['n']}) | "
                     f"x{paper['params_x']:g}, {paper['acc']:.2f} |")
    files.write_text("\n".join(lines) + "\n", out_dir / "figure3.md")
    plot(summary, out_dir / "figure3.png")


def plot(summary, path):
    """The figure (needs matplotlib; skipped with a note when it is missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed: figure3.png not drawn (pip install matplotlib)", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, family in enumerate(FAMILIES):
        color = plt.get_cmap("tab10")(index)
        mine = sorted((p for p in summary["points"] if p["family"] == family), key=lambda p: p["weights_x"])
        ax.plot([p["weights_x"] for p in mine], [p["acc_mean"] for p in mine], "o-", color=color, label=family)
        paper = summary["paper_table2_points"][family]
        ax.scatter(paper["params_x"], paper["acc"], marker="s", s=90, facecolors="none", edgecolors=color)
    ax.set_xscale("log")
    ax.set_xlabel("#weights (x 24,250, one LeNet)")
    ax.set_ylabel("test accuracy (%), 9 digits by location")
    ax.set_title(f"ours: {summary['epochs']} epochs" + (f", subset {summary['subset']}" if summary["subset"] else "")
                 + "; open squares: the paper's Table 2", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    cli.exit_with(main)
