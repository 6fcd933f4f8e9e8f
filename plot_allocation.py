"""Plots a learned parameter allocation (Maziarz et al., arXiv 1910.04915, allocation figures of Sec. 5; spec
``gumbel_matrix.md`` §3, ``clusters/plot``) from the ``allocation.json`` that ``gumbel_experiment.py`` writes.

    python plot_allocation.py results/gumbel_mnist/gumbel_matrix [--out DIR] [--probabilities]

Writes ``allocation.png`` (tasks x components, routed layers side by side: the greedy binary allocation, or the
connection probabilities with ``--probabilities``) and ``similarity.png`` (pairwise cosine similarity of the tasks'
binary allocation rows, as ``clusters/plot``). Needs matplotlib (exit code 2 with an install hint if missing).
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

import cli


def task_similarity(allocation):
    """Cosine similarity ``[T, T]`` of the rows of a binary allocation ``[T, N]``; 0 for a task using nothing."""
    rows = np.asarray(allocation, dtype=float)
    norms = np.linalg.norm(rows, axis=1)
    norms[norms == 0] = np.inf
    unit = rows / norms[:, None]
    return unit @ unit.T


def plot_allocation(plt, record, probabilities, path):
    matrix = np.asarray(record["probabilities" if probabilities else "greedy"])
    tasks, k = record["tasks"], record["num_components"]
    fig, ax = plt.subplots(figsize=(0.45 * matrix.shape[1] + 2.5, 0.45 * len(tasks) + 1.5))
    image = ax.imshow(matrix, cmap="Greys", vmin=0, vmax=1, aspect="equal")
    for boundary in range(k, matrix.shape[1], k):
        ax.axvline(boundary - 0.5, color="tab:red", linewidth=2)
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xticks([i * k + (k - 1) / 2 for i in range(len(record["layers"]))], record["layers"])
    ax.set_title("connection probability" if probabilities else "greedy allocation (P >= 0.5)")
    if probabilities:
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def plot_similarity(plt, record, path):
    similarity = task_similarity(record["greedy"])
    tasks = record["tasks"]
    fig, ax = plt.subplots(figsize=(0.6 * len(tasks) + 2.5, 0.6 * len(tasks) + 1.5))
    image = ax.imshow(similarity, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    if len(tasks) <= 12:
        for i in range(len(tasks)):
            for j in range(len(tasks)):
                color = "k" if similarity[i, j] > 0.6 else "w"
                ax.text(j, i, f"{similarity[i, j]:.2f}", ha="center", va="center", color=color, fontsize=8)
    ax.set_title("task similarity (cosine of allocations)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run directory holding allocation.json, or the file itself")
    parser.add_argument("--out", help="output directory (default: the run directory)")
    parser.add_argument("--probabilities", action="store_true", help="plot probabilities instead of the greedy mask")
    args = parser.parse_args(argv)
    source = Path(args.run)
    source = source / "allocation.json" if source.is_dir() else source
    if not source.is_file():
        print(f"error: {source} not found; pass a gumbel_experiment.py output dir or its allocation.json",
              file=sys.stderr)
        return 2
    try:
        import matplotlib
    except ImportError:
        print("error: plot_allocation.py needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = json.loads(source.read_text())
    out = Path(args.out) if args.out else source.parent
    out.mkdir(parents=True, exist_ok=True)
    plot_allocation(plt, record, args.probabilities, out / "allocation.png")
    plot_similarity(plt, record, out / "similarity.png")
    print(f"wrote {out / 'allocation.png'} and {out / 'similarity.png'}")
    return 0


if __name__ == "__main__":
    cli.exit_with(main)
