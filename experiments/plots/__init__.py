"""Figures from committed or fresh runs: accuracy against parameters (Table 2), learning curves, learned
allocations. Each runs as ``python -m experiments.plots.<module> ...`` and writes under runs/plots unless told
otherwise."""
import sys


def pyplot(script):
    """matplotlib.pyplot on the file-only Agg backend, or None after one error line with the install command."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"error: {script} needs matplotlib: pip install matplotlib", file=sys.stderr)
        return None
    return plt


def save_figure(plt, fig, out, dpi):
    """Writes ``fig`` to ``out`` (its folder made if missing) and frees it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
