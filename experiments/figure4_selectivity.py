"""Task selectivity of a trained single-branch model (paper §4.5 "Task Selectivity", Figure 4).

    python -m experiments.figure4_selectivity --checkpoint runs/sel/9digits_controlnet/best_model.pt

The model (a best_model.pt of train_multi_task_counter_stream.py: ControlNet, ch-mod, ch-mod extended, task
routing or the TD-only ablation, on 2, 4 or 9 digits by location) is frozen. With task t selected, BU2's final
representation is taken for every image: the 50-d output of the LeNet's ``fc`` layer after ReLU
(``LeNet.trunk``'s ``rep``, the authors' ``rep``), on which fc1 and fc2 compute the selected task's answer. It
is read by a forward pre-hook on ``model.bu`` (BU2 is the one call of ``model.bu`` per forward; BU1 uses
``bu.trunk`` and ``bu.head`` directly), which keeps BU2's input and TD gates; ``bu.trunk`` then gives ``rep``.

On the representation of each selected task t, one readout head per location l is trained (on the training
split, features standardised with the training statistics) to predict the digit at location l:
``--readout linear`` (default; Linear(50, 10)) or ``--readout mlp`` (a branch like the multi-branch heads:
Linear(50, 50), ReLU, Linear(50, 10)). A[l, t] is the test accuracy (%) of readout l with task t selected
(rows: readout location, columns: selected task, as Figure 4). The selectivity index is the paper's "ratio
between the accuracy for the selected task (above chance level) and the average accuracy of the non-selected
tasks (above chance level)", pooled over the selected tasks, with chance c = 10%:

    SI = mean_t (A[t, t] - c) / mean_{t, l != t} (A[l, t] - c)

(``per_task_index`` holds the same ratio for each selected task alone). Outputs in --out (default
runs/selectivity/<setting>_<method>/): selectivity_<readout>.json (the matrix, the index, the paper's
index, command, commit, device, seed, protocol) and selectivity_<readout>.png (the heat map). A bad flag or
checkpoint is one line on stderr with the allowed values, exit code 2.
"""
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from loaders import NUM_TASKS
from models import build_model
from models.lenet import BatchedLinear
from runtime import files
from runtime.files import REPO
from training import checkpoint, cli, config
from training.cli import (
    ArgumentParser, RunError, exit_code, non_negative_int, positive_float, positive_int, resolve_device)
from training.data import MEMORY_FORMATS, load_data, normalize
from training.evaluate import all_task_logits, eval_rows, evaluate
from training.provenance import describe_device, git_commit
from training.run_dir import log, write

CHANCE = 10.0  # percent: ten digit classes
MODELS = ("controlnet", "ch_mod", "ch_mod_extended", "task_routing", "td_only")  # BU2 = one call of model.bu
LOCATIONS = {"2digits": ["left", "right"], "4digits": ["TL", "BL", "TR", "BR"],
             "9digits": [f"r{k % 3}c{k // 3}" for k in range(9)]}  # task k = the digit at location k
PAPER_SETTINGS = {"4digits": "4_digits", "9digits": "9_digits"}
READOUTS = ("linear", "mlp")


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a best_model.pt of train_multi_task_counter_stream.py")
    parser.add_argument("--readout", default="linear", choices=READOUTS, help="readout head (default linear)")
    parser.add_argument("--readout_epochs", type=positive_int, default=20, help="readout training epochs (20)")
    parser.add_argument("--readout_lr", type=positive_float, default=1e-2, help="readout Adam lr (default 1e-2)")
    parser.add_argument("--batch_size", type=positive_int, default=512, help="readout batch size (default 512)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the readouts' init and order")
    parser.add_argument("--subset", type=positive_int, help="use only N training and N/5 test images")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--data_root", help="data directory (default $MTL_DATA_ROOT or ./data)")
    parser.add_argument("--out", help="output dir (default runs/selectivity/<setting>_<method>)")
    return parser.parse_args(argv)


