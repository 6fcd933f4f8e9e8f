"""Aggregate the Table 2 runs (every results.json under --runs_dir) into mean ± std over seeds, beside the paper.

    python -m experiments.table2 --runs_dir runs/table2 --out_dir runs/tables

Writes <out_dir>/table2.json and <out_dir>/table2.md (default runs/tables: a committed table is only replaced when
its folder is named), never an empty table. The .md opens with a summary (one figure per cell beside the paper's);
``--readme FILE`` also puts that summary between the markers ``<!-- <name> summary begin -->`` and
``<!-- <name> summary end -->`` of FILE (the README's headline table), leaving the rest of FILE as it is.
Accuracy is a run's test accuracy, averaged over tasks (percent), at the epoch that --select names: the
best-validation epoch (best_val, the default), the best test epoch (best_test: the authors' selection, optimistic,
since the test split picks the epoch) or the last epoch (last); a run whose results.json predates the best-test
figure gets it from its metrics.jsonl. std is the sample std over seeds (ddof=1, none for n=1). Every cell also
gets Δm%, the standard multi-task summary against single-task learning (Maninis et al. 2019; Navon et al. 2022):
the mean over tasks of the relative change of the task's test accuracy from the single_task row's in the same
setting, protocol and selection (``delta_m``). Runs are grouped
by (method, setting) and by protocol: epochs, subset and every param that is not the method's own (lr, batch size,
schedule, data, the param ``protocol`` held_out or authors, ...).
The table shows one protocol, the same in every cell, and names it: the one --protocol K names, else the one with
the most runs (among those of --epochs/--subset if given); runs under other protocols are never mixed in, each
other protocol is listed in one line below the table. Nor does a cell mix variants of its method (its model,
weighting and their options, ``method_variant``): it shows the runs of the shipped param file's variant
(params/mmnist_<setting>_<method>.json), else those of the variant with the most runs, and names the others in a
note. A seed is counted once per cell.
"""
import functools
import json
import os
import shlex
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

from metrics import SELECTIONS, select_record
from runtime import files
from runtime.files import REPO
from training import cli, config

PAPER = json.loads((REPO / "paper" / "paper_tables.json").read_text())["table2_multi_mnist"]
PAPER_METHODS = tuple(PAPER["rows"])  # the paper's row order
EXTRA_METHODS = ("gumbel_matrix",)  # our rows that the paper did not run: shown below its rows, no paper value
# weightings published after the paper (docs/weightings.md), shown below the paper's rows marked "(beyond the paper)"
BEYOND_METHODS = ("dwa", "rlw", "pcgrad", "cagrad", "imtl", "nash_mtl", "aligned_mtl", "famo")
METHODS = PAPER_METHODS + EXTRA_METHODS + BEYOND_METHODS
# our setting -> the paper's column (paper_tables.json order), and its title in the Markdown table
SETTINGS = {"2digits": "2_digits", "4digits": "4_digits", "9digits": "9_digits_by_loc",
            "9digits_byref": "9_digits_by_ref"}
TITLES = {"2digits": "2 digits", "4digits": "4 digits", "9digits": "9 digits by loc",
          "9digits_byref": "9 digits by ref"}
MARK = "†"
# param keys that belong to the method (a row), not to the protocol; and keys that do not change the numbers
METHOD_KEYS = ("exp_id", "method", "setting", "model", "weighting", "model_options", "weighting_options",
               "router_options")
NEUTRAL_KEYS = ("memory_format", "eval_batch_size", "data_root")
OPTION_KEYS = ("model_options", "weighting_options", "router_options")  # a method's own options, one dict each
PARAMS_DIR = REPO / "params"  # the shipped param files, mmnist_<setting>_<method>.json
# how each --select is named in the table, and the results.json key of its figure
SELECTED = {"best_val": "at the best-validation epoch",
            "best_test": "at the best test epoch (the authors' selection; optimistic: the test split picks the epoch)",
            "last": "at the last epoch"}
FIGURES = {"best_val": "test_acc_mean", "best_test": "test_acc_mean_best_test", "last": "test_acc_mean_last"}
PER_TASK = {"best_val": "test_acc_per_task", "best_test": "test_acc_per_task_best_test", "last": "test_acc_per_task_last"}
REFERENCE = "single_task"  # the row Δm% is measured against
TRAINING_PROTOCOLS = {"held_out": "held_out (trained on MNIST train[:50k], validation split train[50k:])",
                      "authors": "authors (trained on all 60k MNIST training images, no validation split)"}


