"""The command line that every entry point shares: one-line argument errors (exit 2), the argument types, the exit
codes (0 done; 2 a user mistake or unusable input; 130 interrupted; 1 only for a bug, with its traceback) and the
device."""
import argparse
import os
import shlex
import sys

import torch

from runtime import distributed, precision
from training import config, run_lock


CUDA_GRAPHS = ("auto", "on", "off")  # --cuda_graphs: training/step_graph.py


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")


def flags(container):
    """The long flags of a parser or of one of its argument groups (``--help`` aside), in the order they were added."""
    actions = container._group_actions if isinstance(container, argparse._ArgumentGroup) else container._actions
    return [option for action in actions for option in action.option_strings
            if option.startswith("--") and option != "--help"]


def given_flags(parser, argv):
    """The flags of ``parser`` that ``argv`` gives, as ``parser`` reads them (``--flag=value`` and abbreviations
    too), in the parser's order; ``argv`` must parse."""
    defaults = {action: action.default for action in parser._actions}
    try:
        for action in defaults:
            action.default = argparse.SUPPRESS  # a flag not given then leaves no attribute at all
        given = vars(parser.parse_args(argv))
    finally:
        for action, default in defaults.items():
            action.default = default
    return [flag for action in parser._actions if action.dest in given for flag in action.option_strings[:1]]


def positive_int(text):
    return _int_at_least(text, 1)


def non_negative_int(text):
    return _int_at_least(text, 0)


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _int_at_least(text, low):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
    return value


def protocol_arguments(parser, runs_dir, out_dir):
    """The options every runner of training-script cells shares (the Table 2 sweep, Figure 3, Table 6b)."""
    parser.add_argument("--epochs", type=positive_int, default=100, help="epochs per run (default 100)")
    seed_arguments(parser)
    parser.add_argument("--subset", type=positive_int, help="train on N images (smoke runs)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--runs_dir", default=runs_dir, help=f"where the runs go (default {runs_dir})")
    parser.add_argument("--out_dir", default=out_dir, help=f"where the table goes (default {out_dir}: a committed "
                        f"table is only replaced when its folder is named)")
    return parser


def set_argument(parser):
    """--set KEY=VALUE, handed to every cell's training run."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to every cell's training run (e.g. --set eval_every=10), repeatable")


def comma_list(valid, what):
    def parse(text):
        names = [name for name in text.split(",") if name]
        unknown = [name for name in names if name not in valid]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(map(repr, unknown)) or '(empty)'}; "
                                             f"valid choices: {','.join(valid)}")
        return list(dict.fromkeys(names))
    return parse


def seed_list(text):
    """'3' -> seed 3; '0,2,7' (or '3,', as a single seed was once written) -> those seeds. A number of seeds is
    ``--n_seeds`` (``seed_arguments``)."""
    try:
        seeds = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected a seed >= 0 (3) or a comma list of seeds (0,2,7), got {text!r}; "
                                         f"a number of seeds is --n_seeds N")
    return list(dict.fromkeys(seeds))


def seed_count(text):
    """'5' -> seeds 0..4."""
    return list(range(positive_int(text)))


def seed_arguments(parser, default=5):
    """``--seeds`` (one seed, 3 = seed 3, or a comma list) and ``--n_seeds N`` (seeds 0..N-1), one or the other,
    both into ``args.seeds`` (default seeds 0..``default``-1)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--seeds", type=seed_list, default=list(range(default)),
                       help="the seeds to run: one (3 = seed 3) or a comma list (0,2,7); default: --n_seeds")
    group.add_argument("--n_seeds", type=seed_count, dest="seeds", metavar="N",
                       help=f"run seeds 0..N-1 (default {default})")


def exit_code(run, args):
    """``run(args)``'s exit code: a user mistake (ParamError), a busy output dir or unusable input found during the
    run (RunError) is one line on stderr and code 2, Ctrl-C one line and code 130; anything else is a bug and
    leaves Python's traceback and code 1. Shared by the scripts built on this one."""
    try:
        return run(args)
    except (config.ParamError, run_lock.RunDirBusy, RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"\ninterrupted: {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted; every file written so far is complete (all writes are atomic)", file=sys.stderr)
        return 130


class RunError(RuntimeError):
    """Unusable input or surroundings found during the run (a corrupt checkpoint or model file, an unwritable
    folder, a full disk, settings whose loss turns non-finite): reported as one line, exit code 2."""


class Interrupted(RuntimeError):
    """Ctrl-C during training: one line saying where the run stands and how to continue it, exit code 130."""


def resolve_device(name, tf32=False):
    """The device of this process; under torchrun a CUDA device is cuda:LOCAL_RANK (one GPU per process). Sets the
    float32 precision of CUDA convolutions and matmuls: IEEE float32, or TF32 if ``tf32`` (runtime/precision.py)."""
    precision.set_float32_precision(tf32)
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise config.ParamError(f"--device: unknown device {name!r}; allowed: auto, cpu, cuda, cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise config.ParamError(f"--device: {name} requested but CUDA is not available here; allowed: auto, cpu")
        if device.type not in ("cpu", "cuda"):
            raise config.ParamError(f"--device: unsupported device {name!r}; allowed: auto, cpu, cuda, cuda:N")
    if device.type != "cuda" or not distributed.launched():
        return device
    if device.index is not None:
        raise config.ParamError(f"--device: {name}: under torchrun every process uses the GPU cuda:LOCAL_RANK; "
                                f"allowed: auto, cpu, cuda")
    if distributed.local_rank() >= torch.cuda.device_count():
        raise config.ParamError(f"--device: process LOCAL_RANK={distributed.local_rank()} has no GPU of its own "
                                f"({torch.cuda.device_count()} here); start at most that many per node "
                                f"(--nproc_per_node)")
    return torch.device("cuda", distributed.local_rank())


def command_line(module, argv=None):
    """The command that ran ``module`` (``python -m experiments.table2 ...``; a file name such as
    ``train_multi_task_counter_stream.py`` gives ``python train_multi_task_counter_stream.py ...``), recorded in the
    files it writes; ``argv`` defaults to this process's arguments."""
    head = ["python", module] if module.endswith(".py") else ["python", "-m", module]
    return shlex.join(head + [str(word) for word in (sys.argv[1:] if argv is None else argv)])


def exit_with(main):
    """Runs ``main()`` and exits with its code; Ctrl-C prints one line instead of a traceback and exits with 130; a
    reader of the output that stops early (``| head``) ends the script quietly, with 141 as a shell's SIGPIPE. Every
    file a script writes is written atomically (training/checkpoint.py), so none is left half-written."""
    try:
        code = main()
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C); every file written so far is complete: rerun the same command to start "
              "again (training runs continue with --resume)", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit: not an error
        code = 141
    sys.exit(code)

