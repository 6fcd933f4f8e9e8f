"""Plot mean accuracy against model size on 9 digits by location (as the paper's Figure 3), ours beside the paper.

    python plot_accuracy_vs_params.py            # reads results/table2.json (make_table2.py)

x: weights as a multiple of one LeNet's 24,250 weights (the paper's Figure 3 unit; the paper's points use its
Table 2 #P), log scale; y: test accuracy (%) at the best-validation epoch, mean over seeds, ± 1 std bars.
Needs matplotlib (pip install matplotlib), which nothing else in this repo needs.
"""
import argparse
import json
import sys
from pathlib import Path

import cli

SETTING = "9digits"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", default="results/table2.json", help="written by make_table2.py")
    parser.add_argument("--out", default="results/table2_9digits_acc_vs_params.png", help="output image")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("error: this plot needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    if not Path(args.table).is_file():
        print(f"error: {args.table} not found; run make_table2.py (or reproduce_table2.py) first", file=sys.stderr)
        return 2
    table = json.loads(Path(args.table).read_text())

    fig, ax = plt.subplots(figsize=(9, 5))
    colors = plt.get_cmap("tab10")
    for index, (method, row) in enumerate(table["rows"].items()):
        cell, color = row[SETTING], colors(index)
        in_paper = cell["paper_acc"] is not None
        if in_paper:
            ax.scatter(cell["paper_params_x"], cell["paper_acc"], marker="s", facecolors="none", edgecolors=color, s=60)
        if cell["n"]:
            ax.errorbar(cell["weights_x"], cell["acc_mean"], yerr=cell["acc_std"] or 0, fmt="o", color=color, capsize=3)
        if cell["n"] and in_paper:
            ax.plot([cell["weights_x"], cell["paper_params_x"]], [cell["acc_mean"], cell["paper_acc"]], ":",
                    color=color, linewidth=0.8)
        label = method + ("" if in_paper else " (not in the paper)") + ("" if cell["n"] else " (no runs)")
        ax.plot([], [], "s", color=color, label=label)
    methods = ax.legend(title="method", loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    ax.add_artist(methods)
    ours = ax.scatter([], [], marker="o", color="gray", label="ours (mean ± std over seeds)")
    paper = ax.scatter([], [], marker="s", facecolors="none", edgecolors="gray", label="paper (Table 2 #P)")
    ax.legend(handles=[ours, paper], loc="lower left", bbox_to_anchor=(1.02, 0.0), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters (multiple of one LeNet, 24,250 weights)")
    ax.set_ylabel("mean test accuracy over tasks (%)")
    protocol = table["protocol"]
    shown = "no runs" if protocol is None else f"{protocol['epochs']} epochs" + \
        (f", subset {protocol['subset']}" if protocol["subset"] else "")
    ax.set_title(f"Multi-MNIST, 9 digits by location ({shown})")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=150)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    cli.exit_with(main)