def parse_args(argv):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs_dir", default="runs/table2", help="searched recursively for results.json")
    parser.add_argument("--out_dir", default="runs/tables", help="where <name>.json and <name>.md go")
    parser.add_argument("--name", default="table2", help="file name of the table, without suffix (default table2)")
    parser.add_argument("--reasons", help="JSON file {\"<setting>/<method>\": \"why the cell differs\"}: one line of "
                        "reason for each cell more than 2 points from the paper, listed under the table")
    parser.add_argument("--epochs", type=int,
                        help="show the runs of this many epochs (default: the protocol with the most runs)")
    parser.add_argument("--subset", type=int, help="with --epochs: the runs with this --subset (default: full data)")
    parser.add_argument("--protocol", type=int, metavar="K",
                        help="show the K-th protocol of the list printed (1 = the one with the most runs)")
    parser.add_argument("--select", choices=tuple(SELECTIONS), default="best_val",
                        help="the test figure of each run: at the best-validation epoch (default), at the best test "
                             "epoch (the authors' selection, optimistic) or at the last epoch")
    parser.add_argument("--readme", help="also replace the summary between the markers <!-- <name> summary begin --> "
                                         "and <!-- <name> summary end --> of this Markdown file")
    args = parser.parse_args(argv)
    if args.subset is not None and args.epochs is None:
        parser.error("--subset needs --epochs (together they pick the protocol)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not Path(args.runs_dir).is_dir():
        print(f"error: --runs_dir {args.runs_dir} is not a directory", file=sys.stderr)
        return 2
    protocol = None if args.epochs is None else (args.epochs, args.subset)
    try:
        table = aggregate(args.runs_dir, protocol, args.protocol, args.select)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for index, found in enumerate(table["protocols_found"], 1):
        print(f"protocol {index}: {found['runs']} runs, {found['description']}" +
              ("  <- shown" if found["shown"] else ""))
    if table["num_runs"] == 0:
        without = f" with a test figure {SELECTED[args.select]} (authors-protocol runs have no validation split: use " \
                  f"--select best_test or last)" if table["protocol"] is not None else ""
        print(f"error: no Table 2 run under {args.runs_dir} for this protocol{without}; nothing written",
              file=sys.stderr)
        return 1
    if args.reasons:
        try:
            table["reasons"] = json.loads(Path(args.reasons).read_text())
        except (OSError, json.JSONDecodeError) as err:
            print(f"error: --reasons {args.reasons}: {err}", file=sys.stderr)
            return 2
    if args.readme:
        try:
            readme_text = with_summary(Path(args.readme).read_text(encoding="utf-8"), args.name, "")
        except (OSError, ValueError) as err:
            print(f"error: --readme {args.readme}: {err}", file=sys.stderr)
            return 2
    paths = write_tables(table, args.out_dir, args.name, args.reasons)
    for path in paths:
        print(f"wrote {path}")
    if args.readme:
        link = Path(os.path.relpath(paths[1], Path(args.readme).resolve().parent)).as_posix()
        summary = render_summary(json.loads(paths[0].read_text()), link)
        files.write_text(with_summary(readme_text, args.name, summary), args.readme)
        print(f"wrote the summary into {args.readme}")
    return 0


def markers(name):
    return f"<!-- {name} summary begin -->", f"<!-- {name} summary end -->"


def with_summary(text, name, summary):
    """``text`` with the block between the two summary markers of ``name`` replaced by ``summary``; ValueError
    naming the markers when they are missing or out of order."""
    begin, end = markers(name)
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"expected the lines '{begin}' and '{end}' once each, in this order, around the table")
    head, rest = text.split(begin)
    return head + begin + "\n" + summary + end + rest.split(end)[1]


def load_runs(runs_dir):
    """Every results.json under runs_dir, with the median epoch time (training and evaluation, ``epoch_time_s``)
    of the metrics.jsonl beside it; one that lacks the best-test figure (made before it existed) gets it from
    that metrics.jsonl (``best_test_from``), when there is one."""
    runs, unreadable = [], []
    for path in sorted(Path(runs_dir).rglob("results.json")):
        try:
            run = {**json.loads(path.read_text()), "path": str(path.parent)}
            history = read_history(path.parent / "metrics.jsonl", needed="test_acc_mean_best_test" not in run)
            times = [record["epoch_time_s"] for record in history if "epoch_time_s" in record]
            run["median_epoch_time_s"] = statistics.median(times) if times else None
            best = select_record(history, "best_test")
            if "test_acc_mean_best_test" not in run and best is not None:
                run.update({"best_test_epoch": best["epoch"], "test_acc_mean_best_test": best["test_acc_mean"],
                            "best_test_from": "metrics.jsonl"})
                if "test_acc_per_task" in best:
                    run["test_acc_per_task_best_test"] = best["test_acc_per_task"]
            runs.append(run)
        except (OSError, json.JSONDecodeError):
            unreadable.append(str(path))
    return runs, unreadable


