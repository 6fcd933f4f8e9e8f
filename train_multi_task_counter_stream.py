"""Train a multi-task model from a JSON param file (paper §3-4, Table 1 protocol): Multi-MNIST (Table 2) on
LeNet, CLEVR, CELEB-A and CUB-200 (Tables 3 and 6a) on VGG-11, VGG-7 and ResNet-18.

    python train_multi_task_counter_stream.py --param_file=params/mmnist_counter_9tasks_params.json --epochs 100
    python train_multi_task_counter_stream.py --param_file=params/clevr_40tasks_controlnet.json --data_root DIR

The param file picks the data set and its task set, the method (model + loss weighting), the optimiser and
the schedule (see config.py). Every split is held in memory as uint8 images, moved to the device once and
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
(resume state) and best_model.pt, all written atomically, and train.log.
An output dir takes one run at a time (``run_lock``); ``--resume`` continues a run only with the arguments that
made it; ``--set KEY=VALUE`` changes one param-file key from the command line (recorded in results.json). With
--tensorboard also TensorBoard scalars in tensorboard/ (tensorboard_log.py). ``--eval_only --out RUN`` evaluates
RUN's best_model.pt (or a given .pt) without training into RUN/eval.json.

Started by torchrun (``torchrun --nproc_per_node=N train_multi_task_counter_stream.py ...``), it trains one model
with DistributedDataParallel over N processes (one GPU each, or CPU processes) with the same global batches,
task draws and gradients as one process (see runtime/distributed.py); rank 0 writes the outputs.
"""
import argparse
import hashlib
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
from runtime import files
import config
from runtime import distributed
import gumbel_experiment
import losses
from provenance import describe_device, git_commit
from runtime.files import REPO
import run_lock
import tensorboard_log
from loaders import LOADERS, NUM_TASKS
from loaders.image_sets import MissingDatasetError
from loaders.mnist import MNISTUnavailable
from metrics import SELECTIONS, TaskAccuracy, select_record
from models import LOCATION_HEAD_MODELS, TD_MAP_MODELS, build_model, count_parameters, unit_counts
from models.gumbel_matrix import add_budget_gradient, allocation_matrix, router_parameters, set_temperature, \
    temperature_schedule
from weighting import build_weighting

MNIST_STATS = (LOADERS["multi_mnist"].mean, LOADERS["multi_mnist"].std)
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
# the forward keyword that returns a model's localisation output along with its logits
LOCATION_OUTPUT = {**{name: "with_td_map" for name in TD_MAP_MODELS},
                   **{name: "with_location" for name in LOCATION_HEAD_MODELS}}


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--param_file", help="JSON param file (see params/ and docs/params.md); required unless "
                        "--eval_only")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one param-file key, repeatable; VALUE is read as JSON, a dotted KEY sets one "
                             "entry of a dict key (e.g. --set lr=0.01 --set weighting_options.alpha=1.0)")
    parser.add_argument("--epochs", type=positive_int, help="training epochs (default: the param file's, else 100)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="run seed: initialisation, order, tasks")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--out", help="output dir (default runs/<exp_id>/seed<k>)")
    parser.add_argument("--subset", type=positive_int, help="use only N training and N/5 val/test images (smoke runs)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint (the "
                        "same param file, --set, --epochs, --seed, --subset and data)")
    parser.add_argument("--force", action="store_true", help="resume even if the param file, --set, --seed, --epochs, "
                        "--subset or the data changed")
    parser.add_argument("--data_root", help="data directory (default: the param data_root, else for Multi-MNIST and "
                        "CLEVR-like $MTL_DATA_ROOT or ./data, for CLEVR, CELEB-A, CUB-200 $MTL_CLEVR_ROOT, "
                        "$MTL_CELEBA_ROOT, $MTL_CUB_ROOT)")
    parser.add_argument("--dry_run", action="store_true", help="build the model, print its parameter counts, exit")
    parser.add_argument("--tensorboard", action="store_true", help="also log every epoch to <out>/tensorboard "
                        "(needs pip install tensorboard)")
    parser.add_argument("--eval_only", action="store_true", help="no training: evaluate the model of --out (a run "
                        "dir's best_model.pt, or a .pt file) on the val and test splits, write eval.json beside it")
    args = parser.parse_args(argv)
    if args.eval_only:
        training_only = [f"--{name}" for name in ("param_file", "set", "epochs", "resume", "force", "dry_run",
                                                   "tensorboard") if getattr(args, name)]
        if training_only or not args.out:
            parser.error("--eval_only takes the params saved with the model and needs --out (a run dir or a "
                         "best_model.pt)" + (f"; drop {', '.join(training_only)}" if training_only else ""))
    elif not args.param_file:
        parser.error("the following arguments are required: --param_file")
    return args


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")


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


