"""Plot mean test accuracy against #P for one Multi-MNIST setting (as the paper's Figure 3), ours beside the paper.

    python -m experiments.plots.accuracy_vs_params --setting 9digits     # reads results/table2_full.json (the README's)

x: #P as in experiments/table2.py's table and the paper's Table 2 (parameters as a multiple of one LeNet's; the paper's
points at its Table 2 #P), log scale; markers of methods whose #P are within 3% of each other (e.g. the four
multi-branch rows) are spread sideways by a few percent so that each stays visible. y: test accuracy (%) at the
best-validation epoch, mean over tasks and seeds, ± 1 std bars. Only the methods with runs in the setting are drawn,
each in its own colour, and the legend sits beside the axes, inside the image. --table is any table written by
experiments/table2.py (default: the README's Table 2, results/table2_full.json). Writes
runs/table2_<setting>_acc_vs_params.png unless --out names another path. Needs matplotlib (pip install matplotlib), which nothing else in this repo needs.
"""
import json
import sys
from pathlib import Path

from training import cli
from experiments.plots import pyplot, save_figure
from experiments.table2 import SETTINGS, TITLES

CLOSE = 1.03   # #P within this ratio of each other share a position: their markers are spread
SPREAD = 0.02  # sideways step between such markers, in decades of the log axis (x 1.047)


def parse_args(argv):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", default="results/table2_full.json",
                        help="written by experiments/table2.py (default: the README's Table 2, results/table2_full.json)")
    parser.add_argument("--setting", default="9digits", choices=tuple(SETTINGS), help="Multi-MNIST setting (column)")
    parser.add_argument("--out", help="output image (default runs/table2_<setting>_acc_vs_params.png)")
    return parser.parse_args(argv)


def spread(table, setting):
    """{method: factor} multiplying the #P of its markers, for the methods with runs in ``setting`` (the ones
    drawn): 1 for a method alone at its #P; for k methods whose #P chain within ``CLOSE`` of each other, factors
    10 ** (SPREAD * (i - (k - 1) / 2)) in the table's row order."""
    where = {method: row[setting]["params_x"] for method, row in table["rows"].items() if row[setting]["n"]}
    clusters = []
    for method in sorted(where, key=where.get):
        if clusters and where[method] <= CLOSE * where[clusters[-1][-1]]:
            clusters[-1].append(method)
        else:
            clusters.append([method])
    order = list(table["rows"])
    factors = {}
    for cluster in clusters:
        cluster.sort(key=order.index)
        for i, method in enumerate(cluster):
            factors[method] = 10 ** (SPREAD * (i - (len(cluster) - 1) / 2))
    return factors


def method_colors(plt, count):
    """``count`` distinct colours: tab10's, then tab20's light shades of the same ten hues."""
    tab20 = plt.get_cmap("tab20")
    return [tab20(2 * (index % 10) + index // 10 % 2) for index in range(count)]


def figure(plt, table, setting):
    fig, ax = plt.subplots(figsize=(10, 5), layout="constrained")
    drawn = {method: row[setting] for method, row in table["rows"].items() if row[setting]["n"]}
    factors = spread(table, setting)
    handles = []
    for (method, cell), color in zip(drawn.items(), method_colors(plt, len(drawn))):
        factor = factors.get(method, 1.0)
        in_paper = cell["paper_acc"] is not None
        if in_paper:
            ax.scatter(cell["paper_params_x"] * factor, cell["paper_acc"], marker="s", facecolors="none",
                       edgecolors=color, s=60)
            ax.plot([cell["params_x"] * factor, cell["paper_params_x"] * factor], [cell["acc_mean"], cell["paper_acc"]],
                    ":", color=color, linewidth=0.8)
        ax.errorbar(cell["params_x"] * factor, cell["acc_mean"], yerr=cell["acc_std"] or 0, fmt="o", color=color,
                    capsize=3)
        handles += ax.plot([], [], "s", color=color, label=method + ("" if in_paper else " (not in the paper)"))
    handles += [ax.scatter([], [], marker="o", color="gray", label="ours (mean ± std over seeds)"),
                ax.scatter([], [], marker="s", facecolors="none", edgecolors="gray", label="paper (its Table 2 #P)")]
    fig.legend(handles=handles, loc="outside right upper", title="method", fontsize=8)
    ax.set_xscale("log")
    plain = plt.FuncFormatter(lambda value, _: f"{value:g}")  # 2, 3, ... rather than 2 x 10^0
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("#P: parameters as a multiple of one LeNet's, as in Table 2 (log scale)\n"
                  "methods with the same #P are drawn a few percent apart, in the legend's order")
    ax.set_ylabel("test accuracy, mean over tasks (%)")
    protocol = table["protocol"]
    shown = "no runs" if protocol is None else f"{protocol['epochs']} epochs" + \
        (f", subset of {protocol['subset']} training images" if protocol["subset"] else "")
    ax.set_title(f"Multi-MNIST, {TITLES[setting]} ({shown})")
    ax.grid(True, which="both", alpha=0.3)
    return fig


def main(argv=None):
    args = parse_args(argv)
    plt = pyplot("experiments/plots/accuracy_vs_params.py")
    if plt is None:
        return 2
    if not Path(args.table).is_file():
        print(f"error: {args.table} not found; run experiments/table2.py (or experiments/table2_sweep.py) first", file=sys.stderr)
        return 2
    table = json.loads(Path(args.table).read_text())
    if any(args.setting not in row for row in table["rows"].values()):
        print(f"error: {args.table} has no column '{args.setting}'; rebuild it with experiments/table2.py", file=sys.stderr)
        return 2
    if not any(row[args.setting]["n"] for row in table["rows"].values()):
        print(f"error: {args.table} has no run in '{args.setting}'; nothing to plot", file=sys.stderr)
        return 2
    out = Path(args.out or f"runs/table2_{args.setting}_acc_vs_params.png")
    save_figure(plt, figure(plt, table, args.setting), out, dpi=150)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    cli.exit_with(main)
