"""Copy the finished runs of a sweep (results.json and metrics.jsonl) into a results folder, ready to commit.

    python -m experiments.collect_runs runs/table2_full results/table2_full

A run is finished when the training script has written its results.json. Each run keeps its path below the
source folder (``<setting>/<method>/seed<k>``); checkpoints and logs stay behind. A run already in the
destination is never overwritten: an identical copy is skipped, a different one is reported and left alone
(exit 1). A run whose results.json names a commit that is not clean (``-dirty``, ``unknown``) or not in this
checkout's history (HEAD's ancestors: a rebase replaced it) is refused with one line, since a committed result must
name the code that made it (so is every run where that cannot be checked: no git, a shallow clone);
``--allow_unclean`` copies it anyway. A run whose metrics.jsonl does not end at its last epoch is refused too.
Exit 0 when every finished run is in the
destination, 1 when a run was refused or differs, 2 for a mistake in the arguments.
"""
import filecmp
import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

from runtime.files import REPO
from training import cli

FILES = ("results.json", "metrics.jsonl")


def parse_args(argv):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a runs folder (searched recursively for results.json)")
    parser.add_argument("destination", help="the results folder the runs are copied into")
    parser.add_argument("--allow_unclean", action="store_true",
                        help="also copy runs whose commit is dirty, unknown or not in this checkout's history")
    parser.add_argument("--dry_run", action="store_true", help="say what would be copied, copy nothing")
    return parser.parse_args(argv)


def git(*args):
    """The completed ``git`` command in this checkout, or None when git cannot be run."""
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    except OSError:
        return None


@functools.cache
def checkout_problem():
    """Why this checkout cannot tell which commits are in its history (no git, no repository, a shallow clone), or
    None."""
    shallow = git("rev-parse", "--is-shallow-repository")
    if shallow is None:
        return "git cannot be run here"
    if shallow.returncode != 0:
        return f"{REPO} is not a git checkout"
    if shallow.stdout.strip() == "true":
        return f"{REPO} is a shallow clone (git fetch --unshallow gives it its history)"
    return None


def commit_problem(commit):
    """Why ``commit`` (a results.json's git_commit) cannot name the code of a committed result, or None."""
    if not commit or commit == "unknown" or commit.endswith("-dirty"):
        return f"its commit is {commit or 'missing'!r}, not a clean one"
    if checkout_problem():
        return f"its commit {commit[:12]} cannot be checked: {checkout_problem()}"
    if git("merge-base", "--is-ancestor", commit, "HEAD").returncode != 0:
        return f"its commit {commit[:12]} is not in this checkout's history (HEAD and its ancestors)"
    return None


def metrics_short(metrics, epochs):
    """Why ``metrics`` does not hold one line per epoch up to the run's ``epochs``, or None: a run killed between
    its last checkpoint and its metrics line, before the resume that rewrites the file (training/run_dir.py)."""
    try:
        last = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()][-1:]
    except (OSError, json.JSONDecodeError) as err:
        return f"metrics.jsonl unreadable ({err})"
    ended = last[0].get("epoch") if last else 0
    if isinstance(epochs, int) and ended != epochs:
        return f"metrics.jsonl ends at epoch {ended} of {epochs} (resume the run to write it whole)"
    return None


def collect(source, destination, allow_unclean=False, dry_run=False):
    """[(run path below source, what happened)] for every finished run under ``source``; what happened is one of
    "copied", "already there", or a reason it was not copied (starting with "refused" or "differs"). ValueError
    when ``source`` is no folder."""
    if not Path(source).is_dir():
        raise ValueError(f"{source} is not a folder; give the --runs_dir of a sweep")
    report = []
    for results in sorted(Path(source).rglob("results.json")):
        run = results.parent
        relative = run.relative_to(source)
        missing = [name for name in FILES if not (run / name).is_file()]
        if missing:
            report.append((relative, f"refused: no {', '.join(missing)} beside results.json"))
            continue
        try:
            info = json.loads(results.read_text())
        except (OSError, json.JSONDecodeError) as err:
            report.append((relative, f"refused: results.json unreadable ({err})"))
            continue
        short = metrics_short(run / "metrics.jsonl", info.get("epochs"))
        if short:
            report.append((relative, f"refused: {short}"))
            continue
        target = Path(destination) / relative
        present = [name for name in FILES if (target / name).exists()]
        if present:
            same = all((target / name).is_file() and filecmp.cmp(run / name, target / name, shallow=False)
                       for name in FILES)
            report.append((relative, "already there" if same else
                           f"differs: {target} holds another {', '.join(present)}; left as it is"))
            continue
        problem = None if allow_unclean else commit_problem(info.get("git_commit"))
        if problem:
            report.append((relative, f"refused: {problem} (--allow_unclean copies it)"))
            continue
        if not dry_run:
            target.mkdir(parents=True, exist_ok=True)
            for name in FILES:
                shutil.copyfile(run / name, target / name)
        report.append((relative, "copied" + (" (dry run)" if dry_run else "")))
    return report


def main(argv=None):
    args = parse_args(argv)
    try:
        report = collect(args.source, args.destination, args.allow_unclean, args.dry_run)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for relative, what in report:
        print(f"{relative}: {what}")
    if not report:
        print(f"no finished run (results.json) under {args.source}")
    return 1 if any(what.startswith(("refused", "differs")) for _, what in report) else 0


if __name__ == "__main__":
    cli.exit_with(main)
