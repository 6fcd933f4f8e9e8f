"""Adding a task to a trained ControlNet (paper §4.5 "Adding Tasks", Table 4).

    python -m experiments.table4_add_task --param_file params/mmnist_9digits_byref_controlnet.json --epochs 100 --add_epochs 20

Setting 9 digits by reference: task d is "the digit right of digit d" (label -1 where d is absent, repeated or
in the last column). Two phases, as in the paper:

1. ControlNet is built with 9 tasks and trained on the by-reference tasks 0-8 only (task 9 is masked out by
   keeping label columns 0..8), with the training script's own functions and protocol: the param file's
   optimiser, lr, batch and lr schedule, one task drawn per image, the best-validation epoch kept.
2. The task embedding is extended by one task and only that task's embedding is trained, every other weight
   frozen, on the training images where task 9 is valid. ControlNet's embedding is ``emb = Linear(T, 320)``
   on the one-hot task: task t's embedding is column t of ``emb.weight`` plus the shared ``emb.bias``. The
   9 trained columns and the bias become buffers and the new column is the only parameter, so that no
   optimiser (Adam's moments, weight decay) can move anything else. The new column is initialised as
   ``nn.Linear(10, 320)`` initialises its weights (uniform +-1/sqrt(10)), from the run seed.

Reported on the test split (%, mean over tasks as in Table 2): the existing tasks 0-8 before and after phase 2
(both evaluated the same way, one task per pass, so their predictions are bitwise identical), and the new task
with its embedding at initialisation ("before") and after phase 2, at its best-validation epoch.

Flags (no param file of its own): --param_file (a 9digits_byref controlnet file: optimiser, lr, batch, lr
schedule of phase 1; phase 2 uses its optimiser and batch), --epochs (phase 1, default the param file's),
--add_epochs (phase 2, default 20), --add_lr (phase 2's constant lr, default 1e-3), --phase1_model (skip phase 1
and start from the phase1_model.pt of an earlier run), --seed, --subset, --device, --data_root, --out,
--overwrite (an --out that holds a run is refused unless given; then its files move into <out>/replaced_<UTC
time>/). A bad flag or param file is one line on stderr with the allowed values, exit code 2.

Outputs in --out (default runs/add_task): results.json (command, commit, device, seed, both phases' epochs,
subset, the four numbers and the paper's), metrics.jsonl (one line per epoch of either phase), phase1_model.pt
(the 9-task model: best_model.pt's format plus its phase 1 record) and extended_model.pt (a plain 10-task
ControlNet state dict, in best_model.pt's format).
"""
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import build_model
from models.hooks import TrainingHooks
from runtime import files
from runtime.files import REPO
from training import checkpoint, cli, config
from training.cli import (
    ArgumentParser, RunError, exit_code, non_negative_int, positive_float, positive_int, resolve_device)
from training.data import MEMORY_FORMATS, load_data
from training.evaluate import eval_rows, evaluate
from training.loop import train_epoch
from training.optim import lr_factor, make_optimizer
from training.provenance import describe_device, git_commit
from training.run_dir import log, prepare_output_dir, write
from training.trainer import nonfinite_message

SETTING, METHOD = "9digits_byref", "controlnet"
NEW_TASK = 9  # the by-reference task of digit 9, as in the paper
EXISTING = list(range(NEW_TASK))


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--param_file", default="params/mmnist_9digits_byref_controlnet.json",
                        help="a 9digits_byref controlnet param file (phase 1's optimiser, lr, batch, schedule)")
    parser.add_argument("--epochs", type=positive_int, help="phase 1 epochs (default: the param file's)")
    parser.add_argument("--add_epochs", type=positive_int, default=20, help="phase 2 epochs (default 20)")
    parser.add_argument("--add_lr", type=positive_float, default=1e-3, help="phase 2 learning rate (default 1e-3)")
    parser.add_argument("--phase1_model", help="skip phase 1: the phase1_model.pt of an earlier experiments/table4_add_task.py run")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="run seed: initialisation, order, tasks")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--subset", type=positive_int, help="use only N training and N/5 val/test images")
    parser.add_argument("--data_root", help="data directory (default $MTL_DATA_ROOT or ./data)")
    parser.add_argument("--out", default=str(REPO / "runs" / "add_task"), help="output dir (default runs/add_task)")
    parser.add_argument("--overwrite", action="store_true", help="start again in an --out that holds a run: its "
                        "files move into <out>/replaced_<UTC time>/ (nothing is deleted)")
    return parser.parse_args(argv)