def selectivity_index(matrix, chance=CHANCE):
    """``matrix`` [L, T] (readout location x selected task, %, L == T) -> (pooled index, per-task indices [T]).
    A ratio whose denominator is not above 0 (no non-selected task above chance) is inf."""
    matrix = torch.as_tensor(matrix, dtype=torch.float64)
    off_diagonal = ~torch.eye(len(matrix), dtype=torch.bool)
    above = matrix - chance
    selected = above.diagonal()
    others = (above * off_diagonal).sum(0) / off_diagonal.sum(0)
    pooled = ratio(float(selected.mean()), float(others.mean()))
    return pooled, [ratio(float(s), float(o)) for s, o in zip(selected, others)]


def ratio(numerator, denominator):
    return numerator / denominator if denominator > 0 else math.inf


@torch.inference_mode()
def bu2_representation(model, images, rows, memory_format):
    """BU2's final representation (``rep``, ReLU(fc)) of every task on every image: [T, N, hidden]. A pre-hook on
    ``model.bu`` keeps BU2's input and gates of each all-task pass; ``bu.trunk`` on them gives ``rep``."""
    model.eval()
    calls = []
    handle = model.bu.register_forward_pre_hook(lambda module, args: calls.append(args))
    reps = []
    per_pass = max(1, rows // model.num_tasks)
    try:
        for begin in range(0, len(images), per_pass):
            x = normalize(images[begin:begin + per_pass], memory_format)
            calls.clear()
            all_task_logits(model, x, model.num_tasks)
            if len(calls) != 1:
                raise RunError(f"model {type(model).__name__} called its BU2 (model.bu) {len(calls)} times in one "
                               f"pass; allowed models: {', '.join(MODELS)}")
            reps.append(model.bu.trunk(*calls[0])[0].view(model.num_tasks, len(x), -1))
    finally:
        handle.remove()
    return torch.cat(reps, dim=1)


def readout_heads(kind, num_heads, hidden):
    """``num_heads`` independent readouts [B, heads, hidden] -> [B, heads, 10], trained at once."""
    if kind == "linear":
        return BatchedLinear(num_heads, hidden, 10)
    return nn.Sequential(BatchedLinear(num_heads, hidden, hidden), nn.ReLU(), BatchedLinear(num_heads, hidden, 10))


def train_readouts(train_rep, train_labels, args):
    """One readout per (selected task t, location l) on the frozen representation ``train_rep`` [T, N, H]
    (standardised), predicting ``train_labels`` [N, L]. Returns the heads and the standardisation."""
    tasks, n, hidden = train_rep.shape
    locations = train_labels.shape[1]
    mean, std = train_rep.mean(1, keepdim=True), train_rep.std(1, keepdim=True).clamp(min=1e-6)
    features = ((train_rep - mean) / std).transpose(0, 1)  # [N, T, H]
    torch.manual_seed(args.seed)
    heads = readout_heads(args.readout, tasks * locations, hidden).to(train_rep.device)
    optimizer = torch.optim.Adam(heads.parameters(), lr=args.readout_lr)
    generator = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.readout_epochs):
        order = torch.randperm(n, generator=generator).to(train_rep.device)
        total = 0.0
        for begin in range(0, n, args.batch_size):
            batch = order[begin:begin + args.batch_size]
            x = features[batch].unsqueeze(2).expand(-1, -1, locations, -1).reshape(len(batch), tasks * locations, -1)
            y = train_labels[batch].unsqueeze(1).expand(-1, tasks, -1).reshape(len(batch), -1)
            loss = F.cross_entropy(heads(x).transpose(1, 2), y, reduction="none").mean(0).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        log(f"readout epoch {epoch + 1}/{args.readout_epochs}  loss per head {total / n / (tasks * locations):.4f}")
    return heads, mean, std


@torch.inference_mode()
def readout_accuracy(heads, mean, std, test_rep, test_labels):
    """The accuracy matrix A [L, T] (%): readout of location l with task t selected, on ``test_rep`` [T, N, H]."""
    tasks, n, _ = test_rep.shape
    locations = test_labels.shape[1]
    x = ((test_rep - mean) / std).transpose(0, 1).unsqueeze(2).expand(-1, -1, locations, -1)
    predictions = heads(x.reshape(n, tasks * locations, -1)).argmax(2).view(n, tasks, locations)
    correct = (predictions == test_labels.unsqueeze(1)).double().mean(0)  # [T, L]
    return 100.0 * correct.t().cpu()


