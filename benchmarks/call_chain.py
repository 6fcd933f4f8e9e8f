"""Following the command-line arguments from the training script to the step: which project modules a run enters on
the way, how often, and how many times it opens its param file; at this checkout and at other revisions.

    python benchmarks/call_chain.py                                   # this checkout
    python benchmarks/call_chain.py --base e5beb03 --base 568ddca     # and those revisions (git archive), side by side

Each revision runs in its own process from its own folder (a base from ``git archive <base>``): its training script's
``main`` with the arguments of ``RUNS`` (one CPU gradnorm run of the Table 1 trainer, one round-robin run), under
``sys.setprofile``, until the step's first ``Optimizer.zero_grad``. Counted, of the project's own code only:

- the chain: the project functions on the stack at that call, from ``main`` to the step;
- entries: the calls that a function of the chain makes itself to a project function of another module (a call to
  a function of its own module is not an entry; calls made further down are not counted: a callee is entered once,
  whatever it does inside), per module;
- modules entered: the modules of the chain and of those entries;
- param file opens: every ``open`` of the run's param file (``builtins.open`` and ``io.open``, which
  ``Path.read_text`` calls), from the start of ``main`` to the step.

Prints one table per run and writes the figures to runs/benchmarks/call_chain.json (or ``--out``).
"""
import argparse
import builtins
import collections
import io
import json
import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "train_multi_task_counter_stream.py"
RUNS = {  # name -> (param file, arguments after it; --out is added)
    "gradnorm": ("params/mmnist_9digits_gradnorm.json", ["--epochs", "1", "--subset", "600", "--device", "cpu"]),
    "round_robin": ("params/gumbel_mnist/gumbel_matrix.json", ["--steps", "1", "--subset", "200"]),
}
WATCHED = ("runtime.distributed", "training.config")  # the modules the issue counts; at older revisions
OLD_NAMES = {"distributed": "runtime.distributed", "config": "training.config"}  # their names before the move


class StepReached(BaseException):
    """Raised at the step's first zero_grad: ends the run (nothing below ``main`` catches a BaseException)."""


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", action="append", default=[], help="another revision to measure (repeatable)")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma list of {', '.join(RUNS)}")
    parser.add_argument("--out", default=str(REPO / "runs" / "benchmarks" / "call_chain.json"))
    return parser.parse_args(argv)


def module_of(filename, root):
    """The dotted module name of a file of the project at ``root``; None for any other file."""
    try:
        relative = Path(filename).resolve().relative_to(root)
    except ValueError:
        return None
    if relative.suffix != ".py" or relative.parts[0] in ("tests", "benchmarks"):
        return None
    name = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
    return OLD_NAMES.get(name, name)


def measure(root, run):
    """The chain, the entries and the param-file opens of ``run`` at the project in ``root`` (in this process)."""
    root = root.resolve()
    param_file, arguments = RUNS[run]
    param_path = (root / param_file).resolve()
    calls = collections.Counter()  # (caller code, callee code) -> calls, both of the project
    chain, opens = [], [0]
    modules = {}

    def module(code):
        if code not in modules:
            modules[code] = module_of(code.co_filename, root)
        return modules[code]

    def profile(frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        if code.co_name == "zero_grad" and "torch" in Path(code.co_filename).parts and "optim" in code.co_filename:
            caller = frame.f_back
            while caller is not None:
                if module(caller.f_code):
                    chain.append(caller.f_code)
                caller = caller.f_back
            raise StepReached
        if module(code) and frame.f_back is not None and module(frame.f_back.f_code):
            calls[frame.f_back.f_code, code] += 1

    opener = io.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file).resolve() == param_path:
            opens[0] += 1
        return opener(file, *args, **kwargs)

    run_to_step(root, ["--param_file", param_file, *arguments], profile, counting_open)
    if not chain:
        raise SystemExit(f"{root}: {run} ended before its step")
    return figures(chain, calls, module, opens[0])


def run_to_step(root, arguments, profile, counting_open):
    """Runs the ``main`` of the training script of the project in ``root`` (which becomes the working directory
    and the first entry of sys.path) on ``arguments`` and an --out in a temporary folder, under ``profile`` and
    with ``counting_open`` as ``builtins.open`` and ``io.open``, until the end or StepReached; both are restored
    whatever happens."""
    opener = io.open
    os.chdir(root)
    sys.path.insert(0, str(root))
    script = runpy.run_path(str(root / SCRIPT), run_name="call_chain")
    with tempfile.TemporaryDirectory() as out:
        argv = [*arguments, "--out", str(Path(out) / "run")]
        io.open = builtins.open = counting_open
        sys.setprofile(profile)
        try:
            script["main"](argv)
        except StepReached:
            pass
        finally:
            sys.setprofile(None)
            io.open = builtins.open = opener


def figures(chain, calls, module, opens):
    """The figures of a measured run from the code objects on the stack at the step (``chain``, innermost first),
    the project-to-project calls (``calls``: (caller, callee) -> count), ``module`` (a code object's module, None
    outside the project) and the param file's opens: the chain, the entries its functions make into other modules
    (in all, per module, per caller -> callee), the modules entered and the opens."""
    chain_codes = set(chain)
    entries, entered_by = collections.Counter(), {}
    for (caller, callee), n in calls.items():
        if caller in chain_codes and module(callee) != module(caller):
            entries[module(callee)] += n
            entered_by[f"{module(caller)}.{caller.co_qualname} -> {module(callee)}.{callee.co_qualname}"] = n
    entered = {module(code) for code in chain} | set(entries)
    return {"chain": [f"{module(code)}.{code.co_qualname}" for code in reversed(chain)],
            "modules_entered": len(entered), "modules": sorted(entered),
            "entries": sum(entries.values()), "entries_per_module": dict(entries.most_common()),
            **{f"{name}_entries": entries[name] for name in WATCHED},
            "param_file_opens": opens, "calls": entered_by}


def revision_folder(revision, folder):
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def child(root, run):
    """``measure`` in a fresh process that has imported nothing of this checkout, so that each revision imports its
    own modules."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import call_chain; "
            f"print(json.dumps(call_chain.measure(call_chain.Path({str(root)!r}), {run!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{root}: {run}: exit {done.returncode}: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    runs = args.runs.split(",")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    results = {}
    with tempfile.TemporaryDirectory() as temp:
        roots = {}
        for base in args.base:
            (Path(temp) / base).mkdir()
            roots[base] = revision_folder(base, Path(temp) / base)
        roots[f"{head.stdout.strip()}{'+changes' if dirty else ''} (this checkout)"] = REPO
        for name, root in roots.items():
            results[name] = {run: child(root, run) for run in runs}
    for run in runs:
        print(f"\n{run}: {RUNS[run][0]} {' '.join(RUNS[run][1])}")
        print("| revision | modules entered | entries | " + " | ".join(WATCHED) + " | param file opens | chain |")
        print("|---|---|---|" + "---|" * len(WATCHED) + "---|---|")
        for name, figures in results.items():
            f = figures[run]
            print(f"| {name} | {f['modules_entered']} | {f['entries']} | "
                  + " | ".join(str(f[f"{w}_entries"]) for w in WATCHED)
                  + f" | {f['param_file_opens']} | {' -> '.join(f['chain'])} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": {run: RUNS[run] for run in runs}, "revisions": results}, indent=1) + "\n")
    print(f"\nfigures in {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    from training import cli  # only here: a measured revision imports its own training package

    cli.exit_with(main)
