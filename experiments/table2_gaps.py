"""The open cells of Table 2 (results/table2_gaps.md): every question's variants beside the committed cell they
question and the paper, with one answer line per question.

    python -m experiments.table2_gaps --runs_dir results/table2_gaps --baseline results/table2_full \\
        --answers results/table2_gaps_answers.json --out results/table2_gaps.md

A question's runs lie at ``<runs_dir>/<question>/<variant>/<setting>/<method>/seed<k>/`` (a sweep run with
``--runs_dir <runs_dir>/<question>/<variant>``). The variant ``default`` is the committed protocol itself: its rows
add the cell's seed-0 run from ``--baseline`` to their seeds, so seeds 1 and 2 read as n = 3. Runs of one row
must share their protocol and overrides (else exit 1, naming them). ``--answers`` maps a question to its answer
line; a question without one reads "runs in progress".
"""
import json
import sys
from collections import defaultdict
from pathlib import Path

from experiments.table2 import PAPER, SETTINGS, TITLES, figure, load_runs, mean_std, method_variant, protocol_of
from runtime import files
from training import cli

DEFAULT = "default"
COLUMNS = ("variant", "setting", "method", "seeds", "test acc (best val)", "last epoch", "best test epoch",
           "paper", "Δ paper", "committed seed 0", "Δ committed", "hours per run", "method options", "overrides")


def parse_args(argv):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs_dir", default="results/table2_gaps",
                        help="<question>/<variant>/<setting>/<method>/seed<k> folders (default results/table2_gaps)")
    parser.add_argument("--baseline", default="results/table2_full",
                        help="the committed Table 2 runs, <setting>/<method>/seed<k> (default results/table2_full)")
    parser.add_argument("--answers", default=None, help="JSON {question: answer line}")
    parser.add_argument("--out", default="runs/tables/table2_gaps.md",
                        help="the Markdown file (default runs/tables/table2_gaps.md)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        answers = json.loads(Path(args.answers).read_text()) if args.answers else {}
        table = collect(args.runs_dir, args.baseline)
    except (OSError, json.JSONDecodeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    files.write_text(render(table, answers, cli.command_line("experiments.table2_gaps", argv)), args.out)
    print(f"wrote {args.out}")
    return 0


def collect(runs_dir, baseline_dir):
    """{question: [row]}, one row per (variant, setting, method): its runs' figures, the committed seed-0 cell and
    the paper's value. ValueError when the runs of a row differ in protocol or overrides."""
    if not Path(runs_dir).is_dir():
        raise ValueError(f"{runs_dir} is not a folder")
    baseline = {(run["setting"], run["method"]): run for run in load_runs(baseline_dir)[0] if run.get("seed") == 0}
    groups = defaultdict(list)
    for run in load_runs(runs_dir)[0]:
        question, variant = Path(run["path"]).relative_to(runs_dir).parts[:2]
        groups[question, variant, run["setting"], run["method"]].append(run)
    table = defaultdict(list)
    for (question, variant, setting, method), runs in sorted(groups.items()):
        committed = baseline.get((setting, method))
        if variant == DEFAULT and committed is not None and all(run["seed"] != 0 for run in runs):
            runs = [committed] + runs
        check_same_protocol(runs, f"{question}/{variant}/{setting}/{method}")
        table[question].append(row(variant, setting, method, runs, committed))
    return dict(table)


def check_same_protocol(runs, where):
    kinds = {(protocol_of(run), tuple(sorted(run.get("overrides") or ()))) for run in runs}
    if len(kinds) > 1:
        paths = ", ".join(run["path"] for run in runs)
        raise ValueError(f"{where}: its runs differ in protocol or overrides, so they cannot be averaged: {paths}")


def row(variant, setting, method, runs, committed):
    """One variant's figures in one cell. Its accuracy is the test accuracy at the best-validation epoch; runs
    without a validation split (``protocol`` authors) have none, so theirs is the best test epoch's
    (``selection``), and so is the committed cell's figure beside it."""
    selection = "best_val" if all(figure(run, "best_val") is not None for run in runs) else "best_test"
    paper = PAPER["rows"].get(method, {}).get("acc")
    paper_acc = paper[list(SETTINGS).index(setting)] if paper else None
    return {"variant": variant, "setting": setting, "method": method, "seeds": sorted(run["seed"] for run in runs),
            "acc": mean_std([figure(run, selection) for run in runs]), "selection": selection,
            "last": mean_std([figure(run, "last") for run in runs])[0],
            "best_test": mean_std([figure(run, "best_test") for run in runs])[0],
            "paper": paper_acc, "committed": None if committed is None else figure(committed, selection),
            "hours": mean_std([run.get("wall_time_s", 0.0) / 3600 for run in runs])[0],
            "options": method_options(runs[-1]), "overrides": sorted(runs[-1].get("overrides") or ())}


def method_options(run):
    """The run's method options as ``model_options.sigma=0.25`` (method_variant without model and weighting)."""
    variant = method_variant(run.get("params", {}))
    return [f"{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in sorted(variant.items())
            if key not in ("model", "weighting")]


def render(table, answers, command):
    lines = ["# Table 2: the open cells", "",
             "Each question's variants beside the committed cell (results/table2_full, seed 0) and the paper. Test "
             "accuracy (%), mean over tasks, 100 epochs on the full data unless the overrides say otherwise; "
             "mean ± std over the seeds shown; the variant `default` is the committed protocol (its seed 0 is the "
             "committed run). A variant trained without a validation split (`protocol=authors`) shows its best "
             "test epoch's figure, beside the committed cell's at its best test epoch. How the runs were made: "
             "docs/fidelity.md; the questions: README, Table 2.", "",
             f"Made by `{command}`.", ""]
    for question in sorted(set(table) | set(answers)):
        lines += [f"## {question}", "", f"**Answer.** {answers.get(question, 'runs in progress.')}", ""]
        if question in table:
            lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
            lines += [render_row(row) for row in table[question]]
            lines.append("")
    return "\n".join(lines)


def render_row(row):
    mean, std = row["acc"]
    acc = f"**{mean:.2f}**" + (f" ± {std:.2f}" if std is not None else "") + \
        (" (best test epoch: no validation split)" if row["selection"] == "best_test" else "")
    cells = [row["variant"], TITLES[row["setting"]], row["method"], ",".join(map(str, row["seeds"])), acc,
             f"{row['last']:.2f}", f"{row['best_test']:.2f}",
             number(row["paper"]), number(row["paper"] and mean - row["paper"], sign=True),
             number(row["committed"]), number(row["committed"] and mean - row["committed"], sign=True),
             number(row["hours"]), ", ".join(f"`{item}`" for item in row["options"]) or "none",
             ", ".join(f"`{item}`" for item in row["overrides"]) or "none"]
    return "| " + " | ".join(cells) + " |"


def number(value, sign=False):
    return "–" if value is None else f"{value:+.2f}" if sign else f"{value:.2f}"


if __name__ == "__main__":
    cli.exit_with(main)
