"""What every entry point shares at the command line: Ctrl-C ends it with one line and exit code 130."""
import sys


def exit_with(main):
    """Runs ``main()`` and exits with its code; Ctrl-C prints one line instead of a traceback and exits with 130.
    Every file a script writes is written atomically (checkpoint.py), so none is left half-written."""
    try:
        code = main()
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C); every file written so far is complete: rerun the same command to start "
              "again (training runs continue with --resume)", file=sys.stderr)
        code = 130
    sys.exit(code)


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
