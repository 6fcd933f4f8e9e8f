"""Aggregate the Table 2 runs (every results.json under --runs_dir) into mean ± std over seeds, beside the paper.

    python make_table2.py --runs_dir runs/table2 --out_dir results
    python make_table2.py --runs_dir results/fidelity_switches --protocol authors --select best_test

Writes <out_dir>/table2.json and <out_dir>/table2.md. Accuracy is a run's test accuracy, averaged over tasks
(percent), at the epoch that --select names: the best-validation epoch (best_val, the default), the best test
epoch (best_test: the authors' selection, optimistic, since the test split picks the epoch) or the last epoch
(last); std is the sample std over seeds (ddof=1, none for n=1). A run whose results.json predates the best-test
figure gets it from its metrics.jsonl. Runs are grouped by (method, setting) and by protocol (epochs, subset, and
the param file's ``protocol``: held_out or authors, see docs/fidelity.md). The table shows one protocol, the same
in every cell: --epochs/--subset/--protocol if given, else the protocol with the most runs; runs under other
protocols are never mixed in, they are listed below the table.
"""
import argparse
import json
import shlex
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

from metrics import SELECTIONS, select_record

REPO = Path(__file__).resolve().parent
PAPER = json.loads((REPO / "paper" / "paper_tables.json").read_text())["table2_multi_mnist"]
PAPER_METHODS = tuple(PAPER["rows"])  # the paper's row order
EXTRA_METHODS = ("gumbel_matrix",)  # our rows that the paper did not run: shown below its rows, no paper value
METHODS = PAPER_METHODS + EXTRA_METHODS
# our setting -> the paper's column (paper_tables.json order), and its title in the Markdown table
SETTINGS = {"2digits": "2_digits", "4digits": "4_digits", "9digits": "9_digits_by_loc",
            "9digits_byref": "9_digits_by_ref"}
TITLES = {"2digits": "2 digits", "4digits": "4 digits", "9digits": "9 digits by loc",
          "9digits_byref": "9 digits by ref"}
MARK = "†"
# how each --select is named in the table
SELECTED = {"best_val": "at the best-validation epoch",
            "best_test": "at the best test epoch (the authors' selection; optimistic: the test split picks the epoch)",
            "last": "at the last epoch"}
