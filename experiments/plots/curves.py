"""Plot training curves per epoch (training loss, validation and test accuracy) from the runs' metrics.jsonl.

    python -m experiments.plots.curves results/controlnet_9digits --out docs/figures/curves_controlnet_9digits.png
    python -m experiments.plots.curves results/table2_cpu_reduced/9digits --group seeds --per_task

Each RUN is a run directory of train_multi_task_counter_stream.py (metrics.jsonl, results.json) or a folder searched
recursively for them. Runs are overlaid, one line each; with ``--group seeds`` the runs that differ only by their
seed (same method, setting, epochs, subset and param file) become one line, the mean over seeds with a band of
± 1 sample std (ddof=1) on the epochs every seed has. ``--per_task`` adds one panel per task (test accuracy,
validation dashed). Runs that evaluate every k epochs (``eval_every``) have accuracy points only at those epochs.
``--colors method`` gives the lines of one method one hue (dark for the first, light for the second, e.g. a method at
100 and at 900 epochs); by default every line has its own color. Every line also has its own marker shape, drawn on
every k-th epoch (on every evaluated epoch for runs evaluated every few epochs) and staggered from line to line, so
that a line lying under another still shows.
Lines are named from results.json (method, setting, epochs, subset and every param, as set by the param file or
``--set``, that differs between the plotted runs: lr, batch_size, protocol, ...); what every line shares goes into
the title; a run without results.json yet is named by its folder. Epoch ticks are integers. ``--from_epoch N``
leaves out the epochs before N (said in the title), so that runs ending close together can be told apart.
Writes a PNG (default runs/curves.png). Mistakes: one line, exit code 2.
"""
import json
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import numpy as np

from experiments.table2 import METHOD_KEYS, NEUTRAL_KEYS, completed_defaults, dotted_options
from experiments.plots import pyplot, save_figure
from training import cli

SETTING_TITLES = {"2digits": "2 digits", "4digits": "4 digits", "9digits": "9 digits by location",
                  "9digits_byref": "9 digits by reference"}


TITLE_WIDTH = 150  # characters per line of the figure's title (15 inches wide at 11 pt)
MARKERS = "osD^vP*Xph<>"  # one shape per line, in order
MARKS_PER_LINE = 10  # markers on a line evaluated every epoch


class CurveError(ValueError):
    """A user mistake (missing run, malformed metrics.jsonl): one line, exit code 2."""


def parse_args(argv):
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories, or folders searched for them")
    parser.add_argument("--group", choices=("none", "seeds"), default="none",
                        help="none: one line per run; seeds: mean ± std over the runs that differ only by seed")
    parser.add_argument("--per_task", action="store_true", help="add one accuracy panel per task")
    parser.add_argument("--colors", choices=("run", "method"), default="run",
                        help="run: a color per line; method: a hue per method, dark then light for its lines")
    parser.add_argument("--from_epoch", type=int, default=1, metavar="N",
                        help="draw the epochs from N on, so that where the runs end fills the axes (default 1: all)")
    parser.add_argument("--out", default="runs/curves.png", help="output PNG (default runs/curves.png)")
    return parser.parse_args(argv)


def find_runs(paths):
    """The run directories (holding metrics.jsonl) at or under ``paths``, in order, without repeats."""
    found = []
    for path in map(Path, paths):
        if not path.exists():
            raise CurveError(f"{path} not found; pass run directories (holding metrics.jsonl) or folders of them")
        matches = [path.parent] if path.name == "metrics.jsonl" else \
            [path] if (path / "metrics.jsonl").is_file() else sorted(m.parent for m in path.rglob("metrics.jsonl"))
        if not matches:
            raise CurveError(f"{path} holds no metrics.jsonl; pass the --out dir of a training run")
        found += [m for m in matches if m not in found]
    return found