def plot(matrix, index, names, title, path):
    """The heat map of ``matrix`` [L, T] (rows: readout location, columns: selected task), as Figure 4."""
    import matplotlib  # only here: the plot is optional and matplotlib is not a requirement

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 1.0 + 0.55 * len(names)
    figure, axes = plt.subplots(figsize=(size + 1.2, size))
    image = axes.imshow(matrix, vmin=0, vmax=100, cmap="viridis")
    for row in range(len(names)):
        for col in range(len(names)):
            value = float(matrix[row, col])
            axes.text(col, row, f"{value:.0f}", ha="center", va="center", fontsize=8,
                      color="black" if value > 60 else "white")
    axes.set_xticks(range(len(names)), names, rotation=90 if len(names) > 4 else 0)
    axes.set_yticks(range(len(names)), names)
    axes.set_xlabel("selected task (location)")
    axes.set_ylabel("readout location")
    index_text = "inf" if math.isinf(index) else f"{index:.2f}"
    axes.set_title(f"{title}\nselectivity index {index_text}", fontsize=9)
    figure.colorbar(image, ax=axes, label="test accuracy (%)")
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=120)
    except OSError as err:
        raise RunError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        plt.close(figure)


def load_model(path):
    """The model of a best_model.pt (or checkpoint.pt) of the training script, and the file's contents; a
    ParamError if it is not one of a supported model and setting."""
    try:
        saved = checkpoint.load(path)
    except FileNotFoundError:
        raise config.ParamError(f"--checkpoint: {path} not found; allowed: a best_model.pt of "
                                f"train_multi_task_counter_stream.py") from None
    except (checkpoint.CheckpointError, OSError) as err:
        raise RunError(f"--checkpoint: {err}") from None
    if not isinstance(saved, dict) or not {"model", "params"} <= set(saved):
        raise config.ParamError(f"--checkpoint: {path} is not a model of train_multi_task_counter_stream.py (no "
                                f"'model' and 'params'); allowed: a best_model.pt in its --out dir")
    params = saved["params"]
    if params.get("model") not in MODELS or params.get("setting") not in LOCATIONS:
        raise config.ParamError(f"--checkpoint: {path} holds model '{params.get('model')}' on "
                                f"'{params.get('setting')}'; allowed: models {', '.join(MODELS)} on settings "
                                f"{', '.join(LOCATIONS)} (tasks by location)")
    model = build_model(params["model"], NUM_TASKS[params["setting"]], **params["model_options"])
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError:
        raise config.ParamError(f"--checkpoint: {path} does not fit model '{params['model']}' with "
                                f"{NUM_TASKS[params['setting']]} tasks; allowed: a best_model.pt of the training "
                                f"script") from None
    return model, saved


def main(argv=None):
    args = parse_args(argv)
    args.command = cli.command_line(__spec__.name, argv)
    return exit_code(run, args)