TRAINING_PROTOCOLS = {"held_out": "held_out (trained on MNIST train[:50k], validation split train[50k:])",
                      "authors": "authors (trained on all 60k MNIST training images, no validation split)"}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs_dir", default="runs/table2", help="searched recursively for results.json")
    parser.add_argument("--out_dir", default="results", help="where table2.json and table2.md go")
    parser.add_argument("--epochs", type=int,
                        help="show the runs of this many epochs (default: the protocol with the most runs)")
    parser.add_argument("--subset", type=int, help="with --epochs: the runs with this --subset (default: full data)")
    parser.add_argument("--protocol", choices=tuple(TRAINING_PROTOCOLS),
                        help="with --epochs: the runs of this param-file protocol (default: held_out)")
    parser.add_argument("--select", choices=tuple(SELECTIONS), default="best_val",
                        help="the test figure of each run: at the best-validation epoch (default), at the best test "
                             "epoch (the authors' selection, optimistic) or at the last epoch")
    args = parser.parse_args(argv)
    if args.subset is not None and args.epochs is None:
        parser.error("--subset needs --epochs (together they pick the protocol)")
    if args.protocol is not None and args.epochs is None:
        parser.error("--protocol needs --epochs (together they pick the protocol)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not Path(args.runs_dir).is_dir():
        print(f"error: --runs_dir {args.runs_dir} is not a directory", file=sys.stderr)
        return 2
    protocol = None if args.epochs is None else (args.epochs, args.subset, args.protocol or "held_out")
    table = aggregate(args.runs_dir, protocol, args.select)
    if table["protocol"] is not None and table["num_runs"] == 0:
        print(f"error: --select {args.select}: no run of protocol '{table['protocol']['protocol']}' in "
              f"{args.runs_dir} has that figure (held_out runs have all three; authors runs no best_val); "
              f"choose another --select", file=sys.stderr)
        return 2
    for path in write_tables(table, args.out_dir):
        print(f"wrote {path}")
    return 0


def load_runs(runs_dir):
    """Every results.json under runs_dir; one that lacks the best-test figure (made before it existed) gets it from
    the metrics.jsonl beside it (``best_test_from``), when there is one."""
    runs, unreadable = [], []
    for path in sorted(Path(runs_dir).rglob("results.json")):
        try:
            run = json.loads(path.read_text())
            if "test_acc_mean_best_test" not in run and (path.parent / "metrics.jsonl").exists():
                history = [json.loads(line) for line in (path.parent / "metrics.jsonl").read_text().splitlines()
                           if line.strip()]
                best = select_record(history, "best_test")
                if best is not None:
                    run.update({"best_test_epoch": best["epoch"], "test_acc_mean_best_test": best["test_acc_mean"],
                                "best_test_from": "metrics.jsonl"})
            runs.append(run)
        except (OSError, json.JSONDecodeError):
            unreadable.append(str(path))
    return runs, unreadable


def protocol_of(run):
    """(epochs, subset, param-file protocol) of a run; runs made before the protocol switch are held_out."""
    return run["epochs"], run["subset"], run.get("protocol") or run.get("params", {}).get("protocol", "held_out")


def figure(run, select):
    """The run's test accuracy under ``select`` (see SELECTIONS), or None when the run does not have it."""
    return run.get({"best_val": "test_acc_mean", "best_test": "test_acc_mean_best_test",
                    "last": "test_acc_mean_last"}[select])


def mean_std(values):
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def aggregate(runs_dir, protocol=None, select="best_val"):
    """All results.json under runs_dir -> the table as a dict (see table2.json). protocol: (epochs, subset,
    protocol name) to show, subset None = full data; default: the protocol with the most runs (ties: more epochs,
    full data, held_out). select: the test figure of each run (SELECTIONS); a run without it is left out (noted)."""
    found, unreadable = load_runs(runs_dir)
    runs = [run for run in found if run.get("method") in METHODS and run.get("setting") in SETTINGS]
    counts = Counter(protocol_of(run) for run in runs)
    if protocol is None and counts:
        protocol = max(counts, key=lambda p: (counts[p], p[0], p[1] is None, p[1] or 0, p[2] == "held_out"))
    of_protocol = [run for run in runs if protocol_of(run) == protocol]
    shown = [run for run in of_protocol if figure(run, select) is not None]

    groups = defaultdict(list)
    for run in shown:
        groups[run["method"], run["setting"]].append(run)
    others = defaultdict(lambda: defaultdict(list))  # (method, setting) -> (epochs, subset, name) -> accuracies
    for run in runs:
        if protocol_of(run) != protocol and figure(run, select) is not None:
            others[run["method"], run["setting"]][protocol_of(run)].append(figure(run, select))

    rows, notes = {}, []
    for method in METHODS:
        rows[method] = {}
        for index, setting in enumerate(SETTINGS):
            paper = PAPER["rows"].get(method, {"acc": [None] * len(SETTINGS), "params_x": [None] * len(SETTINGS)})
            cell = make_cell(groups[method, setting], paper["acc"][index], paper["params_x"][index], select)
            cell["other_protocols"] = [{"epochs": e, "subset": s, "protocol": name, "n": len(accs),
                                        "acc_mean": statistics.fmean(accs)}
                                       for (e, s, name), accs in sorted(others[method, setting].items(), key=str)]
            duplicated = sorted(seed for seed, n in Counter(cell["seeds"]).items() if n > 1)
            if duplicated:
                notes.append(f"{setting}/{method}: seed(s) {duplicated} found in more than one run dir; all counted")
            rows[method][setting] = cell
    notes += [f"unreadable, skipped: {path}" for path in unreadable]
    if len(found) > len(runs):
        notes.append(f"{len(found) - len(runs)} results.json of another method or setting than Table 2's, skipped")
    if len(of_protocol) > len(shown):
        notes.append(f"{len(of_protocol) - len(shown)} run(s) of this protocol without a test figure "
                     f"{SELECTED[select]} (no validation split, or no metrics.jsonl), left out")
    derived = sum(run.get("best_test_from") == "metrics.jsonl" for run in shown)
    if derived and select == "best_test":
        notes.append(f"{derived} run(s) predate the best-test figure in results.json: it was read off their "
                     f"metrics.jsonl")

    sweep = Path(runs_dir) / "sweep.json"
    invocations = json.loads(sweep.read_text())["invocations"] if sweep.exists() else []
    if invocations:
        wall = {"seconds": sum(i["wall_s"] for i in invocations),
                "source": f"sweep.json ({len(invocations)} invocation(s) of reproduce_table2.py into {runs_dir})"}
    else:
        wall = {"seconds": sum(run["wall_time_s"] for run in shown),
                "source": "sum of the shown runs' wall_time_s (training + evaluation only; no sweep.json)"}
    optim = Counter(f"{r['params']['optimizer']}, lr {r['params']['lr']}, batch {r['params']['batch_size']}, "
                    f"lr schedule {r['params']['lr_schedule']}" for r in shown)
    return {
        "runs_dir": str(runs_dir),
        "protocol": None if protocol is None else {"epochs": protocol[0], "subset": protocol[1],
                                                    "protocol": protocol[2]},
        "selection": select,
        "protocols_found": [{"epochs": e, "subset": s, "protocol": name, "runs": n}
                            for (e, s, name), n in sorted(counts.items(), key=str)],
        "num_runs": len(shown),
        "seeds": sorted({run["seed"] for run in shown}),
        "optimisation": dict(optim),
        "devices": dict(Counter(run["device"] for run in shown)),
        "git_commits": dict(Counter(run["git_commit"] for run in shown)),
        "wall_time": wall,
        "sweep_commands": list(dict.fromkeys(i["command"] for i in invocations)),
        "settings": {setting: SETTINGS[setting] for setting in SETTINGS},
        "methods": list(METHODS),
        "rows": rows,
        "notes": notes,
    }


def make_cell(runs, paper_acc, paper_params_x, select="best_val"):
    cell = {"n": len(runs), "seeds": sorted(run["seed"] for run in runs), "acc_mean": None, "acc_std": None,
            "acc_last_mean": None, "params_x": None, "weights_x": None, "paper_acc": paper_acc,
            "paper_params_x": paper_params_x, "diff": None, "outside_2std": None, "note": None}
    if not runs:
        return cell
    cell["acc_mean"], cell["acc_std"] = mean_std([figure(run, select) for run in runs])
    cell["acc_last_mean"] = statistics.fmean(run["test_acc_mean_last"] for run in runs)
    cell["params_x"] = statistics.fmean(run["params_x"] for run in runs)
    cell["weights_x"] = statistics.fmean(run["weights_x"] for run in runs)
    if paper_acc is None:
        cell["note"] = "not in the paper"
        return cell
    cell["diff"] = cell["acc_mean"] - paper_acc
    if cell["acc_std"] is None:
        cell["note"] = "n=1, no std"
    else:
        cell["outside_2std"] = abs(cell["diff"]) > 2 * cell["acc_std"]
    return cell


def format_acc(cell, usual_n):
    if cell["n"] == 0:
        return "–"
    std = "(n=1, no std)" if cell["acc_std"] is None else f"± {cell['acc_std']:.2f}"
    paper = "not in the paper" if cell["paper_acc"] is None else f"{cell['paper_acc']:.2f}, {cell['diff']:+.2f}"
    text = f"{cell['acc_mean']:.2f} {std} ({paper})"
    if cell["outside_2std"]:
        text += f" {MARK}"
    if cell["n"] not in (1, usual_n):
        text += f" [n={cell['n']}]"
    return text


def format_params(cell):
    ours = "–" if cell["params_x"] is None else f"{cell['params_x']:.3f}"
    paper = "–" if cell["paper_params_x"] is None else f"{cell['paper_params_x']:g}"
    return f"{ours} ({paper})"


def counted(counts):
    return "; ".join(f"{key} ({n} runs)" for key, n in counts.items()) or "–"


def render_markdown(table, command):
    protocol = table["protocol"]
    cells = [cell for row in table["rows"].values() for cell in row.values()]
    usual_n = max(cell["n"] for cell in cells)  # cells with fewer runs are marked [n=k]
    seeds = ", ".join(map(str, table["seeds"])) or "none"
    if protocol is None:
        shown = "no runs found"
    else:
        data = "full data" if protocol["subset"] is None else f"subset {protocol['subset']} training images (smoke run)"
        shown = f"{TRAINING_PROTOCOLS[protocol['protocol']]}, {protocol['epochs']} epochs, {data}, seeds {seeds} " \
                f"({usual_n} per cell unless marked [n=k])"
    seconds = table["wall_time"]["seconds"]
    lines = [
        "# Table 2: Multi-MNIST, ours vs the paper",
        "",
        f"- Protocol: {shown}.",
        f"- Optimisation (from the runs' param files): {counted(table['optimisation'])}.",
        f"- Device(s): {counted(table['devices'])}.",
        f"- Total wall time: {seconds / 3600:.2f} h ({seconds:.0f} s), from {table['wall_time']['source']}.",
        f"- Git commit(s) of the runs: {counted({f'`{k}`': n for k, n in table['git_commits'].items()})}.",
        "- Sweep command(s): " + ("; ".join(f"`{c}`" for c in table["sweep_commands"]) or "–") + ".",
        f"- Generated by: `{command}`.",
        "",
        f"Acc: test accuracy (%) {SELECTED[table['selection']]}, mean over tasks, then mean ± sample std over seeds; "
        "in brackets the paper's value and Δ = ours − paper. "
        f"{MARK}: the paper's value lies outside ours ± 2 std (only for n ≥ 2). "
        "#P: parameters as a multiple of one LeNet (24,390 weights and biases), ours (paper).",
        "",
    ]
    header = ["Method"] + [f"{TITLES[s]} {col}" for s in SETTINGS for col in ("#P", "Acc")]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, row in table["rows"].items():
        name = f"{method} (ours, not in the paper)" if method in EXTRA_METHODS else method
        values = [name] + [text for s in SETTINGS for text in (format_params(row[s]), format_acc(row[s], usual_n))]
        lines.append("| " + " | ".join(values) + " |")

    lines += ["", "Test accuracy (%) at the last epoch, mean over seeds:", "",
              "| Method | " + " | ".join(TITLES[s] for s in SETTINGS) + " |", "|" + "---|" * (len(SETTINGS) + 1)]
    for method, row in table["rows"].items():
        values = ["–" if row[s]["n"] == 0 else f"{row[s]['acc_last_mean']:.2f}" for s in SETTINGS]
        lines.append(f"| {method} | " + " | ".join(values) + " |")

    other = [f"- {s}/{m}: protocol {o['protocol']}, epochs {o['epochs']}, "
             + ("full data" if o["subset"] is None else f"subset {o['subset']}")
             + f", n={o['n']}, acc {o['acc_mean']:.2f}"
             for m, row in table["rows"].items() for s, cell in row.items() for o in cell["other_protocols"]]
    if other:
        lines += ["", "Runs under other protocols, kept apart (not in the table above):", ""] + other
    if table["notes"]:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in table["notes"]]
    return "\n".join(lines) + "\n"


def write_tables(table, out_dir):
    """Writes table2.json and table2.md into out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "make_table2.py", "--runs_dir", table["runs_dir"], "--out_dir", str(out_dir)])
    if table["protocol"] is not None:
        command += f" --epochs {table['protocol']['epochs']}"
        if table["protocol"]["subset"] is not None:
            command += f" --subset {table['protocol']['subset']}"
        command += f" --protocol {table['protocol']['protocol']}"
    command += f" --select {table['selection']}"
    table = {**table, "command": command}
    paths = out_dir / "table2.json", out_dir / "table2.md"
    paths[0].write_text(json.dumps(table, indent=2, ensure_ascii=False) + "\n")
    paths[1].write_text(render_markdown(table, command))
    return paths


if __name__ == "__main__":
    sys.exit(main())