def read_history(metrics, needed):
    """The records of a metrics.jsonl ([] when there is none); one that cannot be read raises when ``needed``,
    else gives []."""
    if not metrics.exists():
        return []
    try:
        return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        if needed:
            raise
        return []


def figure(run, select):
    """The run's test accuracy under ``select`` (see SELECTIONS), or None when the run does not have it."""
    return run.get(FIGURES[select])


def per_task_mean(runs, select):
    """The per-task test accuracies under ``select``, each the mean over ``runs`` (seeds); None when a run lacks
    them or the runs disagree on the number of tasks."""
    accs = [run.get(PER_TASK[select]) for run in runs]
    if not accs or any(acc is None for acc in accs) or len({len(acc) for acc in accs}) != 1:
        return None
    return [statistics.fmean(task) for task in zip(*accs)]


def delta_m(method_accs, single_accs):
    """Δm% (Maninis et al. 2019, Navon et al. 2022): (1/T) Σ_t (-1)^l_t (M_m,t - M_b,t) / M_b,t x 100, with
    M_m,t the method's and M_b,t single-task learning's metric on task t and l_t = 0 when higher is better, as for
    accuracy. None when either list is missing, they differ in length, or a single-task accuracy is 0."""
    if method_accs is None or single_accs is None or len(method_accs) != len(single_accs) \
            or not all(single_accs):
        return None
    return statistics.fmean((m - b) / b for m, b in zip(method_accs, single_accs)) * 100


def protocol_of(run):
    """What must be equal for two runs to share a table: epochs, subset and every param that is not the method's
    own. A key that a run's params lack (a run older than the key) reads as what the training script would fill
    in today for its data set (``completed_defaults``)."""
    params = run.get("params", {})
    defaults = completed_defaults(params.get("dataset", "multi_mnist"), run.get("setting"))
    keys = [key for key in config.SCHEMA if key not in METHOD_KEYS + NEUTRAL_KEYS + ("epochs",)]  # the run's epochs
    values = {key: params.get(key, defaults.get(key)) for key in keys}
    return json.dumps({"epochs": run.get("epochs"), "subset": run.get("subset"), **values}, sort_keys=True)


@functools.lru_cache(maxsize=None)
def completed_defaults(dataset, setting):
    """The params a minimal param file of this data set and setting gets from the schema (backbone, input size
    and the rest filled in); the schema's plain defaults if they do not validate."""
    try:
        return config.validate({"exp_id": "defaults", "method": "uniform_scaling", "dataset": dataset,
                                "setting": setting}, "defaults")
    except config.ParamError:
        return {key: entry[1] for key, entry in config.SCHEMA.items()}


def describe_protocol(protocol, reference=None):
    """'100 epochs, full data' and, beside the ``reference`` protocol, the keys in which it differs."""
    values = json.loads(protocol)
    text = f"{values['epochs']} epochs, " + ("full data" if values["subset"] is None else f"subset {values['subset']}")
    if reference is not None and reference != protocol:
        other = json.loads(reference)
        diff = [f"{key} {json.dumps(values[key])} (shown: {json.dumps(other.get(key))})"
                for key in sorted(values) if values[key] != other.get(key) and key not in ("epochs", "subset")]
        text += ("; differs from the shown protocol in " + ", ".join(diff)) if diff else ""
    return text


