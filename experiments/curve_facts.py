"""The facts of a run's learning curve that a Table 2 reason is grounded in (issue 16, item 6), read off its
metrics.jsonl: the test accuracy at the best-validation, last and best-test epochs, the test accuracy and training
loss at 10/30/60/90/100% of the epochs, and one word for the curve's end.

    python -m experiments.curve_facts results/table2_full/9digits_byref
    python -m experiments.curve_facts runs/table2_full/9digits/controlnet/seed0 --json

The word (its thresholds are stated beside it): ``rising`` when the test accuracy of the last 10% of the evaluated
epochs exceeds the best before them by at least RISING points; ``overfits`` when the validation accuracy at the last
epoch lies at least OVERFIT points below its peak and the peak comes before the last 40% of the epochs; else ``flat``.
RUN: a run directory or a folder searched for them (as experiments/plots/curves.py). Mistakes: one line, exit 2.
"""
import json
import sys

from experiments.plots.curves import CurveError, find_runs, load_run
from metrics import select_record
from training import cli

RISING = 0.5  # points of test accuracy gained in the last 10% of the evaluated epochs
OVERFIT = 1.0  # points of validation accuracy lost from the peak to the last epoch
FRACTIONS = (0.1, 0.3, 0.6, 0.9, 1.0)


def parse_args(argv):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories, or folders searched for them")
    parser.add_argument("--json", action="store_true", help="one JSON object per run instead of text")
    return parser.parse_args(argv)


def facts(records):
    """The curve's facts as a dict (see the module's docstring); epochs without a test figure are skipped."""
    scored = [r for r in records if r.get("test_acc_mean") is not None]
    if not scored:
        raise CurveError("no evaluated epoch (no test_acc_mean) in metrics.jsonl yet")
    epochs = scored[-1]["epoch"]
    tail = max(1, round(len(scored) * 0.1))
    before, last_tenth = scored[:-tail], scored[-tail:]
    chosen = {name: select_record(scored, name) for name in ("best_val", "last", "best_test")}
    at = {}
    for fraction in FRACTIONS:
        record = min(scored, key=lambda r: (abs(r["epoch"] - fraction * epochs), r["epoch"]))
        at[record["epoch"]] = {"test": record["test_acc_mean"], "train_loss": record["train_loss"]}
    gain = max(r["test_acc_mean"] for r in last_tenth) - max(r["test_acc_mean"] for r in before) if before else None
    val = [r for r in scored if r.get("val_acc_mean") is not None]
    peak = max(val, key=lambda r: r["val_acc_mean"]) if val else None
    val_drop = peak["val_acc_mean"] - val[-1]["val_acc_mean"] if val else None
    if gain is not None and gain >= RISING:
        shape = "rising"
    elif peak is not None and val_drop >= OVERFIT and peak["epoch"] < 0.6 * epochs:
        shape = "overfits"
    else:
        shape = "flat"
    return {"epochs": epochs,
            **{f"test_{name}": None if r is None else r["test_acc_mean"] for name, r in chosen.items()},
            **{f"epoch_{name}": None if r is None else r["epoch"] for name, r in chosen.items()},
            "at": at, "test_gain_last_tenth": gain,
            "val_peak_epoch": None if peak is None else peak["epoch"], "val_drop_from_peak": val_drop,
            "shape": shape}


def number(value, digits=2):
    return "–" if value is None else f"{value:.{digits}f}"


def render(name, f):
    lines = [f"{name}: {f['shape']} ({f['epochs']} epochs)",
             f"  test at best-val epoch {f['epoch_best_val']}: {number(f['test_best_val'])}, at the last epoch: "
             f"{number(f['test_last'])}, at the best test epoch {f['epoch_best_test']}: {number(f['test_best_test'])}",
             "  test by epoch: " + ", ".join(f"{e}: {number(v['test'])}" for e, v in f["at"].items()),
             "  training loss by epoch: " + ", ".join(f"{e}: {number(v['train_loss'])}" for e, v in f["at"].items()),
             f"  test gain in the last 10% of evaluated epochs over the best before: {number(f['test_gain_last_tenth'])}"
             f" (rising from {RISING}); validation peak at epoch {f['val_peak_epoch']}, the last epoch "
             f"{number(f['val_drop_from_peak'])} below it (overfits from {OVERFIT}, with the peak before 60% of the "
             "epochs)"]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    try:
        runs = [load_run(directory) for directory in find_runs(args.runs)]
        found = []
        for run in runs:
            try:
                found.append((run, facts(run["records"])))
            except CurveError as err:
                raise CurveError(f"{run['dir'] / 'metrics.jsonl'}: {err}") from None
    except (CurveError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for run, f in found:
        info = run["info"] or {}
        name = "/".join(str(info[k]) for k in ("setting", "method") if k in info) or str(run["dir"])
        name += f" seed {info['seed']}" if "seed" in info else ""
        print(json.dumps({"run": str(run["dir"]), **f}) if args.json else render(name, f))
    return 0


if __name__ == "__main__":
    cli.exit_with(main)