def load_run(directory):
    """{"dir", "records", "info"}: the metrics.jsonl records and results.json (None when the run has none yet)."""
    records = []
    metrics = directory / "metrics.jsonl"
    for number, line in enumerate(metrics.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CurveError(f"{metrics}: line {number} is not JSON ({err.msg})") from None
        if not isinstance(record, dict) or not {"epoch", "train_loss"} <= set(record):
            raise CurveError(f"{metrics}: line {number} lacks 'epoch' or 'train_loss'; is it a training run's file?")
        records.append(record)
    if not records:
        raise CurveError(f"{metrics} is empty: the run has not finished an epoch yet")
    info = None
    if (directory / "results.json").is_file():
        try:
            info = json.loads((directory / "results.json").read_text())
        except json.JSONDecodeError as err:
            raise CurveError(f"{directory / 'results.json'} is not JSON ({err.msg})") from None
    return {"dir": directory, "records": records, "info": info}


def from_epoch(runs, first):
    """The runs with their records before epoch ``first`` left out; CurveError when a run keeps none."""
    if first < 1:
        raise CurveError(f"--from_epoch {first}: give an epoch, 1 or more")
    for run in runs:
        run["records"] = [record for record in run["records"] if record["epoch"] >= first]
        if not run["records"]:
            raise CurveError(f"--from_epoch {first}: {run['dir']} has no epoch from {first} on")
    return runs


def describe(info, directory):
    """What a reader needs to tell a run apart, from results.json: method, setting, epochs, subset."""
    if info is None:
        return [f"{directory} (no results.json)"]
    parts = [info["method"], SETTING_TITLES.get(info["setting"], info["setting"]), f"{info['epochs']} epochs"]
    return parts + ([f"subset of {info['subset']} training images"] if info.get("subset") else [])


def run_params(info):
    """The run's params as the training script used them (a key its results.json lacks, from a run older than the
    key, reads as the default filled in today), without the method's own keys and those that do not change the
    numbers; the method's options each as a dotted key (``model_options.sigma``), where the run sets them."""
    params = info.get("params", {})
    defaults = completed_defaults(params.get("dataset", "multi_mnist"), info.get("setting"))
    flat = {key: params.get(key, defaults.get(key)) for key in {*params, *defaults}
            if key not in METHOD_KEYS + NEUTRAL_KEYS + ("epochs",)}
    return {**flat, **dotted_options(params)}


def differing_params(runs):
    """The param keys whose values are not the same in every run (with a results.json), sorted."""
    values = [run_params(run["info"]) for run in runs if run["info"]]
    keys = {key for params in values for key in params}
    return sorted(key for key in keys if len({json.dumps(params.get(key), sort_keys=True) for params in values}) > 1)


def shown(value):
    """A param value as ``--set`` takes it: a string bare, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def group_runs(runs, by_seeds):
    """[(parts of its name, [runs])]: one group per run, or with ``by_seeds`` one per (method, setting, epochs,
    subset, param file); the params that differ between the runs (``key=value``), then the seeds end the name."""
    groups = defaultdict(list)
    for run in runs:
        info = run["info"]
        key = str(run["dir"]) if info is None or not by_seeds else json.dumps(
            [info["method"], info["setting"], info["epochs"], info.get("subset"), info.get("params")], sort_keys=True)
        groups[key].append(run)
    differing = differing_params(runs)
    named = []
    for members in groups.values():
        seeds = [run["info"]["seed"] for run in members if run["info"]]
        parts = describe(members[0]["info"], members[0]["dir"])
        if members[0]["info"]:
            params = run_params(members[0]["info"])
            parts += [f"{key}={shown(params[key])}" for key in differing if key in params]  # options: where set
        if len(members) > 1:
            parts.append(f"mean ± std over seeds {', '.join(map(str, sorted(seeds)))}")
        elif seeds:
            parts.append(f"seed {seeds[0]}")
        named.append((parts, members))
    return named


def split_names(groups):
    """(what every line shares, for the title; each line's own label, for the legend)."""
    common = [part for part in groups[0][0] if all(part in parts for parts, _ in groups)]
    labels = [", ".join(part for part in parts if part not in common) or ", ".join(parts) for parts, _ in groups]
    return ", ".join(common), labels


def series(members, value):
    """(epochs, mean, std or None) of ``value(record)`` (None = not recorded) over the runs in ``members``, on the
    epochs where every run has it; std is the sample std (ddof=1), None for one run."""
    per_run = [{r["epoch"]: value(r) for r in run["records"] if value(r) is not None} for run in members]
    epochs = sorted(set.intersection(*(set(values) for values in per_run)))
    values = np.array([[values[e] for e in epochs] for values in per_run], dtype=float).reshape(len(per_run), -1)
    std = values.std(axis=0, ddof=1) if len(members) > 1 else None
    return np.array(epochs), values.mean(axis=0), std


def line_styles(plt, groups, by_method):
    """(color, line style) of each group: tab10 in order, solid up to 10 lines then dash-dotted; or ``by_method``,
    tab20's pair of one hue per method, the method's first line dark, its second light, later ones dash-dotted."""
    if not by_method:
        colors = plt.get_cmap("tab10")
        return [(colors(index % 10), "-" if index < 10 else "-.") for index in range(len(groups))]
    colors, methods, seen = plt.get_cmap("tab20"), [], defaultdict(int)
    styles = []
    for _, members in groups:
        method = members[0]["info"]["method"] if members[0]["info"] else str(members[0]["dir"])
        if method not in methods:
            methods.append(method)
        rank = seen[method]
        seen[method] += 1
        styles.append((colors((2 * methods.index(method)) % 20 + min(rank, 1)), "-" if rank < 2 else "-."))
    return styles


def draw(ax, members, value, color, linestyle, label=None, marker=None, stagger=(0, 1)):
    """One line of ``value`` over epochs (a band of ± 1 std over seeds); ``marker`` on every k-th point, the
    first at place ``stagger[0]`` of ``stagger[1]`` lines, or on every point of a run evaluated every few epochs."""
    epochs, mean, std = series(members, value)
    if not len(epochs):
        return
    every_epoch = len(epochs) == epochs[-1] - epochs[0] + 1
    step = max(1, len(epochs) // MARKS_PER_LINE) if every_epoch else 1
    ax.plot(epochs, mean, linestyle, color=color, label=label, marker=marker or ("o" if not every_epoch else None),
            markersize=6 if every_epoch else 3, markevery=(stagger[0] * step // stagger[1] % step, step))
    if std is not None:
        ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)


def per_task(split, task):
    key = f"{split}_acc_per_task"
    return lambda record: record[key][task] if key in record and task < len(record[key]) else None


def plot(plt, groups, with_tasks, sources, by_method=False, first=1):
    """The figure: training loss, validation and test accuracy (mean over tasks), and one panel per task; its title
    says when the epochs before ``first`` are left out."""
    num_tasks = max((len(r.get("test_acc_per_task", [])) for _, members in groups for run in members
                     for r in run["records"]), default=0) if with_tasks else 0
    task_rows = -(-num_tasks // 3)
    columns = 1 if len(groups) <= 4 else 2
    fig, axes = plt.subplots(1 + task_rows, 3, figsize=(15, 4 * (1 + task_rows) + 0.25 * len(groups) / columns + 0.8),
                             squeeze=False, layout="constrained")
    shared, labels = split_names(groups)
    styles = line_styles(plt, groups, by_method)
    for index, ((_, members), label, (color, style)) in enumerate(zip(groups, labels, styles)):
        mark = {"marker": MARKERS[index % len(MARKERS)], "stagger": (index, len(groups))}
        draw(axes[0, 0], members, lambda r: r["train_loss"], color, style, label, **mark)
        draw(axes[0, 1], members, lambda r: r.get("val_acc_mean"), color, style, **mark)
        draw(axes[0, 2], members, lambda r: r.get("test_acc_mean"), color, style, **mark)
        for task in range(num_tasks):
            ax = axes[1 + task // 3, task % 3]
            draw(ax, members, per_task("test", task), color, style, **mark)
            draw(ax, members, per_task("val", task), color, "--")
    titles = ("training loss (mean over the epoch's batches)", "validation accuracy, mean over tasks",
              "test accuracy, mean over tasks")
    for ax, title, ylabel in zip(axes[0], titles, ("loss (cross-entropy)", "accuracy (%)", "accuracy (%)")):
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
    for task in range(task_rows * 3):
        ax = axes[1 + task // 3, task % 3]
        if task >= num_tasks:
            ax.set_visible(False)
            continue
        ax.set(title=f"task {task}: test accuracy (validation dashed)", xlabel="epoch", ylabel="accuracy (%)")
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    bands = any(len(members) > 1 for _, members in groups)
    fig.legend(loc="outside lower center", ncol=columns, fontsize=9, frameon=False,
               title="run" + (" (band: ± 1 sample std over seeds)" if bands else ""))
    origin = textwrap.fill(f"(from {', '.join(map(str, sources))})", TITLE_WIDTH, break_long_words=False,
                           break_on_hyphens=False)
    cut = f" (epochs {first} on)" if first > 1 else ""
    fig.suptitle(f"Training curves{': ' + shared if shared else ''}{cut}\n{origin}", fontsize=11)
    return fig


def main(argv=None):
    args = parse_args(argv)
    plt = pyplot("experiments/plots/curves.py")
    if plt is None:
        return 2
    try:
        runs = from_epoch([load_run(directory) for directory in find_runs(args.runs)], args.from_epoch)
    except (CurveError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    fig = plot(plt, group_runs(runs, args.group == "seeds"), args.per_task, args.runs, args.colors == "method",
               args.from_epoch)
    out = Path(args.out)
    save_figure(plt, fig, out, dpi=120)
    print(f"wrote {out} ({len(runs)} run(s))")
    return 0


if __name__ == "__main__":
    cli.exit_with(main)