def run(args):
    """The readout matrix and selectivity index of the checkpoint's model on its data set, written with the run's
    record to selectivity_<readout>.json and drawn in selectivity_<readout>.png in --out."""
    model, saved = load_model(args.checkpoint)
    params = saved["params"]
    setting, method = params["setting"], params["method"]
    device = resolve_device(args.device)
    out = make_output_dir(Path(args.out or REPO / "runs" / "selectivity" / f"{setting}_{method}"))
    memory_format = MEMORY_FORMATS[params["memory_format"]]
    model = model.to(device, memory_format=memory_format)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    data = load_data(params, args.subset, args.data_root)
    (train_images, train_labels), (test_images, test_labels) = (
        (data[split][0].to(device), data[split][1].to(device)) for split in ("train", "test"))  # images, labels
    rows = eval_rows(params, device)
    log(f"selectivity: {method} on {setting} from {args.checkpoint}, {len(train_images)} train / {len(test_images)} "
        f"test images, {args.readout} readouts, {describe_device(device)}, out {out}")

    start = time.perf_counter()
    model_acc, matrix, rep_size = readout_matrix(model, (train_images, train_labels), (test_images, test_labels),
                                                 rows, memory_format, args)
    index, per_task = selectivity_index(matrix)
    wall_time = time.perf_counter() - start

    names = LOCATIONS[setting]
    paper = json.loads((REPO / "paper" / "paper_tables.json").read_text())["figure4_selectivity_index"]
    trained = read_training_results(Path(args.checkpoint).parent / "results.json")
    results = {
        "command": args.command, "git_commit": git_commit(), "device": describe_device(device),
        "checkpoint": str(args.checkpoint), "checkpoint_epoch": saved.get("epoch"), "training": trained,
        "setting": setting, "method": method, "model": params["model"], "subset": args.subset,
        "train_images": len(train_images), "test_images": len(test_images),
        "representation": f"BU2 rep = ReLU(fc), {rep_size}-d, the input of fc1",
        "readout": {"kind": args.readout, "epochs": args.readout_epochs, "lr": args.readout_lr,
                    "optimizer": "Adam", "batch_size": args.batch_size, "seed": args.seed,
                    "features": "standardised with the training split's mean and std"},
        "locations": names,
        "matrix": {"rows": "readout location", "columns": "selected task", "test_acc": matrix.tolist()},
        "selected_acc_mean": float(matrix.diagonal().mean()),
        "non_selected_acc_mean": float(matrix[~torch.eye(len(names), dtype=torch.bool)].mean()),
        "chance": CHANCE,
        "selectivity_index": finite_or_none(index),
        "per_task_index": [finite_or_none(value) for value in per_task],
        "model_test_acc_per_task": model_acc.tolist(), "model_test_acc_mean": float(model_acc.nanmean()),
        "paper_selectivity_index": paper.get(PAPER_SETTINGS.get(setting), {}).get(method),
        "wall_time_s": round(wall_time, 2),
    }
    write(files.write_json, results, out / f"selectivity_{args.readout}.json")
    plot(matrix.numpy(), index, names, f"{method}, {setting} ({args.readout} readouts)",
         out / f"selectivity_{args.readout}.png")
    paper_text = f" (paper {results['paper_selectivity_index']})" if results["paper_selectivity_index"] else ""
    log(f"selected {results['selected_acc_mean']:.2f}%, non-selected {results['non_selected_acc_mean']:.2f}%, "
        f"selectivity index {index:.2f}{paper_text}; {out / f'selectivity_{args.readout}.json'}")
    return 0


def make_output_dir(out):
    """``out``, created if needed; RunError (one line) when it cannot be."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunError(f"output dir {out} is not writable: {err.strerror or err}; choose another with --out") from None
    return out


def readout_matrix(model, train, test, rows, memory_format, args):
    """The model's own test accuracy per task; the readout matrix, test accuracy (%) [readout location, selected
    task] of readouts trained on the BU2 representation of the ``train`` images (train_readouts); and the size of
    that representation. ``train`` and ``test`` are (images, labels)."""
    model_acc = evaluate(model, test[0], test[1], model.num_tasks, rows, memory_format)
    train_rep = bu2_representation(model, train[0], rows, memory_format)
    test_rep = bu2_representation(model, test[0], rows, memory_format)
    heads, mean, std = train_readouts(train_rep, train[1], args)
    return model_acc, readout_accuracy(heads, mean, std, test_rep, test[1]), train_rep.shape[2]


def read_training_results(path):
    """The training run's protocol from its results.json next to the checkpoint, if there is one."""
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    keys = ("command", "git_commit", "seed", "epochs", "subset", "best_epoch", "test_acc_mean", "wall_time_s")
    return {key: results.get(key) for key in keys}


def finite_or_none(value):
    """JSON has no infinity: an index with no non-selected accuracy above chance is written as null."""
    return value if math.isfinite(value) else None


if __name__ == "__main__":
    cli.exit_with(main)
