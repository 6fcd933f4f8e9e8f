"""Train a multi-task model from a JSON param file (paper §3-4, Table 1 protocol): Multi-MNIST (Table 2) on
LeNet, CLEVR, CELEB-A and CUB-200 (Tables 3 and 6a) on VGG-11, VGG-7 and ResNet-18.

    python train_multi_task_counter_stream.py --param_file=params/mmnist_counter_9tasks_params.json --epochs 100
    python train_multi_task_counter_stream.py --param_file=params/clevr_40tasks_controlnet.json --data_root DIR

The param file picks the data set and its task set, the method (model + loss weighting), the optimiser and
the schedule (see training/config.py). Every split is held in memory as uint8 images, moved to the device once and
normalised there with the data set's mean and std; batches are index slices. Single-branch models (ControlNet,
ch-mod, task routing) get one task drawn per training sample, among the tasks valid for it; multi-branch models
see every task label of an image in one pass. On CLEVR and CUB-200 a run can add the localisation loss
(``spatial_loss_weight``, the 'loc' of Table 3): at the bottom of TD for ControlNet, on an FC location head at
the top of the network for the baselines. Every epoch (or every ``eval_every``) evaluates every task on every
validation and test image where it is defined. Under ``protocol: held_out`` (the default) the kept model
(best_model.pt) is the best-validation one; under ``protocol: authors`` (Multi-MNIST: the authors' released
script) training uses all 60k MNIST training images, there is no validation split, and the kept model is the
best-on-test one. results.json reports three test figures: at the best-validation epoch (held_out only), at the
best test epoch (optimistic) and at the last epoch. Outputs in --out: metrics.jsonl, results.json, checkpoint.pt
(resume state) and best_model.pt, all written atomically, and train.log. ``--seeds 0,1,2,3,4`` trains the runs
of several seeds in one process as one stacked model (training/engine.py), each into <out>/seed<k>.
An output dir takes one run at a time (``run_lock``); ``--resume`` continues a run only with the arguments that
made it; ``--set KEY=VALUE`` changes one param-file key from the command line (recorded in results.json). With
--tensorboard also TensorBoard scalars in tensorboard/ (training/tensorboard_log.py). ``--eval_only --out RUN`` evaluates
RUN's best_model.pt (or a given .pt) without training into RUN/eval.json.

The arguments are checked first, then the param file is read, once: one with ``"dataset": "rotated_mnist"``
(params/gumbel_mnist/) is trained by Maziarz et al.'s round-robin protocol (training/round_robin.py, with flags of
its own: --steps, --threads), every other one by the Table 1 trainer above; a flag that only the other trainer takes
is refused in one line (exit code 2).

Started by torchrun (``torchrun --nproc_per_node=N train_multi_task_counter_stream.py ...``), it trains one model
with DistributedDataParallel over N processes (one GPU each, or CPU processes) with the same global batches,
task draws and gradients as one process (see runtime/distributed.py); rank 0 writes the outputs.
"""
import json
from pathlib import Path

from runtime import allocator, distributed
from training import config, round_robin, trainer
from training.cli import CUDA_GRAPHS, ArgumentParser, command_line, exit_code, flags, given_flags, \
    non_negative_int, positive_int, seed_list
from training.evaluate import evaluate_only

ROUND_ROBIN_DATASETS = round_robin.SCHEMA["dataset"][2]  # the param files the round-robin protocol trains
TRAINERS = {  # name -> (the trainer, the param files it trains); --help shows a group of flags for each alone
    "trainer": ("the Table 1 trainer", "training/trainer.py: every param file of docs/params.md"),
    "round_robin": ("Maziarz et al.'s round-robin protocol", "training/round_robin.py: param files with \"dataset\": "
                    f"{' or '.join(map(json.dumps, ROUND_ROBIN_DATASETS))}; docs/experiments.md"),
}


def parse_args(argv):
    """The arguments of both trainers, checked. ``args.takes`` maps each trainer to its flags, ``args.refused`` to
    the flags of ``argv`` it does not take (``check_flags`` refuses them once the param file names the trainer)."""
    parser, groups = build_parser()
    args = parser.parse_args(argv)
    others = {name: {flag for other, group in groups.items() if other != name for flag in flags(group)}
              for name in groups}
    args.takes = {name: [flag for flag in flags(parser) if flag not in others[name]] for name in groups}
    args.refused = {name: [flag for flag in given_flags(parser, argv) if flag in others[name]] for name in groups}
    check_args(parser, args)
    return args


def build_parser():
    """The parser of both trainers: the flags they share, then a group of flags for each trainer alone."""
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--param_file", help="JSON param file (see params/ and docs/params.md); required unless "
                        "--eval_only; its \"dataset\" picks the trainer (Table 1 or round robin)")
    parser.add_argument("--epochs", type=positive_int, help="training epochs (default: the param file's, else 100); "
                        "round robin: passes over each task's training set")
    parser.add_argument("--seed", type=non_negative_int, help="run seed: initialisation, order, tasks (default 0)")
    parser.add_argument("--out", help="output dir (default runs/<exp_id>/seed<k>; round robin: "
                        "runs/gumbel_mnist/<exp_id>/seed<k>)")
    parser.add_argument("--subset", type=positive_int, help="use only N training and N/5 val/test images (smoke runs; "
                        "round robin: N training images, the test split stays full)")
    parser.add_argument("--data_root", help="data directory (default: the param data_root, else for Multi-MNIST, "
                        "CLEVR-like and rotated MNIST $MTL_DATA_ROOT or ./data, for CLEVR, CELEB-A, CUB-200 "
                        "$MTL_CLEVR_ROOT, $MTL_CELEBA_ROOT, $MTL_CUB_ROOT)")
    parser.add_argument("--dry_run", action="store_true", help="build the model, print its parameter counts, exit")
    groups = {name: parser.add_argument_group(f"{who} only ({files})") for name, (who, files) in TRAINERS.items()}
    table1_arguments(groups["trainer"])
    round_robin.arguments(groups["round_robin"])
    return parser, groups