def mean_std(values):
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def aggregate(runs_dir, protocol=None, choice=None, select="best_val"):
    """All results.json under runs_dir -> the table as a dict (see table2.json). protocol: (epochs, subset) to
    consider (subset None = full data), default all; choice: the 1-based index of the protocol to show among
    those (ordered by number of runs, then more epochs, full data), default the first. ValueError for a choice
    out of range. select: the test figure of each run (SELECTIONS); a run without it is left out (noted)."""
    found, unreadable = load_runs(runs_dir)
    runs = [run for run in found if run.get("method") in METHODS and run.get("setting") in SETTINGS]
    counts = Counter(protocol_of(run) for run in runs)
    ordered, chosen = pick_protocol(counts, protocol, choice, runs_dir)
    of_protocol = [run for run in runs if protocol_of(run) == chosen]
    shown = [run for run in of_protocol if figure(run, select) is not None]

    groups, notes = cells_of(shown, select)
    counted = [run for cell in groups.values() for run in cell]
    rows = make_rows(groups, other_protocol_accuracies(runs, chosen, select), ordered, select)
    notes += run_notes(counted, select)
    notes += [f"unreadable, skipped: {path}" for path in unreadable]
    if len(found) > len(runs):
        notes.append(f"{len(found) - len(runs)} results.json of another method or setting than Table 2's, skipped")
    if len(of_protocol) > len(shown):
        notes.append(f"{len(of_protocol) - len(shown)} run(s) of this protocol without a test figure "
                     f"{SELECTED[select]} (no validation split, or no metrics.jsonl), left out")

    sweep = Path(runs_dir) / "sweep.json"
    invocations = json.loads(sweep.read_text())["invocations"] if sweep.exists() else []
    optim = Counter(f"{r['params']['optimizer']}, lr {r['params']['lr']}, batch {r['params']['batch_size']}, "
                    f"lr schedule {r['params']['lr_schedule']}" for r in counted)
    return {
        "runs_dir": str(runs_dir),
        "protocol": None if chosen is None else {**json.loads(chosen), "index": ordered.index(chosen) + 1},
        "selection": select,
        "protocols_found": [{**json.loads(key), "runs": counts[key], "shown": key == chosen,
                             "description": describe_protocol(key, chosen)} for key in ordered],
        "num_runs": len(counted),
        "seeds": sorted({run["seed"] for run in counted}),
        "optimisation": dict(optim),
        "devices": dict(Counter(run["device"] for run in counted)),
        "git_commits": dict(Counter(run["git_commit"] for run in counted)),
        "wall_time": total_wall_time(runs_dir, invocations, counted),
        "sweep_commands": list(dict.fromkeys(i["command"] for i in invocations)),
        "settings": {setting: SETTINGS[setting] for setting in SETTINGS},
        "methods": list(METHODS),
        "rows": rows,
        "notes": notes,
    }


def pick_protocol(counts, protocol, choice, runs_dir):
    """The protocols of ``counts`` (protocol_of -> number of runs) in the order of the list printed: those of
    ``protocol`` (epochs, subset; None: every one) first, then by number of runs, more epochs, full data, larger
    subset; and the one to show: the ``choice``-th (1-based, default 1) of those of ``protocol``, None when there is
    none. ValueError naming the allowed range for a choice outside it."""
    def rank(key):
        values = json.loads(key)
        matches = protocol is None or (values["epochs"], values["subset"]) == protocol
        return (matches, counts[key], values["epochs"], values["subset"] is None, values["subset"] or 0)
    ordered = sorted(counts, key=rank, reverse=True)
    candidates = [key for key in ordered if rank(key)[0]]
    if choice is not None and not 1 <= choice <= len(candidates):
        raise ValueError(f"--protocol {choice}: {runs_dir} holds {len(candidates)} protocol(s) of these epochs and "
                         f"subset; allowed: 1 to {len(candidates)}")
    return ordered, (candidates[(choice or 1) - 1] if candidates else None)


def other_protocol_accuracies(runs, chosen, select):
    """{(method, setting): {protocol: [test accuracy under ``select`` of each run]}} for the runs of every protocol
    but ``chosen`` that have that figure."""
    others = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if protocol_of(run) != chosen and figure(run, select) is not None:
            others[run["method"], run["setting"]][protocol_of(run)].append(figure(run, select))
    return others


def total_wall_time(runs_dir, invocations, counted):
    """The table's total wall time in seconds and where it comes from: the sweep's invocations (its sweep.json)
    when there are any, else the sum of the counted runs' own wall times."""
    if invocations:
        return {"seconds": sum(i["wall_s"] for i in invocations),
                "source": f"sweep.json ({len(invocations)} invocation(s) of experiments/table2_sweep.py into {runs_dir})"}
    return {"seconds": sum(run["wall_time_s"] for run in counted),
            "source": "sum of the shown runs' wall_time_s (training + evaluation only; no sweep.json)"}


def make_rows(groups, others, ordered, select):
    """{method: {setting: cell}}: each cell's figures (make_cell), the other protocols' accuracies (``others``,
    numbered by their place in ``ordered``) and its Δm% against the single-task row."""
    rows = {}
    for method in METHODS:
        rows[method] = {}
        for index, setting in enumerate(SETTINGS):
            paper = PAPER["rows"].get(method, {"acc": [None] * len(SETTINGS), "params_x": [None] * len(SETTINGS)})
            cell = make_cell(groups[method, setting], paper["acc"][index], paper["params_x"][index], select)
            cell["other_protocols"] = [{"protocol": ordered.index(key) + 1, "n": len(accs),
                                        "acc_mean": statistics.fmean(accs)}
                                       for key, accs in sorted(others[method, setting].items(),
                                                              key=lambda item: ordered.index(item[0]))]
            rows[method][setting] = cell
    for setting in SETTINGS:
        single = rows[REFERENCE][setting]["acc_per_task"]
        for method in METHODS:
            rows[method][setting]["delta_m"] = delta_m(rows[method][setting]["acc_per_task"], single)
    return rows