def checked(trained, epoch, params, out):
    """The mean loss of a trained epoch (``training.loop.Epoch``); RunError (one line) at its first non-finite loss."""
    if trained.bad is not None:
        raise RunError(nonfinite_message(trained.bad, epoch, params, out, {"epoch": 0}))
    return trained.loss


class AddedTaskEmbedding(nn.Module):
    """ControlNet's ``emb`` (Linear(T, 320) on the one-hot task) with task T appended. The T trained columns
    and the bias are buffers, the new task's column ``new_weight`` [320] is the only parameter; ``weight`` is
    the [320, T+1] matrix, so that ``ControlNet.task_embedding`` works unchanged."""

    def __init__(self, emb, new_weight):
        super().__init__()
        self.register_buffer("trained_weight", emb.weight.detach().clone())
        self.register_buffer("bias", emb.bias.detach().clone())
        self.new_weight = nn.Parameter(new_weight)

    @property
    def weight(self):
        return torch.cat([self.trained_weight, self.new_weight.unsqueeze(1)], dim=1)

    def forward(self, one_hot):
        return F.linear(one_hot, self.weight, self.bias)


def add_task(model, seed):
    """Phase 2's model: ``model`` (trained, T tasks) with task T added; every other parameter frozen."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    fan_in = model.num_tasks + 1
    generator = torch.Generator().manual_seed(seed)
    new_weight = torch.empty(model.emb.out_features).uniform_(-fan_in ** -0.5, fan_in ** -0.5, generator=generator)
    model.emb = AddedTaskEmbedding(model.emb, new_weight.to(model.emb.weight.device))
    model.num_tasks = fan_in
    return model


def plain_state_dict(model):
    """The extended model's state as a plain ControlNet with T+1 tasks (``emb.weight`` [320, T+1], ``emb.bias``)."""
    state = {key: value for key, value in model.state_dict().items() if not key.startswith("emb.")}
    state["emb.weight"], state["emb.bias"] = model.emb.weight.detach().clone(), model.emb.bias.clone()
    return state


class SelectedTasks(TrainingHooks, nn.Module):
    """A single-branch model seen through some of its tasks (task i here is ``tasks[i]`` of the model), run one
    task per pass (the model's all-task path is not used). Phase 1's 9-task model and phase 2's 10-task model
    thus evaluate tasks 0-8 on tensors of the same shapes: the same predictions, bit for bit."""

    paradigm = "single_branch"

    def __init__(self, model, tasks):
        super().__init__()
        self.model = model
        self.tasks = torch.tensor(tasks, device=next(model.parameters()).device)
        self.num_tasks = len(tasks)

    def forward(self, images, tasks):
        return self.model(images, self.tasks[tasks])


def main(argv=None):
    args = parse_args(argv)
    args.command = cli.command_line(__spec__.name, argv)
    return exit_code(run, args)


def run(args):
    """Both phases (phase 1 read from --phase1_model when given), the test accuracies of the existing tasks and of
    the added one before and after phase 2, written with the run's record to results.json and metrics.jsonl."""
    params = config.load_params(args.param_file)
    check_params(params, args.param_file)
    device = resolve_device(args.device)
    saved = read_phase1_model(args.phase1_model) if args.phase1_model else None
    out = Path(args.out)
    prepare_output_dir(out, False, args.command, args.overwrite, own_files=("phase1_model.pt", "extended_model.pt"))
    data = {split: (arrays[0].to(device), arrays[1].to(device))  # images, labels
            for split, arrays in load_data(params, args.subset, args.data_root).items()}
    log(f"add a task: {METHOD} on {SETTING}, {len(data['train'][0])} train images, {describe_device(device)}, "
        f"out {out}")
    metrics = []
    if saved is None:
        model, phase1 = train_phase1(params, args, data, device, out, metrics)
    else:
        model, phase1 = load_phase1(saved, args.phase1_model, device, params)
    existing_before = accuracy(model, EXISTING, data["test"], params, device)
    model, new_before, phase2 = train_phase2(model, params, args, data, device, out, metrics, phase1["epochs"])

    existing_after = accuracy(model, EXISTING, data["test"], params, device)
    new_after = accuracy(model, [NEW_TASK], data["test"], params, device)
    paper = json.loads((REPO / "paper" / "paper_tables.json").read_text())["table4_adding_task_9_by_ref"]
    results = {
        "command": args.command, "git_commit": git_commit(), "device": describe_device(device), "seed": args.seed,
        "setting": SETTING, "method": METHOD, "new_task": NEW_TASK, "subset": args.subset,
        "train_images": len(data["train"][0]), "test_images": len(data["test"][0]),
        "phase1": phase1,
        "phase2": phase2,
        "test_acc": {"existing_tasks": {"before": float(existing_before.nanmean()),
                                        "after": float(existing_after.nanmean())},
                     "added_task_digit_9": {"before": float(new_before[0]), "after": float(new_after[0])}},
        "existing_tasks_per_task": {"before": existing_before.tolist(), "after": existing_after.tolist()},
        "existing_tasks_identical": existing_before.tolist() == existing_after.tolist(),
        "paper": paper,
        "params": params,
    }
    write(files.write_text, "".join(json.dumps(m) + "\n" for m in metrics), out / "metrics.jsonl")
    write(files.write_json, results, out / "results.json")
    acc = results["test_acc"]
    log(f"existing tasks {acc['existing_tasks']['before']:.2f} -> {acc['existing_tasks']['after']:.2f} "
        f"(paper {paper['existing_tasks']['before']} -> {paper['existing_tasks']['after']}); added task "
        f"{acc['added_task_digit_9']['before']:.2f} -> {acc['added_task_digit_9']['after']:.2f} (paper "
        f"{paper['added_task_digit_9']['before']} -> {paper['added_task_digit_9']['after']}); {out / 'results.json'}")
    return 0


