"""Table 3 (CLEVR 40 tasks, CELEB-A, CUB-200; paper §4.4) from the runs' results.json, beside the paper's numbers.

    python -m experiments.table3 --runs_dir runs --out results/table3.md

Reads every results.json under --runs_dir (the training script writes runs/<exp_id>/seed<k>/results.json) and keeps
Table 3's experiments: CLEVR at 40 tasks, CELEB-A and CUB-200; runs on the generated CLEVR-like data (clevr_like,
40 tasks) get a section of their own, labelled as a different data set, with the accuracy of answering without the
image (each task's most frequent training answer; the data is generated if missing). A row is a method and its
'loc' (``spatial_loss_weight`` > 0: ControlNet's TD-map loss or a baseline's location regression). Accuracy is the
test accuracy at the best-validation evaluation averaged over tasks, then mean ± sample std over seeds (ddof 1;
none for one seed). A row whose runs differ in protocol (epochs, subset, data size, input size, width, lr, batch) is
marked: its seeds are not repetitions of one protocol.
"""
import json
import sys
from collections import defaultdict
from pathlib import Path

from runtime import files
from training import cli
from experiments.table2 import load_runs, mean_std
from experiments.table6a import majority_accuracy
from runtime.files import REPO

PAPER = json.loads((REPO / "paper" / "paper_tables.json").read_text())["table3_other_datasets"]
# our (dataset, setting) -> (the paper's table, section title)
SECTIONS = {("clevr", "clevr_40"): ("CLEVR_40_tasks", "(a) CLEVR, 40 tasks"),
            ("clevr_like", "clevr_40"): ("CLEVR_40_tasks", "(a') CLEVR-like (generated here, NOT CLEVR), 40 tasks"),
            ("celeba", "celeba"): ("CELEB-A_40_tasks", "(b) CELEB-A, 40 tasks"),
            ("cub", "cub"): ("CUB-200", "(c) CUB-200")}
TITLES = {"single_task": "Single task", "uniform_scaling": "Uni-sc", "ch_mod": "ch-mod", "task_routing": "task-routing",
          "controlnet": "ControlNet"}
PROTOCOL_KEYS = ("epochs", "subset")
DATA_KEYS = ("input_size", "clevr_like_train", "clevr_like_test", "val_fraction", "model_options", "lr", "batch_size")


def parse_args(argv):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs_dir", default="runs", help="searched recursively for results.json")
    parser.add_argument("--out", default="runs/tables/table3.md", help="the Markdown table to write (default "
                        "runs/tables/table3.md: a committed table is only replaced when it is named)")
    return parser.parse_args(argv)


def paper_rows(table):
    """[(method, loc, paper params_x or None, paper acc, paper std)] in the paper's order (CELEB-A has no loc)."""
    columns = PAPER[table]["columns"]
    rows = []
    for method, *values in PAPER[table]["rows"]:
        row = dict(zip(columns, values))
        rows.append((method, row.get("loc", False), row.get("params_x"), row["acc"], row["std"]))
    return rows


def group(runs):
    """{(dataset, setting): {(method, loc): [runs]}} for Table 3's experiments."""
    groups = defaultdict(lambda: defaultdict(list))
    for run in runs:
        params = run.get("params", {})
        key = (params.get("dataset"), params.get("setting"))
        if key in SECTIONS:
            groups[key][run["method"], params.get("spatial_loss_weight", 0.0) > 0].append(run)
    return groups


def protocol(run):
    return tuple(run.get(k) for k in PROTOCOL_KEYS) + tuple(str(run["params"].get(k)) for k in DATA_KEYS)


def row_line(method, loc, runs, paper):
    """One Markdown row: method, loc, ours (mean ± std, n, epochs, #P), the paper's (#P, acc ± std)."""
    paper_px, paper_acc, paper_std = paper or (None, None, None)
    theirs = "–" if paper_acc is None else f"{paper_acc:.2f} ± {paper_std:.2f}"
    theirs_px = "–" if paper_px is None else f"x{paper_px:g}"
    name = TITLES.get(method, method) + ("" if paper else " (ours, not in the paper)")
    if not runs:
        return f"| {name} | {'√' if loc else '×'} | not run | | | | {theirs_px} | {theirs} |"
    mean, std = mean_std([run["test_acc_mean"] for run in runs])
    epochs = sorted({run["epochs"] for run in runs})
    mixed = " ‡" if len({protocol(run) for run in runs}) > 1 else ""
    ours = f"{mean:.2f}" + ("" if std is None else f" ± {std:.2f}") + mixed
    return (f"| {name} | {'√' if loc else '×'} | {ours} | {len(runs)} | {'/'.join(map(str, epochs))} | "
            f"x{runs[0]['params_x']:.3f} | {theirs_px} | {theirs} |")


def markdown(groups, command):
    lines = ["# Table 3: CLEVR, CELEB-A and CUB-200", "",
             "Acc: test accuracy (%) at the best-validation evaluation, mean over tasks, then mean ± sample std over "
             "seeds (n runs). loc: trained with the localisation ground truth (ControlNet: the loss on the TD map; "
             "baselines: an FC regression of the object's or part's (x, y)). #P: parameters as a multiple of the "
             "plain backbone at the run's width and input size. ‡: the row's runs differ in protocol. Paper: 5 runs, "
             "full protocol.", ""]
    for key, (table, title) in SECTIONS.items():
        rows = groups.get(key, {})
        if not rows and key[0] == "clevr_like":
            continue
        lines += [f"## {title}", "",
                  "| Method | loc | Acc (ours) | n | epochs | #P (ours) | #P (paper) | Acc (paper) |",
                  "|---|---|---|---|---|---|---|---|"]
        listed = paper_rows(table)
        for method, loc, *paper in listed:
            lines.append(row_line(method, loc, rows.get((method, loc), []), paper))
        for (method, loc), runs in sorted(rows.items()):
            if not any((method, loc) == (m, l) for m, l, *_ in listed):
                lines.append(row_line(method, loc, runs, None))
        used = [run for runs in rows.values() for run in runs]
        if used:
            lines += ["", "Runs: " + ", ".join(sorted({run["device"] for run in used})) + "; commits " +
                      ", ".join(f"`{c[:12]}{'-dirty' if c.endswith('-dirty') else ''}`"
                                for c in sorted({run["git_commit"] for run in used})) + "; seeds " +
                      ", ".join(map(str, sorted({run["seed"] for run in used}))) +
                      (f"; subset {sorted({run['subset'] for run in used}, key=str)}" if any(run.get("subset")
                                                                                         for run in used) else "")]
        if key[0] == "clevr_like" and used:
            lines += ["", "Generated CLEVR-like scenes with a reduced protocol (see the runs' params): not comparable "
                      "with the paper's CLEVR numbers beside them. Answering every task with its most frequent "
                      f"training answer, without the image: {majority_accuracy(used[0]['params']):.2f}."]
        lines.append("")
    lines += [f"Generated by `{command}`."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if not Path(args.runs_dir).is_dir():
        print(f"error: --runs_dir {args.runs_dir} is not a directory", file=sys.stderr)
        return 2
    runs, unreadable = load_runs(args.runs_dir)
    for path in unreadable:
        print(f"warning: skipped unreadable {path}", file=sys.stderr)
    out = Path(args.out)
    if not runs and out.exists():
        print(f"error: no results.json under {args.runs_dir}: {out} is not replaced by an empty table", file=sys.stderr)
        return 1
    command = cli.command_line(__spec__.name, argv)
    out.parent.mkdir(parents=True, exist_ok=True)
    files.write_text(markdown(group(runs), command.strip()), out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    cli.exit_with(main)