def table1_arguments(group):
    group.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one param-file key, repeatable; VALUE is read as JSON, a dotted KEY sets one "
                            "entry of a dict key (e.g. --set lr=0.01 --set weighting_options.alpha=1.0)")
    group.add_argument("--seeds", type=seed_list, help="several seeds trained as one stacked group in this "
                       "process: a comma list (0,1,2); each seed's run goes to <out>/seed<k> "
                       "(default runs/<exp_id>/seed<k>) with the files of its separate run (docs/stacked.md)")
    group.add_argument("--stack_mode", choices=("auto", "loop", "vmap"), default="auto", help="how --seeds runs "
                       "its replicas: loop (one after the other), vmap (batched kernels) or auto (loop on CPU, vmap "
                       "on CUDA)")
    group.add_argument("--cuda_graphs", choices=CUDA_GRAPHS, default="auto", help="replay the training "
                       "step as a CUDA graph: auto (for --seeds groups on CUDA), on (also one --seed; CUDA only) or "
                       "off (docs/stacked.md)")
    group.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    group.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint (the "
                       "same param file, --set, --epochs, --seed, --subset and data)")
    group.add_argument("--force", action="store_true", help="resume even if the param file, --set, --seed, --epochs, "
                       "--subset or the data changed")
    group.add_argument("--overwrite", action="store_true", help="start a new run in an --out that holds one: its "
                       "files move into <out>/replaced_<UTC time>/ (nothing is deleted)")
    group.add_argument("--tensorboard", action="store_true", help="also log every epoch to <out>/tensorboard "
                       "(needs pip install tensorboard)")
    group.add_argument("--eval_only", action="store_true", help="no training: evaluate the model of --out (a run "
                       "dir's best_model.pt, or a .pt file) on the val and test splits, write eval.json beside it")


def check_args(parser, args):
    """The rules between flags that need no param file; a parser error (one line, exit 2) otherwise."""
    if args.eval_only:
        training_only = [f"--{name}" for name in ("param_file", "set", "epochs", "resume", "force", "overwrite",
                                                   "dry_run", "tensorboard") if getattr(args, name)]
        training_only += args.refused["trainer"]
        if training_only or not args.out:
            parser.error("--eval_only takes the params saved with the model and needs --out (a run dir or a "
                         "best_model.pt)" + (f"; drop {', '.join(training_only)}" if training_only else ""))
    elif not args.param_file:
        parser.error("the following arguments are required: --param_file")
    if args.overwrite and args.resume:
        parser.error("--overwrite starts a new run, --resume continues one: pass one of them")
    if args.seeds and (args.seed is not None or args.eval_only):
        parser.error("--seeds replaces --seed and trains; drop --seed" + (" and --eval_only" if args.eval_only else ""))
    if args.seeds and len(args.seeds) < 2:
        parser.error(f"--seeds trains a group of 2 or more seeds, got {args.seeds}; for one, use --seed")
    if args.steps and args.epochs:
        parser.error("--steps and --epochs both set the round-robin run's length: pass one of them")
    args.seeds = args.seeds or [args.seed or 0]
    args.seed = args.seeds[0]


def trainer_of(raw):
    """The trainer of the param file whose JSON object is ``raw``: ``round_robin`` for the data sets of its schema
    (``"dataset": "rotated_mnist"``), else ``trainer`` (the Table 1 trainer; its checker names a bad ``dataset``)."""
    return "round_robin" if raw.get("dataset") in ROUND_ROBIN_DATASETS else "trainer"


def check_flags(args, raw, name):
    """ParamError (one line: the file, its key, the flags that trainer takes) when ``args`` gives a flag that only
    the other trainer takes."""
    if args.refused[name]:
        dataset = json.dumps(raw.get("dataset", config.SCHEMA["dataset"][1]))
        raise config.ParamError(f"{args.param_file}: key 'dataset' is {dataset} ({TRAINERS[name][0]}), which takes "
                                f"no {', '.join(args.refused[name])}; allowed: {', '.join(args.takes[name])}")


def start(args):
    """Evaluates (``--eval_only``) or reads the param file, once, and trains with the trainer it names."""
    if args.eval_only:
        return evaluate_only(args)
    raw = config.read_param_file(args.param_file)
    name = trainer_of(raw)
    check_flags(args, raw, name)
    return (round_robin.run if name == "round_robin" else trainer.run)(args, raw)


def main(argv=None):
    allocator.tune_malloc()  # large buffers stay in the heap between steps (runtime/allocator.py)
    args = parse_args(argv)
    args.command = command_line(Path(__file__).name, argv)
    code = exit_code(start, args)
    distributed.shutdown()  # the ranks end together: every error above is raised on all of them (runtime/distributed.py)
    return code


if __name__ == "__main__":
    distributed.exit_process(main())