def main(argv=None):
    if gumbel_experiment.handles(sys.argv[1:] if argv is None else argv):  # Maziarz et al.'s MNIST protocol
        return gumbel_experiment.main(argv, prog=Path(__file__).name)
    args = parse_args(argv)
    args.command = shlex.join(["python", Path(__file__).name] + [str(a) for a in (sys.argv[1:] if argv is None else argv)])
    code = exit_code(evaluate_only if args.eval_only else run, args)
    distributed.shutdown()  # the ranks end together: every error above is raised on all of them (runtime/distributed.py)
    return code


def exit_code(run, args):
    """``run(args)``'s exit code; a user mistake (ParamError) or a busy output dir is one line on stderr and code 2,
    a fault during the run (RunError) one line and code 1, Ctrl-C one line and code 130. Shared by the scripts
    built on this one."""
    try:
        return run(args)
    except (config.ParamError, run_lock.RunDirBusy) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Interrupted as err:
        print(f"\ninterrupted: {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted; every file written so far is complete (all writes are atomic)", file=sys.stderr)
        return 130


class RunError(RuntimeError):
    """A fault during the run (non-finite loss, failing write): reported as one line, exit code 1."""


class Interrupted(RuntimeError):
    """Ctrl-C during training: one line saying where the run stands and how to continue it, exit code 130."""


def interrupted_message(out, epoch, epochs, command):
    """Where an interrupted run stands: the epoch reached, the last checkpoint, the command that continues it."""
    if epoch == 0:
        kept = "no epoch finished, so no checkpoint was written; run the same command to start again"
    else:
        resume = command if " --resume" in f"{command} " else f"{command} --resume"
        kept = f"the last checkpoint is {out / 'checkpoint.pt'}; continue with: {resume}"
    return f"stopped in epoch {epoch + 1} of {epochs} ({epoch} finished); {kept}"


def run(args):
    params = config.load_params(args.param_file, args.set)
    epochs = args.epochs or params["epochs"]
    num_tasks = NUM_TASKS[params["setting"]]
    if args.dry_run:
        with torch.device("meta"):  # counts only: no memory (uniform scaling on 1645 CLEVR tasks has 12G parameters)
            model = build_model(params["model"], num_tasks, **config.model_kwargs(params))
        print(json.dumps(parameter_counts(params, model)))
        return 0
    summary_writer = tensorboard_log.writer_class() if args.tensorboard else None  # missing package: stop now
    device = resolve_device(args.device)
    if distributed.launched():
        distributed.init(device)
    out = Path(args.out or REPO / "runs" / params["exp_id"] / f"seed{args.seed}")
    distributed.on_main(prepare_output_dir, out, args.resume, args.command)
    try:
        return train(args, params, epochs, device, out, summary_writer)
    finally:
        LOG_FILES.clear()
        distributed.on_main(run_lock.release, out)