def cells_of(runs, select):
    """{(method, setting): the runs the cell counts} (one_variant) and the notes on those left out."""
    by_cell = defaultdict(list)
    for run in runs:
        by_cell[run["method"], run["setting"]].append(run)
    cells, notes = defaultdict(list), []
    for (method, setting), runs_of_cell in by_cell.items():
        cells[method, setting], left_out = one_variant(method, setting, runs_of_cell, select)
        notes += left_out
    return cells, notes


def run_notes(runs, select):
    """What a reader of the table must know about the counted runs: a changed lr schedule, a --set, a best-test
    figure read off metrics.jsonl."""
    notes = [f"{run['setting']}/{run['method']} seed {run['seed']} ({run['path']}): its lr schedule changed after "
             f"epoch {run['schedule_changed_at_epoch']} (a --force'd resume), not the protocol's schedule"
             for run in runs if run.get("schedule_changed_at_epoch") is not None]
    notes += [f"{run['setting']}/{run['method']} seed {run['seed']} ({run['path']}) was made with --set "
              + " --set ".join(run["overrides"]) for run in runs if run.get("overrides")]
    derived = sum(run.get("best_test_from") == "metrics.jsonl" for run in runs)
    if derived and select == "best_test":
        notes.append(f"{derived} run(s) predate the best-test figure in results.json: it was read off their "
                     f"metrics.jsonl")
    return notes


def method_variant(params):
    """What tells two runs of one method apart: its model and weighting, and each of its options as a dotted key
    (``model_options.sigma``)."""
    return {"model": params.get("model"), "weighting": params.get("weighting"), **dotted_options(params)}


def dotted_options(params):
    """The method's options of ``params``, each as a dotted key (``model_options.sigma``)."""
    return {f"{key}.{name}": value for key in OPTION_KEYS for name, value in (params.get(key) or {}).items()}


def shipped_param_file(method, setting):
    return PARAMS_DIR / f"mmnist_{setting}_{method}.json"


@functools.lru_cache(maxsize=None)
def shipped_variant(method, setting):
    """method_variant of the shipped param file of the cell (JSON), None when there is none or it does not load."""
    try:
        return json.dumps(method_variant(config.load_params(shipped_param_file(method, setting))), sort_keys=True)
    except (OSError, config.ParamError):
        return None


def variant_difference(variant, shown):
    """'model_options.sigma 0.25 where the runs shown have 0.5', one clause per key in which two method_variant
    JSONs differ."""
    variant, shown = json.loads(variant), json.loads(shown)
    return ", ".join(f"{key} {json.dumps(variant.get(key))} where the runs shown have {json.dumps(shown.get(key))}"
                     for key in sorted({*variant, *shown}) if variant.get(key) != shown.get(key))


def one_variant(method, setting, runs, select):
    """The runs of one cell that the table shows, and a note for each one left out. A cell never mixes variants of
    its method (method_variant): it shows the variant of the shipped param file, else the one with the most runs
    (said in a note), and each seed once."""
    by_variant = defaultdict(list)
    for run in runs:
        by_variant[json.dumps(method_variant(run.get("params", {})), sort_keys=True)].append(run)
    shipped = shipped_variant(method, setting)
    chosen = shipped if shipped in by_variant else max(by_variant, key=lambda key: len(by_variant[key]))
    where = f"{setting}/{method}"
    notes = [] if shipped in (None, chosen) else [
        f"{where}: the shipped {shipped_param_file(method, setting).relative_to(REPO)} has "
        f"{variant_difference(shipped, chosen)}"]
    for key, others in by_variant.items():
        if key != chosen:
            accs = ", ".join(f"{figure(run, select):.2f}" for run in others)
            notes.append(f"{where}: {len(others)} run(s) of another variant left out ({variant_difference(key, chosen)}): "
                         f"{accs}; " + ", ".join(run["path"] for run in others))
    kept = []
    for run in by_variant[chosen]:
        twin = next((other for other in kept if other["seed"] == run["seed"]), None)
        if twin is None:
            kept.append(run)
        else:
            notes.append(f"{where}: seed {run['seed']} of {run['path']} already counted from {twin['path']}; "
                         f"counted once")
    return kept, notes


