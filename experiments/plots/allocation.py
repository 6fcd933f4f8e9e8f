"""Plots a learned parameter allocation (Maziarz et al., arXiv 1910.04915, allocation figures of Sec. 5;
``learning_parameter_allocation/clusters/plot.py`` of google-research/google-research@0c1bbe5f) from the
``allocation.json`` that ``training/round_robin.py`` writes.

    python -m experiments.plots.allocation results/gumbel_mnist/gumbel_matrix --out results/gumbel_mnist/gumbel_matrix [--probabilities]

Writes ``allocation.png`` (tasks x components, routed layers side by side: the greedy binary allocation, or the
connection probabilities with ``--probabilities``) and ``similarity.png`` (pairwise cosine similarity of the tasks'
binary allocation rows, as ``clusters/plot``), each with a colour key and titled with the run (folder, method,
seed and steps from the ``results.json`` beside the allocation). Needs matplotlib (exit code 2 with an install
hint if missing).
"""
import json
import sys
from pathlib import Path

import numpy as np

from training import cli


def task_similarity(allocation):
    """Cosine similarity ``[T, T]`` of the rows of a binary allocation ``[T, N]``; 0 for a task using nothing."""
    rows = np.asarray(allocation, dtype=float)
    norms = np.linalg.norm(rows, axis=1)
    norms[norms == 0] = np.inf
    unit = rows / norms[:, None]
    return unit @ unit.T


def run_title(source):
    """The run an allocation.json belongs to, from the results.json beside it: folder, method, seed, steps."""
    results = source.parent / "results.json"
    if not results.is_file():
        return str(source.parent)
    info = json.loads(results.read_text())
    return f"{source.parent}\n{info['method']}, seed {info['seed']}, {info['steps']} steps"


def colour_key(fig, ax, image):
    """A colorbar beside ``ax``, as tall as its image."""
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    return fig.colorbar(image, cax=make_axes_locatable(ax).append_axes("right", size=0.2, pad=0.15))


def plot_allocation(plt, record, probabilities, title):
    matrix = np.asarray(record["probabilities" if probabilities else "greedy"])
    tasks, k = record["tasks"], record["num_components"]
    fig, ax = plt.subplots(figsize=(0.45 * matrix.shape[1] + 3.5, 0.45 * len(tasks) + 2.5))
    if probabilities:
        image = ax.imshow(matrix, cmap="Greys", vmin=0, vmax=1, aspect="equal")
    else:  # two colours, one per value
        from matplotlib.colors import BoundaryNorm, ListedColormap

        two = ListedColormap(["white", "black"])
        image = ax.imshow(matrix, cmap=two, norm=BoundaryNorm([-0.5, 0.5, 1.5], two.N), aspect="equal")
    for boundary in range(k, matrix.shape[1], k):
        ax.axvline(boundary - 0.5, color="tab:red", linewidth=2)
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_ylabel("task")
    ax.set_xticks(range(matrix.shape[1]), [str(i % k) for i in range(matrix.shape[1])], fontsize=7)
    ax.set_xlabel("component (index within its routed layer; red lines separate the layers)")
    layers = ax.secondary_xaxis("top")
    layers.set_xticks([i * k + (k - 1) / 2 for i in range(len(record["layers"]))], record["layers"])
    layers.set_xlabel("routed layer")
    shown = "connection probability P" if probabilities else "greedy allocation (component used if P >= 0.5)"
    ax.set_title(f"{title}\n{shown}", fontsize=10)
    key = colour_key(fig, ax, image)
    if probabilities:
        key.set_label("P(task uses the component)")
    else:
        key.set_ticks([0, 1], labels=["not used", "used"])
    fig.tight_layout()
    return fig


def plot_similarity(plt, record, title):
    similarity = task_similarity(record["greedy"])
    tasks = record["tasks"]
    fig, ax = plt.subplots(figsize=(max(0.6 * len(tasks) + 3.5, 7.0), 0.6 * len(tasks) + 2.5))
    image = ax.imshow(similarity, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("task")
    ax.set_ylabel("task")
    if len(tasks) <= 12:
        for i in range(len(tasks)):
            for j in range(len(tasks)):
                color = "k" if similarity[i, j] > 0.6 else "w"
                ax.text(j, i, f"{similarity[i, j]:.2f}", ha="center", va="center", color=color, fontsize=8)
    ax.set_title(f"{title}\ntask similarity (cosine of the greedy allocation rows)", fontsize=10)
    colour_key(fig, ax, image).set_label("cosine similarity (1 = the same components)")
    fig.tight_layout()
    return fig


def parse_args(argv):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run directory holding allocation.json, or the file itself")
    parser.add_argument("--out", help="output directory (default runs/plots/<run folder name>: a committed figure is "
                        "only replaced when its folder is named)")
    parser.add_argument("--probabilities", action="store_true", help="plot probabilities instead of the greedy mask")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    source = Path(args.run)
    source = source / "allocation.json" if source.is_dir() else source
    if not source.is_file():
        print(f"error: {source} not found; pass a training/round_robin.py output dir or its allocation.json",
              file=sys.stderr)
        return 2
    try:
        import matplotlib
    except ImportError:
        print("error: experiments/plots/allocation.py needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = json.loads(source.read_text())
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "runs" / "plots" / source.parent.name
    out.mkdir(parents=True, exist_ok=True)
    title = run_title(source)
    for fig, name in ((plot_allocation(plt, record, args.probabilities, title), "allocation.png"),
                      (plot_similarity(plt, record, title), "similarity.png")):
        fig.savefig(out / name, dpi=150)
        plt.close(fig)
    print(f"wrote {out / 'allocation.png'} and {out / 'similarity.png'}")
    return 0


if __name__ == "__main__":
    cli.exit_with(main)