def check_params(params, path):
    """ParamError (one line, the allowed values) unless the param file at ``path`` is a held_out ControlNet file
    of 9 digits by reference."""
    if params["setting"] != SETTING or params["model"] != METHOD:
        raise config.ParamError(f"--param_file: {path} has setting '{params['setting']}' and model "
                                f"'{params['model']}'; allowed: setting {SETTING} with model {METHOD} "
                                f"(e.g. params/mmnist_9digits_byref_controlnet.json)")
    if params["protocol"] != "held_out":
        raise config.ParamError(f"{path}: key 'protocol': experiments/table4_add_task.py picks both phases' epochs on the "
                                f"validation split; allowed: held_out")


def train_phase2(model, params, args, data, device, out, metrics, first_epoch):
    """Phase 2: ``model`` extended by task 9 (add_task), whose embedding column alone is trained at the constant
    --add_lr on the training images where task 9 is valid (epochs numbered on from ``first_epoch`` for the data
    order); the column of the best validation epoch is kept and the model saved as extended_model.pt. Returns the
    model, task 9's test accuracy with its column at initialisation, and phase 2's record."""
    start = time.perf_counter()
    model = add_task(model, args.seed)
    new_before = accuracy(model, [NEW_TASK], data["test"], params, device)
    valid = data["train"][1][:, NEW_TASK] >= 0
    train = (data["train"][0][valid], data["train"][1][valid][:, [NEW_TASK]])
    optimizer = make_optimizer({**params, "lr": args.add_lr}, [model.emb.new_weight])
    best = None
    for epoch in range(args.add_epochs):
        loss = checked(train_epoch(SelectedTasks(model, [NEW_TASK]), None, optimizer, train, params, args.seed,
                                   first_epoch + epoch), first_epoch + epoch, params, out)
        val = accuracy(model, [NEW_TASK], data["val"], params, device)
        metrics.append({"phase": 2, "epoch": epoch + 1, "lr": args.add_lr, "train_loss": loss,
                        "val_acc_new_task": float(val[0])})
        if best is None or metrics[-1]["val_acc_new_task"] > best["val_acc_new_task"]:
            best = {**metrics[-1], "new_weight": model.emb.new_weight.detach().clone()}
        log(f"phase 2 epoch {epoch + 1}/{args.add_epochs}  loss {loss:.4f}  val (task {NEW_TASK}) "
            f"{metrics[-1]['val_acc_new_task']:.2f}  (best {best['val_acc_new_task']:.2f} at epoch {best['epoch']})")
    with torch.no_grad():
        model.emb.new_weight.copy_(best.pop("new_weight"))
    write(checkpoint.save, {"epoch": best["epoch"], "model": plain_state_dict(model), "params": params},
          out / "extended_model.pt")
    wall_time = time.perf_counter() - start
    return model, new_before, {
        "epochs": args.add_epochs, "best_epoch": best["epoch"], "optimizer": params["optimizer"], "lr": args.add_lr,
        "lr_schedule": "none", "batch_size": params["batch_size"], "train_images": int(valid.sum()),
        "trained_parameters": model.emb.new_weight.numel(), "val_acc_new_task": best["val_acc_new_task"],
        "wall_time_s": round(wall_time, 2)}