def make_cell(runs, paper_acc, paper_params_x, select="best_val"):
    cell = {"n": len(runs), "seeds": sorted(run["seed"] for run in runs), "acc_mean": None, "acc_std": None,
            "acc_last_mean": None, "acc_best_test_mean": None, "params_x": None, "weights_x": None,
            "paper_acc": paper_acc, "paper_params_x": paper_params_x, "diff": None, "outside_2std": None, "note": None,
            "wall_time_h": None, "epoch_time_s": None, "acc_per_task": None, "delta_m": None}
    if not runs:
        return cell
    cell["wall_time_h"] = sum(run["wall_time_s"] for run in runs) / 3600
    cell["acc_per_task"] = per_task_mean(runs, select)
    times = [run["median_epoch_time_s"] for run in runs]
    cell["epoch_time_s"] = None if None in times else statistics.fmean(times)
    cell["acc_mean"], cell["acc_std"] = mean_std([figure(run, select) for run in runs])
    cell["acc_last_mean"] = statistics.fmean(run["test_acc_mean_last"] for run in runs)
    best_test = [figure(run, "best_test") for run in runs if figure(run, "best_test") is not None]
    cell["acc_best_test_mean"] = statistics.fmean(best_test) if len(best_test) == len(runs) else None
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


def secondary(cell, key):
    """A cell of the last-epoch / best-test tables: the figure and its Δ to the paper."""
    if cell[key] is None:
        return "–"
    diff = "" if cell["paper_acc"] is None else f" ({cell[key] - cell['paper_acc']:+.2f})"
    return f"{cell[key]:.2f}{diff}"


def format_params(cell):
    ours = "–" if cell["params_x"] is None else f"{cell['params_x']:.3f}"
    paper = "–" if cell["paper_params_x"] is None else f"{cell['paper_params_x']:g}"
    return f"{ours} ({paper})"


def format_time(cell):
    if cell["wall_time_h"] is None:
        return "–"
    epoch = "" if cell["epoch_time_s"] is None else f" ({cell['epoch_time_s']:.1f} s)"
    return f"{cell['wall_time_h']:.2f}{epoch}"


def counted(counts):
    return "; ".join(f"{key} ({n} runs)" for key, n in counts.items()) or "–"


def summary_lines(table):
    """The summary table: one figure per cell (n = 1: the run's; else mean ± std) beside the paper's value and Δ,
    or for a row the paper did not run, beside its Δm% against single task; every row of the paper, and our other
    rows only where they have a run."""
    lines = ["| Method | " + " | ".join(TITLES[s] for s in SETTINGS) + " |", "|" + "---|" * (len(SETTINGS) + 1)]
    for method, row in table["rows"].items():
        if method not in PAPER_METHODS and not any(cell["n"] for cell in row.values()):
            continue
        values = []
        for cell in row.values():
            paper = "" if cell["paper_acc"] is None else f"{cell['paper_acc']:.2f}"
            if cell["n"] == 0:
                values.append(f"– ({paper})" if paper else "–")
                continue
            ours = f"**{cell['acc_mean']:.2f}**" + ("" if cell["acc_std"] is None else f" ± {cell['acc_std']:.2f}")
            beside = f"{paper}, {cell['diff']:+.2f}" if paper else \
                "Δm% –" if cell["delta_m"] is None else f"Δm% {cell['delta_m']:+.2f}"
            values.append(f"{ours} ({beside})")
        name = f"{method} (ours)" if method in EXTRA_METHODS else \
            f"{method} (beyond the paper)" if method in BEYOND_METHODS else method
        lines.append(f"| {name} | " + " | ".join(values) + " |")
    return lines


def summary_legend(table):
    selection = SELECTED[table.get("selection", "best_val")]
    seeds = ", ".join(map(str, table["seeds"])) or "none"
    protocol = table["protocol"]
    shown = "no runs" if protocol is None else f"{protocol['epochs']} epochs" + \
        (" on the full data" if protocol["subset"] is None else f" on a subset of {protocol['subset']} images")
    return (f"Ours in bold: test accuracy (%) {selection}, mean over tasks, {shown}, seed(s) {seeds} (one run per "
            "cell unless ± std is shown); in brackets the paper's value (Table 2) and Δ = ours − paper; "
            "– not run yet.")