def train(args, params, epochs, device, out, summary_writer=None):
    """The run in ``out`` (locked by this process): build, resume, train, evaluate, write."""
    num_tasks = NUM_TASKS[params["setting"]]

    torch.manual_seed(args.seed)
    model = build_model(params["model"], num_tasks, **config.model_kwargs(params))
    model = model.to(device, memory_format=MEMORY_FORMATS[params["memory_format"]])
    rows = eval_rows(params, device)
    stats = (LOADERS[params["dataset"]].mean, LOADERS[params["dataset"]].std)
    pairs = params["dataset"] != "multi_mnist"  # evaluate only the defined (image, task) pairs (see evaluate)
    weighting = None
    if params["weighting"] is not None:
        weighting = build_weighting(params["weighting"], num_tasks, params["weighting_options"]).to(device)
    optimizer = make_optimizer(params, parameter_groups(params, model, weighting))

    state = {"epoch": 0, "history": [], "best": None, "wall_time_s": 0.0}
    saved = distributed.on_main(read_checkpoint, out / "checkpoint.pt", params, args, epochs) if args.resume else None
    if saved is not None and saved["epoch"] >= epochs and (out / "results.json").exists():
        log(f"{out} holds a finished run ({saved['epoch']} of {epochs} epochs); nothing to do, nothing changed")
        return 0
    distributed.on_main(open_log, out)
    if saved is not None:
        state = resume(saved, out / "checkpoint.pt", params, model, weighting, optimizer)
    trained = distributed.wrap(model, device)  # the forward whose backward averages the gradients over the ranks

    splits = distributed.local_main_first(load_data, params, args.subset, args.data_root or params["data_root"])
    fingerprint = data_fingerprint(splits)
    if saved is not None and saved.get("data_fingerprint", fingerprint) != fingerprint and not args.force:
        raise config.ParamError(f"--resume: {out / 'checkpoint.pt'} was trained on other data (fingerprint "
                                f"{saved['data_fingerprint']}, now {fingerprint}: another --data_root or data files); "
                                f"pass --force to resume anyway, or choose another --out")
    state["data_fingerprint"] = fingerprint
    data = {split: (images.to(device), labels.to(device)) for split, (images, labels, _) in splits.items()}
    locations = splits["train"][2].to(device) if params["spatial_loss_weight"] > 0 else None
    info = {"command": args.command,
            "git_commit": git_commit(), "device": describe_device(device), "world_size": distributed.world_size(),
            "seed": args.seed, "epochs": epochs, "method": params["method"], "setting": params["setting"],
            "subset": args.subset, "overrides": args.set, "data_fingerprint": fingerprint,
            "protocol": params["protocol"], **parameter_counts(params, model)}
    processes = f" x {info['world_size']} processes" if distributed.is_distributed() else ""
    log(f"{params['exp_id']}: {params['method']} on {params['setting']}, {info['num_params']} params "
        f"(x{info['params_x']:.3f}), {len(data['train'][0])} train images, {info['device']}{processes}, out {out}")
    log(f"{epochs} epochs from epoch {state['epoch'] + 1}, {params['optimizer']} lr {params['lr']:g}, "
        f"batch {params['batch_size']}, {describe_schedule(params, epochs)}, seed {args.seed}"
        + (f", overrides: {' '.join(args.set)}" if args.set else ""))

    board = tensorboard_log.open_writer(summary_writer, out, state["epoch"]) \
        if summary_writer and distributed.is_main() else None
    try:
        for epoch in range(state["epoch"], epochs):
            train_one(epoch, epochs, trained, model, weighting, optimizer, data, params, args, out, state, stats,
                      locations, rows, pairs, num_tasks)
            if board:
                tensorboard_log.log_epoch(board, state["history"][-1])
    except KeyboardInterrupt:
        raise Interrupted(interrupted_message(out, state["epoch"], epochs, args.command)) from None
    finally:
        if board:
            board.close()

    results = {**info, **reported_figures(state["history"], KEPT_MODEL[params["protocol"]]),
               **({"active_fraction_per_task": state["best"]["active_fraction_per_task"]}
                  if "active_fraction_per_task" in state["best"] else {}),
               "wall_time_s": round(state["wall_time_s"], 2), "params": params}
    distributed.on_main(write, files.write_json, results, out / "results.json")
    at_val = "none at a best-validation epoch (protocol authors: no validation split)"
    if results["best_epoch"] is not None:
        at_val = f"at the best-validation epoch {results['best_epoch']}: {results['test_acc_mean']:.2f}"
    log(f"test accuracy {at_val}; at the best test epoch {results['best_test_epoch']} (optimistic): "
        f"{results['test_acc_mean_best_test']:.2f}; at the last epoch: {results['test_acc_mean_last']:.2f}; "
        f"best_model.pt: epoch {results['best_model_epoch']} ({results['best_model_selection']}); "
        f"results in {out / 'results.json'}")
    return 0