def train_phase1(params, args, data, device, out, metrics):
    """Phase 1: ControlNet with 9 tasks on the by-reference tasks 0-8 (label columns 0..8), with the training
    script's protocol; returns the best-validation model and its record (also saved as phase1_model.pt)."""
    start = time.perf_counter()
    epochs = args.epochs or params["epochs"]
    memory_format = MEMORY_FORMATS[params["memory_format"]]
    torch.manual_seed(args.seed)
    model = build_model(METHOD, len(EXISTING), **params["model_options"]).to(device, memory_format=memory_format)
    optimizer = make_optimizer(params, model.parameters())
    train = (data["train"][0], data["train"][1][:, EXISTING])
    best = None
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = params["lr"] * lr_factor(params, epoch, epochs)
        loss = checked(train_epoch(model, None, optimizer, train, params, args.seed, epoch), epoch, params, out)
        val = evaluate(model, data["val"][0], data["val"][1][:, EXISTING], len(EXISTING), eval_rows(params, device),
                       memory_format)
        metrics.append({"phase": 1, "epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "train_loss": loss,
                        "val_acc_mean": float(val.nanmean()), "val_acc_per_task": val.tolist()})
        if best is None or metrics[-1]["val_acc_mean"] > best["val_acc_mean"]:
            best = {**metrics[-1], "model": {k: v.clone() for k, v in model.state_dict().items()}}
        log(f"phase 1 epoch {epoch + 1}/{epochs}  loss {loss:.4f}  val (tasks 0-8) {metrics[-1]['val_acc_mean']:.2f}"
            f"  (best {best['val_acc_mean']:.2f} at epoch {best['epoch']})")
    model.load_state_dict(best.pop("model"))
    phase1 = {"epochs": epochs, "best_epoch": best["epoch"], "seed": args.seed, "subset": args.subset,
              "optimizer": params["optimizer"], "lr": params["lr"], "lr_schedule": params["lr_schedule"],
              "batch_size": params["batch_size"], "val_acc_mean": best["val_acc_mean"],
              "wall_time_s": round(time.perf_counter() - start, 2)}
    write(checkpoint.save, {"epoch": best["epoch"], "model": model.state_dict(), "params": params, "phase1": phase1},
          out / "phase1_model.pt")
    return model, phase1


def read_phase1_model(path):
    """A phase1_model.pt written by this script (checked before any data is loaded)."""
    try:
        saved = checkpoint.load(path)
    except FileNotFoundError:
        raise config.ParamError(f"--phase1_model: {path} not found; allowed: a phase1_model.pt of experiments/table4_add_task.py") \
            from None
    except (checkpoint.CheckpointError, OSError) as err:
        raise RunError(f"--phase1_model: {err}") from None
    if not isinstance(saved, dict) or not {"model", "params", "phase1"} <= set(saved) or \
            saved["params"].get("setting") != SETTING or saved["params"].get("model") != METHOD:
        raise config.ParamError(f"--phase1_model: {path} is not a phase1_model.pt of experiments/table4_add_task.py; allowed: the "
                                f"phase1_model.pt in an experiments/table4_add_task.py --out dir")
    return saved


def load_phase1(saved, path, device, params):
    """The phase 1 model and record of ``saved`` (``read_phase1_model``), in this run's memory format."""
    model = build_model(METHOD, len(EXISTING), **saved["params"]["model_options"])
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError:
        raise config.ParamError(f"--phase1_model: {path} does not hold a 9-task {METHOD}; allowed: a "
                                f"phase1_model.pt of experiments/table4_add_task.py") from None
    log(f"phase 1 model read from {path} (epoch {saved['phase1']['best_epoch']} of {saved['phase1']['epochs']})")
    return model.to(device, memory_format=MEMORY_FORMATS[params["memory_format"]]), {**saved["phase1"],
                                                                                     "model_file": str(path)}


def accuracy(model, tasks, split, params, device):
    """Test (or val) accuracy [len(tasks)] of ``tasks`` of ``model``, one task per pass (``SelectedTasks``)."""
    images, labels = split
    return evaluate(SelectedTasks(model, tasks), images, labels[:, tasks], len(tasks), eval_rows(params, device),
                    MEMORY_FORMATS[params["memory_format"]])


if __name__ == "__main__":
    cli.exit_with(main)