def delta_m_lines(table):
    """The Δm% table (rows as the summary's) and its legend; one line instead when no setting has a single-task
    run to compare with."""
    if not any(table["rows"][REFERENCE][setting]["acc_per_task"] for setting in SETTINGS):
        return [f"Δm% against single task: none, since no {REFERENCE} run of this protocol has per-task accuracies."]
    lines = ["| Method | " + " | ".join(TITLES[s] for s in SETTINGS) + " |", "|" + "---|" * (len(SETTINGS) + 1)]
    for method, row in table["rows"].items():
        if method not in PAPER_METHODS and not any(cell["n"] for cell in row.values()):
            continue
        values = ["0 (reference)" if method == REFERENCE and cell["delta_m"] is not None else
                  "–" if cell["delta_m"] is None else f"{cell['delta_m']:+.2f}" for cell in row.values()]
        lines.append(f"| {method} | " + " | ".join(values) + " |")
    selection = SELECTED[table.get("selection", "best_val")]
    return lines + ["", f"Δm% against single task (ours): Δm = (1/T) Σ_t (acc_t − acc_single,t) / acc_single,t × 100, "
                    f"the mean over the T tasks of the relative change of the test accuracy {selection} from the "
                    f"{REFERENCE} row's in the same setting and protocol (per-task accuracies averaged over a cell's "
                    "seeds first); higher is better, negative: below single-task learning on average (Maninis et al. "
                    "2019; Navon et al. 2022). – : no run, or no single-task run to compare with. The paper reports "
                    "mean accuracies only, so it has no Δm%."]


def render_summary(table, source):
    """The summary table with its legend, which links the full table at ``source`` (and its Δm% table)."""
    return "\n".join(summary_lines(table)) + "\n\n" + summary_legend(table) + (
        " Rows the paper did not run: in brackets their Δm% against single task instead (the mean over tasks of the "
        "relative accuracy change from the single_task row, in %; higher is better). Made from the committed runs by "
        "the table maker; the full table, the Δm% of every cell, the last-epoch and best-test-epoch figures, the wall "
        "times, the commits and one line of reason for every cell more than 2 points from the paper: "
        f"[{source}]({source}).\n")


def render_markdown(table, command):
    """The Markdown file of the table: its header, the summary, the Δm% table, every figure of every cell, the
    last-epoch, best-test and wall-time tables, then the cells far from the paper with their reasons, the other
    protocols and the notes."""
    usual_n = max(cell["n"] for row in table["rows"].values() for cell in row.values())  # fewer runs: marked [n=k]
    lines = [
        *header_lines(table, command, usual_n),
        "",
        "## Summary",
        "",
        *summary_lines(table),
        "",
        summary_legend(table),
        "",
        "## Δm% against single task",
        "",
        *delta_m_lines(table),
        "",
        *every_figure_lines(table, usual_n),
        *secondary_lines(table),
        *wall_time_lines(table),
        *far_from_paper_lines(table),
        *other_protocol_lines(table),
    ]
    if table["notes"]:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in table["notes"]]
    return "\n".join(lines) + "\n"


def header_lines(table, command, usual_n):
    """The title and the list of how the table was made: the protocol shown, the training protocol, the
    optimisation, devices, total wall time, commits, the sweep's commands and the command that wrote it."""
    protocol = table["protocol"]
    seeds = ", ".join(map(str, table["seeds"])) or "none"
    if protocol is None:
        shown = "no runs found"
    else:
        data = "full data" if protocol["subset"] is None else f"subset {protocol['subset']} training images (smoke run)"
        shown = f"{protocol['epochs']} epochs, {data}, seeds {seeds} ({usual_n} per cell unless marked [n=k])"
    seconds = table["wall_time"]["seconds"]
    return [
        "# Table 2: Multi-MNIST, ours vs the paper",
        "",
        f"- Protocol: {shown}.",
        "- Training protocol (param `protocol`): " +
        ("–" if protocol is None else TRAINING_PROTOCOLS[protocol.get("protocol", "held_out")]) + ".",
        f"- Optimisation (from the runs' param files): {counted(table['optimisation'])}.",
        f"- Device(s): {counted(table['devices'])}.",
        f"- Total wall time: {seconds / 3600:.2f} h ({seconds:.0f} s), from {table['wall_time']['source']}.",
        f"- Git commit(s) of the runs: {counted({f'`{k}`': n for k, n in table['git_commits'].items()})}.",
        "- Sweep command(s): " + ("; ".join(f"`{c}`" for c in table["sweep_commands"]) or "–") + ".",
        f"- Generated by: `{command}`.",
    ]