def train_one(epoch, epochs, trained, model, weighting, optimizer, data, params, args, out, state, stats, locations,
              rows, pairs, num_tasks):
    """Trains and evaluates epoch ``epoch`` (0-based), records it in ``state`` and writes the epoch's files."""
    start = time.perf_counter()
    for group, base_lr in zip(optimizer.param_groups, base_learning_rates(params)):
        group["lr"] = base_lr * lr_factor(params, epoch, epochs)
    train_loss = train_epoch(trained, weighting, optimizer, data["train"], params, args.seed, epoch, out, state,
                             stats, locations)
    if weighting is not None:
        weighting.after_epoch()
    record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "train_loss": train_loss}
    evaluated = (epoch + 1) % params["eval_every"] == 0 or epoch + 1 == epochs
    if evaluated:
        for split in ("val", "test"):
            if split not in data:  # no val split under the authors' protocol
                continue
            accuracy, loss = evaluate(model, *data[split], num_tasks, rows, MEMORY_FORMATS[params["memory_format"]],
                                      stats, pairs, with_loss=True)
            record.update({f"{split}_acc_mean": float(accuracy.nanmean()), f"{split}_loss": loss,
                           f"{split}_acc_per_task": accuracy.tolist()})
    seconds = time.perf_counter() - start
    state["wall_time_s"] += seconds
    record.update({"epoch_time_s": round(seconds, 3), "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    if weighting is not None:
        record["task_weights"] = weighting.weights().detach().cpu().tolist()
    if router_parameters(model):
        record["active_fraction_per_task"] = allocation_matrix(model).mean(dim=1).cpu().tolist()
    state["history"].append(record)
    kept = SELECTIONS[KEPT_MODEL[params["protocol"]]]  # the accuracy that picks best_model.pt
    best = evaluated and (state["best"] is None or record[kept] > state["best"][kept])
    if best:
        state["best"] = record
    state["epoch"] = epoch + 1
    distributed.on_main(save_epoch, out, model, weighting, optimizer, params, args, epochs, state, best)
    scores = f"(evaluated every {params['eval_every']} epochs)"
    if evaluated:
        now = "  ".join(f"{split} {record[f'{split}_acc_mean']:.2f}" for split in ("val", "test") if split in data)
        scores = f"{now}  (best {kept.split('_')[0]} {state['best'][kept]:.2f} at epoch {state['best']['epoch']})"
    log(f"epoch {epoch + 1}/{epochs}  loss {train_loss:.4f}  {scores}  {seconds:.1f}s")


# protocol -> the selection whose epoch best_model.pt keeps: the held-out validation split, or (the authors' released
# script, TD_MultiTask train_multi_task_counter_stream.py: `_model_best` by accuracy on the test split) the test split.
KEPT_MODEL = {"held_out": "best_val", "authors": "best_test"}


def reported_figures(history, kept):
    """results.json's three test figures from the epoch records: at the best-validation epoch (``best_epoch``,
    ``test_acc_mean``, ...; null without a validation split), at the best test epoch (``test_acc_mean_best_test``:
    the authors' selection, optimistic) and at the last epoch (``test_acc_mean_last``); and which one best_model.pt
    holds (``kept``)."""
    val, test, last = (select_record(history, selection) for selection in ("best_val", "best_test", "last"))
    at_val = {key: None if val is None else val[key]
              for key in ("epoch", "val_acc_mean", "test_acc_mean", "test_acc_per_task", "val_acc_per_task")}
    return {"best_epoch": at_val.pop("epoch"), **at_val,
            "best_test_epoch": test["epoch"], "test_acc_mean_best_test": test["test_acc_mean"],
            "test_acc_per_task_best_test": test["test_acc_per_task"],
            "last_epoch": last["epoch"], "test_acc_mean_last": last["test_acc_mean"],
            "test_acc_per_task_last": last["test_acc_per_task"],
            "best_model_selection": kept, "best_model_epoch": {"best_val": val, "best_test": test}[kept]["epoch"]}


def evaluate_only(args):
    """``--eval_only``: per-task accuracy (percent) of a saved model on the validation and test splits, without
    training; printed and written to ``eval.json`` beside the model (results.json is left alone). The params are
    the ones saved with the model; the data subset is --subset, else the run's (its results.json)."""
    if distributed.launched():
        raise config.ParamError("--eval_only runs in one process; start it with python, not torchrun")
    model_file = Path(args.out) / "best_model.pt" if Path(args.out).is_dir() else Path(args.out)
    if not model_file.is_file():
        raise config.ParamError(f"--out: {model_file} not found; allowed: a run dir of this script holding "
                                f"best_model.pt, or a best_model.pt / checkpoint.pt")
    try:
        saved = checkpoint.load(model_file)
    except (checkpoint.CheckpointError, OSError) as err:
        raise RunError(f"--eval_only: {err}") from None
    if not isinstance(saved, dict) or not {"model", "params"} <= set(saved):
        raise config.ParamError(f"--out: {model_file} is not a model of this script (it lacks 'model' and 'params'); "
                                f"allowed: a best_model.pt or checkpoint.pt of train_multi_task_counter_stream.py")
    params = config.validate(saved["params"], str(model_file))
    subset = args.subset or run_subset(model_file.parent / "results.json")
    device = resolve_device(args.device)
    num_tasks = NUM_TASKS[params["setting"]]
    memory_format = MEMORY_FORMATS[params["memory_format"]]
    model = build_model(params["model"], num_tasks, **config.model_kwargs(params))
    model = model.to(device, memory_format=memory_format)
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError as err:
        raise RunError(f"--eval_only: {model_file} does not fit model '{params['model']}' "
                       f"({' '.join(str(err).split())[:200]})") from None
    splits = load_data(params, subset, args.data_root or params["data_root"])
    stats = (LOADERS[params["dataset"]].mean, LOADERS[params["dataset"]].std)
    result = {"command": args.command, "git_commit": git_commit(), "device": describe_device(device),
              "model_file": str(model_file), "epoch": saved.get("epoch"), "method": params["method"],
              "setting": params["setting"], "subset": subset}
    for split in ("val", "test"):
        if split in splits:
            images, labels, _ = splits[split]
            accuracy = evaluate(model, images.to(device), labels.to(device), num_tasks, eval_rows(params, device),
                                memory_format, stats, params["dataset"] != "multi_mnist")
            result.update({f"{split}_acc_mean": float(accuracy.nanmean()), f"{split}_acc_per_task": accuracy.tolist()})
            log(f"{split} accuracy {result[f'{split}_acc_mean']:.2f}, per task "
                f"{', '.join(f'{a:.2f}' for a in result[f'{split}_acc_per_task'])}")
    write(files.write_json, {**result, "params": params}, model_file.parent / "eval.json")
    log(f"{model_file} (epoch {result['epoch']}): evaluated without training; written to "
        f"{model_file.parent / 'eval.json'}")
    return 0


def run_subset(path):
    """The --subset that the run of ``path`` (its results.json) trained with; None without a results.json."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["subset"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RunError(f"--eval_only: cannot read the run's subset from {path} ({type(err).__name__}: {err}); "
                       f"fix or move it, or pass --subset N") from None


def data_fingerprint(splits):
    """A short hash of every split's images and labels: ``--resume`` refuses other data than the run's."""
    digest = hashlib.sha256()
    for split in sorted(splits):
        for array in splits[split][:2]:
            digest.update(f"{split}{tuple(array.shape)}{array.dtype}".encode())
            digest.update(array.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def save_epoch(out, model, weighting, optimizer, params, args, epochs, state, best):
    """The end-of-epoch files (rank 0): best_model.pt on a new best, checkpoint.pt, metrics.jsonl."""
    if best:
        write(checkpoint.save, {"epoch": state["epoch"], "model": model.state_dict(), "params": params},
              out / "best_model.pt")
    write(checkpoint.save, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "weighting": weighting.state_dict() if weighting else {}, "params": params,
                            "seed": args.seed, "epochs": epochs, "subset": args.subset, **state}, out / "checkpoint.pt")
    write(files.write_text, "".join(json.dumps(r) + "\n" for r in state["history"]), out / "metrics.jsonl")


LOG_FILES = []  # train.log of the run in progress (rank 0)


def log(message):
    """One line on stdout and in the run's train.log, from rank 0 only."""
    if distributed.is_main():
        tqdm.write(message)
        for path in LOG_FILES:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} {message}\n")


def open_log(out):
    """From now on ``log`` also appends to ``out``/train.log (a resumed run appends to the same file)."""
    LOG_FILES[:] = [out / "train.log"]


def load_data(params, subset, root):
    """{split: (images, labels, locations)} in memory (``loaders.LOADERS``), cut to ``subset``."""
    try:
        data = LOADERS[params["dataset"]].load(params["setting"], params, root)
    except (MissingDatasetError, MNISTUnavailable, ValueError) as err:  # ValueError: a malformed data file
        raise RunError(" ".join(str(err).split())) from None
    except OSError as err:
        raise RunError(f"cannot read or write the data cache: {err}; choose another data root with --data_root") \
            from None
    found, expected = data["train"][1].shape[1], NUM_TASKS[params["setting"]]
    if found != expected:
        raise RunError(f"the {params['dataset']} data has {found} tasks, setting '{params['setting']}' has {expected}; "
                       f"check the data set's files (--data_root)")
    if subset:
        sizes = {"train": subset, "val": max(subset // 5, 1), "test": max(subset // 5, 1)}
        data = {split: tuple(None if array is None else array[:sizes[split]] for array in arrays)
                for split, arrays in data.items()}
    return data


def normalize(images, memory_format=torch.contiguous_format, stats=MNIST_STATS):
    """uint8 images on the device -> float [B, C, H, W] with the data set's per-channel ``stats`` (mean, std), as
    ToTensor + Normalize: [B, H, W] grey (Multi-MNIST, C = 1) or [B, 3, H, W] RGB."""
    if images.dim() == 3:
        (mean,), (std,) = stats
        x = images.unsqueeze(1).float().div_(255.0).sub_(mean).div_(std)
    else:
        mean, std = (torch.tensor(value, device=images.device).view(1, -1, 1, 1) for value in stats)
        x = images.float().div_(255.0).sub_(mean).div_(std)
    return x.contiguous(memory_format=memory_format)


def epoch_seed(seed, epoch):
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def epoch_generator(seed, epoch):
    """The randomness of one epoch (order, task draws) depends only on (seed, epoch): resuming is exact."""
    return torch.Generator().manual_seed(epoch_seed(seed, epoch))


def draw_tasks(valid, generator):
    """One task per image, uniform among the tasks valid for it (all tasks, except by reference).
    An image with no valid task gets task 0, whose label -1 the loss ignores."""
    scores = torch.rand(valid.shape, generator=generator).masked_fill_(~valid, -1.0)
    return scores.argmax(dim=1)


def train_epoch(model, weighting, optimizer, train, params, seed, epoch, out, state, stats=MNIST_STATS,
                locations=None):
    """One epoch; ``model`` is the DDP wrapper in a distributed run, where each rank trains on its part of every
    global batch and the logged losses are averaged over the ranks: the global batch's, as in one process.
    ``locations`` (float [N, T, 2]) adds the localisation loss ('loc', ``losses.location_loss``), weighted by
    ``spatial_loss_weight``: on ControlNet's TD map, or on a baseline's location head."""
    images, labels = train
    device, n, batch_size = images.device, len(images), params["batch_size"]
    memory_format = MEMORY_FORMATS[params["memory_format"]]
    generator = epoch_generator(seed, epoch)
    torch.manual_seed(epoch_seed(seed, epoch))  # the model's own draws (Gumbel samples): also a function of (seed, epoch)
    order = torch.randperm(n, generator=generator)
    tasks = draw_tasks((labels >= 0).cpu(), generator).to(device) if weighting is None else None
    order = order.to(device)
    model.train()
    loss_sum = torch.zeros((), device=device)
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)
    bad_losses = None
    steps = range(0, n, batch_size)
    routed, routing = distributed.unwrap(model), params.get("router_options")
    progress = tqdm(steps, desc=f"epoch {epoch + 1}", leave=False, unit="batch",
                    disable=not (distributed.is_main() and sys.stderr.isatty()))  # no bar frames in a log file
    for step, begin in enumerate(progress):
        batch = order[begin:begin + batch_size]  # the global batch, the same for any number of processes
        index = distributed.shard(batch)  # this rank's part of it
        x = normalize(images[index], memory_format, stats)
        optimizer.zero_grad(set_to_none=True)
        if routing:  # Gumbel-softmax temperature, counted in task-updates as Maziarz et al.'s mnist_train.py
            update = (epoch * len(steps) + step) * labels.shape[1]
            set_temperature(routed, temperature_schedule(update, routing["temperature_init"], routing["temperature_min"]))
        if weighting is None:
            t = tasks[index]
            divisor = loss_divisor(labels[batch, tasks[batch]])
            if locations is None:
                loss = losses.masked_cross_entropy(model(x, t), labels[index, t].long(), divisor)
            else:
                logits, where = model(x, t, **{LOCATION_OUTPUT[params["model"]]: True})
                targets = losses.LocationTargets(locations[index, t], locations[batch, tasks[batch]], x.shape[-1],
                                                 params["spatial_loss_weight"], distributed.world_size())
                loss = losses.masked_cross_entropy(logits, labels[index, t].long(), divisor) + targets.loss(where)
            loss.backward()
            task_losses = loss.detach()
        else:
            located = {}  # the 'loc' targets, passed only with 'loc' (the weightings that take them: base.Weighting)
            if locations is not None:
                located["locations"] = losses.LocationTargets(locations[index], locations[batch], x.shape[-1],
                                                              params["spatial_loss_weight"], distributed.world_size())
            task_losses = weighting.backward(model, x, labels[index].long(), loss_divisor(labels[batch]), **located)
            distributed.average_gradients(weighting.parameters())
        if routing and routing["budget_penalty"] > 0:
            add_budget_gradient(routed, routing["budget"], routing["budget_penalty"])
        task_losses = distributed.mean(task_losses)
        optimizer.step()
        if weighting is not None:
            weighting.after_step()
        step_loss = task_losses.mean()
        loss_sum += step_loss
        newly_bad = (first_bad < 0) & ~torch.isfinite(step_loss)
        first_bad = torch.where(newly_bad, step, first_bad)
        bad_losses = task_losses if bad_losses is None else torch.where(newly_bad, task_losses, bad_losses)
    if int(first_bad) >= 0:
        report_nonfinite(int(first_bad), epoch, params, order, tasks, batch_size, out, state, bad_losses)
    return float(loss_sum) / len(steps)


def loss_divisor(labels):
    """What a rank divides its summed losses by: the valid labels (per task) of the whole global batch, over the
    number of ranks. The ranks' losses then average to the global batch's loss, and so do their gradients
    (DDP's average): the same step as one process, also when the ranks' parts hold different numbers of valid
    labels (by-reference tasks)."""
    return (labels >= 0).sum(0).clamp(min=1) / distributed.world_size()


def report_nonfinite(step, epoch, params, order, tasks, batch_size, out, state, bad_losses):
    if tasks is not None:
        which = sorted(set(tasks[order[step * batch_size:(step + 1) * batch_size]].tolist()))
        where = f"tasks drawn in that batch {which}"
    else:
        values = bad_losses.tolist()
        where = f"non-finite loss of tasks {[t for t, v in enumerate(values) if not np.isfinite(v)]}, " \
                f"task losses {[float(f'{v:.4g}') for v in values]}"
    kept = f"the last good checkpoint (epoch {state['epoch']}) is {out / 'checkpoint.pt'}" if state["epoch"] else \
        "no epoch finished, so no checkpoint was written"
    raise RunError(f"non-finite loss at epoch {epoch + 1}, step {step + 1}, method '{params['method']}' ({where}); "
                   f"stopped without saving this epoch; {kept}")


@torch.inference_mode()
def evaluate(model, images, labels, num_tasks, rows, memory_format, stats=MNIST_STATS, pairs=False, with_loss=False):
    """Accuracy per task [T] (percent): every task applied to every image where it is defined (paper §3), all
    tasks of a chunk of images in one pass (``rows`` image-task pairs per pass; single-branch models see each
    image T times). With ``pairs`` (CLEVR, CELEB-A, CUB-200), single-branch models see only the pairs with a valid
    label, ``rows`` per pass, and multi-branch models ``rows`` images per pass: the same accuracies (invalid pairs
    are never counted), without the ~90% of CLEVR's by-reference pairs that are undefined.
    In a distributed run each rank evaluates its part of the images and the counts are summed over the ranks.
    ``with_loss``: also the cross-entropy, mean over each task's valid pairs, then over tasks (a float)."""
    model.eval()
    images, labels = distributed.shard(images), distributed.shard(labels)
    accuracy = TaskAccuracy(num_tasks, images.device)
    loss_sum = torch.zeros(num_tasks, dtype=torch.float64, device=images.device)
    if pairs and model.paradigm == "single_branch":
        image, task = (labels >= 0).nonzero(as_tuple=True)
        for begin in range(0, len(task), rows):
            i, t = image[begin:begin + rows], task[begin:begin + rows]
            logits, y = model(normalize(images[i], memory_format, stats), t), labels[i, t].long()
            accuracy.update_pairs(t, logits.argmax(dim=1), y)
            if with_loss:
                loss_sum.index_add_(0, t, torch.nn.functional.cross_entropy(logits.float(), y, reduction="none").double())
    else:
        per_pass = rows if pairs else max(1, rows // num_tasks)
        for begin in range(0, len(images), per_pass):
            x, y = normalize(images[begin:begin + per_pass], memory_format, stats), labels[begin:begin + per_pass]
            logits = all_task_logits(model, x, num_tasks)  # [T, B, C]
            accuracy.update(logits.argmax(dim=2), y.t())
            if with_loss:
                target = y.t().long()
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target.clamp(min=0).flatten(),
                                                         reduction="none").view_as(target)
                loss_sum += loss.where(target >= 0, 0.0).sum(dim=1).double()
    distributed.sum_(accuracy.correct)
    distributed.sum_(accuracy.count)
    if not with_loss:
        return accuracy.per_task()
    distributed.sum_(loss_sum)
    per_task_loss = (loss_sum / accuracy.count.double()).where(accuracy.count > 0, torch.nan)
    return accuracy.per_task(), float(per_task_loss.nanmean())


def eval_rows(params, device):
    """Image-task pairs per evaluation pass: the param, else 512 on CPU (larger passes are slower there) and for the
    larger backbones (their activations at 224 px), 32768 for LeNet on GPU."""
    return params["eval_batch_size"] or (512 if device.type == "cpu" or params["backbone"] != "lenet" else 32768)


def all_task_logits(model, x, num_tasks):
    """Logits of every task on every image, [T, B, C]."""
    if model.paradigm == "multi_branch":
        return model(x).transpose(0, 1)
    if hasattr(model, "forward_all_tasks"):
        return model.forward_all_tasks(x)
    tasks = torch.arange(num_tasks, device=x.device).repeat_interleave(len(x))
    return model(x.repeat(num_tasks, 1, 1, 1), tasks).view(num_tasks, len(x), -1)


SHORTEST_SCHEDULE = 7  # fewer epochs keep a constant lr (see lr_factor)


def lr_factor(params, epoch, epochs):
    """The authors' schedule: halve the lr before every 0-based epoch e with (e + 1) % int(0.3 * epochs) == 0
    (epochs 29, 59, 89 of 100), i.e. at 30/60/90% of training; at most three halvings. Runs shorter than 7 epochs
    (smoke runs) keep a constant lr: there the rule would halve before the first epoch (period 1 for 4-6 epochs;
    the original halves every epoch below 4)."""
    period = int(epochs * 0.3)
    if params["lr_schedule"] == "none" or epochs < SHORTEST_SCHEDULE:
        return 1.0
    return 0.5 ** min(3, (epoch + 1) // period)


def describe_schedule(params, epochs):
    """The schedule in words, with the (1-based) epochs that start at a halved lr, e.g. 'lr halved at epochs
    30, 60, 90'."""
    factors = [lr_factor(params, epoch, epochs) for epoch in range(epochs)]
    halved = [epoch + 1 for epoch in range(epochs) if factors[epoch] < (factors[epoch - 1] if epoch else 1.0)]
    if not halved:
        return "constant lr" + (f" (fewer than {SHORTEST_SCHEDULE} epochs)" if params["lr_schedule"] != "none" else "")
    return f"lr halved at epochs {', '.join(map(str, halved))}"


def parameter_groups(params, model, weighting):
    """The weights (and the weighting's own parameters) at ``lr``; learned allocation logits (gumbel_matrix) in a
    group of their own at ``router_options.lr`` (the original's second Adam; Adam is per parameter, so one Adam
    with two groups is the same)."""
    logits = router_parameters(model)
    weights = [p for p in model.parameters() if all(p is not q for q in logits)]
    groups = [weights + (list(weighting.parameters()) if weighting else []), logits]
    return [{"params": group, "lr": lr} for group, lr in zip(groups, base_learning_rates(params))]


def base_learning_rates(params):
    """The initial lr of each optimiser group (``parameter_groups``), before the schedule's factor."""
    return [params["lr"]] + ([params["router_options"]["lr"]] if params.get("router_options") else [])


def make_optimizer(params, groups):
    if params["optimizer"] == "Adam":
        return torch.optim.Adam(groups, lr=params["lr"])
    if params["optimizer"] == "SGD":
        return torch.optim.SGD(groups, lr=params["lr"], momentum=params["momentum"])
    return torch.optim.RMSprop(groups, lr=params["lr"])


def parameter_counts(params, model):
    """Parameters and weights (parameters without biases), also as multiples of the plain backbone: the paper's #P
    (one LeNet in Table 2; "the corresponding BU architecture" in Table 3)."""
    num_params, num_weights = count_parameters(model)
    unit_params, unit_weights = unit_counts(**config.backbone_kwargs(params))
    return {"method": params["method"], "setting": params["setting"], "num_params": num_params,
            "num_weights": num_weights, "params_x": round(num_params / unit_params, 4),
            "weights_x": round(num_weights / unit_weights, 4)}


def resolve_device(name):
    """The device of this process; under torchrun a CUDA device is cuda:LOCAL_RANK (one GPU per process)."""
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


def check_writable(out):
    """Creates ``out`` and writes a probe file into it; RunError (one line) if it cannot."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        files.write_text("ok", out / ".write_probe")
        (out / ".write_probe").unlink()
    except OSError as err:
        raise RunError(f"output dir {out} is not writable: {err.strerror or err}; choose another with --out") from None


def prepare_output_dir(out, resume, command):
    """Fails at start, not after hours of training, when the output dir is unusable or already in use; locks it
    for this process (``run_lock``: a second run into it exits 2 naming the holder)."""
    check_writable(out)
    stale = run_lock.acquire(out, command)
    if stale:
        log(f"note: {out} was left locked by a run that no longer exists ({run_lock.describe(stale)}); taken over")
    if (out / "checkpoint.pt").exists() and not resume:
        raise config.ParamError(f"--out: {out} already holds a run (checkpoint.pt); pass --resume to continue it, "
                                f"or choose another --out")
    if resume:
        for leftover in out.glob("*.tmp"):  # left by a write that a kill interrupted
            leftover.unlink()


CHECKPOINT_KEYS = {"model", "optimizer", "weighting", "params", "seed", "epochs", "epoch", "history", "best",
                   "wall_time_s"}


def read_checkpoint(path, params, args, epochs):
    """The checkpoint to resume from (None if there is none yet), checked against this run's settings."""
    if not path.exists():
        return None
    try:
        saved = checkpoint.load(path)
    except (checkpoint.CheckpointError, OSError) as err:
        raise RunError(f"cannot resume: {err}; move it away to start the run again") from None
    missing = CHECKPOINT_KEYS - set(saved) if isinstance(saved, dict) else CHECKPOINT_KEYS
    if missing:
        raise RunError(f"cannot resume: {path} is not a checkpoint of this script (it lacks "
                       f"{', '.join(sorted(missing))}); move it away to start the run again")
    before = {key: entry[1] for key, entry in config.SCHEMA.items() if entry[1] is not config.REQUIRED}
    before.update(saved["params"])  # a key added to the schema since the checkpoint was written has its default
    changed = sorted(key for key in set(params) | set(before) if params.get(key) != before.get(key))
    if saved["seed"] != args.seed:
        changed.append(f"--seed ({saved['seed']} -> {args.seed})")
    if saved["epochs"] != epochs:
        changed.append(f"--epochs ({saved['epochs']} -> {epochs}, which changes the lr schedule)")
    if saved.get("subset", args.subset) != args.subset:  # checkpoints before the subset was recorded: not checked
        changed.append(f"--subset ({saved['subset']} -> {args.subset}, which changes the data)")
    if changed and not args.force:
        raise config.ParamError(f"--resume: {path} was made with other settings ({', '.join(changed)}); "
                                f"pass --force to resume anyway, or choose another --out")
    return saved


def resume(saved, path, params, model, weighting, optimizer):
    """Loads a checkpoint (``read_checkpoint``'s) into the model, the weighting and the optimiser."""
    try:
        model.load_state_dict(saved["model"])
        if params["optimizer"] == saved["params"].get("optimizer"):
            optimizer.load_state_dict(saved["optimizer"])
        else:  # another optimiser's state does not fit (Adam needs its step counts): start it afresh
            log(f"optimizer changed to {params['optimizer']}: its state starts afresh")
        if weighting is not None:
            weighting.load_state_dict(saved["weighting"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise RunError(f"cannot resume: {path} does not fit model '{params['model']}' / weighting "
                       f"'{params['weighting']}' ({' '.join(str(err).split())[:200]}); choose another --out") from None
    log(f"resumed from {path} at epoch {saved['epoch']}")
    return {key: saved[key] for key in ("epoch", "history", "best", "wall_time_s")}


def write(writer, obj, path):
    try:
        writer(obj, path)
    except OSError as err:
        raise RunError(f"cannot write {path}: {err.strerror or err}; the previous version of that file is intact") \
            from None


if __name__ == "__main__":
    distributed.exit_process(main())