def every_figure_lines(table, usual_n):
    """The full table with its legend: per setting, a cell's parameter multiple and its accuracy (mean ± std
    beside the paper's value and Δ, format_acc)."""
    lines = [
        "## Every figure",
        "",
        f"Acc: test accuracy (%) {SELECTED[table.get('selection', 'best_val')]}, mean over tasks, then mean ± "
        "sample std over seeds; "
        "in brackets the paper's value and Δ = ours − paper. "
        f"{MARK}: the paper's value lies outside ours ± 2 std (only for n ≥ 2). "
        "#P: parameters as a multiple of one LeNet (24,390 weights and biases), ours (paper).",
        "",
    ]
    header = ["Method"] + [f"{TITLES[s]} {col}" for s in SETTINGS for col in ("#P", "Acc")]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, row in table["rows"].items():
        name = f"{method} (ours, not in the paper)" if method in EXTRA_METHODS else \
            f"{method} (beyond the paper)" if method in BEYOND_METHODS else method
        values = [name] + [text for s in SETTINGS for text in (format_params(row[s]), format_acc(row[s], usual_n))]
        lines.append("| " + " | ".join(values) + " |")
    return lines


def secondary_lines(table):
    """The two tables of the other selections: test accuracy at the last epoch and at the best test epoch, each
    with its Δ to the paper."""
    lines = []
    for key, title in (("acc_last_mean", "at the last epoch"),
                       ("acc_best_test_mean", "at the best test epoch (the authors' released script keeps that model: "
                                              "optimistic, the test split picks the epoch)")):
        lines += ["", f"Test accuracy (%) {title}, mean over seeds (Δ = ours − paper):", "",
                  "| Method | " + " | ".join(TITLES[s] for s in SETTINGS) + " |", "|" + "---|" * (len(SETTINGS) + 1)]
        for method, row in table["rows"].items():
            values = [secondary(row[s], key) for s in SETTINGS]
            lines.append(f"| {method} | " + " | ".join(values) + " |")
    return lines


def wall_time_lines(table):
    """The table of each cell's wall time (h, summed over its seeds) and median epoch time (s)."""
    lines = ["", f"Wall time (h) of the shown runs, sum over a cell's seeds (training + evaluation, from results.json), "
             "and in brackets the median epoch time (s, training + evaluation, from metrics.jsonl; mean over seeds); "
             f"device(s): {', '.join(table['devices']) or '–'}:", "",
             "| Method | " + " | ".join(TITLES[s] for s in SETTINGS) + " |", "|" + "---|" * (len(SETTINGS) + 1)]
    for method, row in table["rows"].items():
        lines.append(f"| {method} | " + " | ".join(format_time(row[s]) for s in SETTINGS) + " |")
    return lines


def far_from_paper_lines(table):
    """One line per cell more than 2 points from the paper, with its Δ and the reason given for it (``reasons``
    of the table); none when no cell is."""
    far = [(setting, method, cell) for method, row in table["rows"].items() for setting, cell in row.items()
           if cell["diff"] is not None and abs(cell["diff"]) > 2]
    if not far:
        return []
    reasons = table.get("reasons", {})
    return ["", "Cells more than 2 points from the paper (Acc above), and why we think they differ:", ""] + [
        f"- {TITLES[setting]}, {method} ({cell['diff']:+.2f}): "
        f"{reasons.get(f'{setting}/{method}', 'no reason recorded yet')}" for setting, method, cell in far]


def other_protocol_lines(table):
    """One line per protocol found but not shown (its number for --protocol, its runs, how it differs); none
    when every run is of the protocol shown."""
    other = [f"- protocol {index}: {found['runs']} runs, {found['description']}"
             for index, found in enumerate(table["protocols_found"], 1) if not found["shown"]]
    if not other:
        return []
    return ["", "Runs under other protocols in this runs dir, kept apart (`--protocol K` shows one):", ""] + other


def write_tables(table, out_dir, name="table2", reasons=None):
    """Writes <name>.json and <name>.md into out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "experiments.table2", "--runs_dir", table["runs_dir"], "--out_dir", str(out_dir)]
                         + (["--name", name] if name != "table2" else []) + (["--reasons", reasons] if reasons else []))
    if table["protocol"] is not None:
        command += f" --epochs {table['protocol']['epochs']}"
        if table["protocol"]["subset"] is not None:
            command += f" --subset {table['protocol']['subset']}"
        same = [found for found in table["protocols_found"] if (found["epochs"], found["subset"]) ==
                (table["protocol"]["epochs"], table["protocol"]["subset"])]
        if len(same) > 1:
            command += f" --protocol {[found['shown'] for found in same].index(True) + 1}"
    if table["selection"] != "best_val":
        command += f" --select {table['selection']}"
    table = {**table, "command": command}
    paths = out_dir / f"{name}.json", out_dir / f"{name}.md"
    files.write_text(json.dumps(table, indent=2, ensure_ascii=False) + "\n", paths[0])
    files.write_text(render_markdown(table, command), paths[1])
    return paths


if __name__ == "__main__":
    cli.exit_with(main)
