"""Per-task accuracy of a model on a split (paper §3: every task on every image where it is defined), and
``--eval_only``: a saved model evaluated without training."""
import json
from pathlib import Path

import torch

from loaders import LOADERS, NUM_TASKS
from metrics import TaskAccuracy
from models import build_model
from runtime import distributed, files, precision
from training import checkpoint, config
from training.cli import RunError, resolve_device
from training.data import MEMORY_FORMATS, MNIST_STATS, load_data, normalize
from training.provenance import describe_device, git_commit
from training.run_dir import log, write


@torch.inference_mode()
def evaluate(model, images, labels, num_tasks, rows, memory_format, stats=MNIST_STATS, pairs=False, with_loss=False):
    """Accuracy per task [T] (percent) of ``model``: every task applied to every image where it is defined (paper
    §3), all tasks of a chunk of images in one pass (``rows`` image-task pairs per pass; single-branch models see
    each image T times). With ``pairs`` (CLEVR, CELEB-A, CUB-200), single-branch models see only the pairs with a
    valid label, ``rows`` per pass, and multi-branch models ``rows`` images per pass: the same accuracies (invalid
    pairs are never counted), without the ~90% of CLEVR's by-reference pairs that are undefined. The model runs in
    eval mode, which draws no noise (greedy Gumbel allocation, no dropout). The counts stay on the device until the
    end (one host sync). In a distributed run each rank evaluates its part of the images and the counts are summed
    over the ranks. With ``with_loss`` returns (accuracy [T], loss): the cross-entropy, mean over each task's valid
    pairs, then over tasks (a float)."""
    model.eval()
    images, labels = distributed.shard(images), distributed.shard(labels)
    accuracy = TaskAccuracy(num_tasks, images.device)
    loss_sum = torch.zeros(num_tasks, dtype=torch.float64, device=images.device)
    if pairs and model.paradigm == "single_branch":
        image, task = (labels >= 0).nonzero(as_tuple=True)
        for begin in range(0, len(task), rows):
            i, t = image[begin:begin + rows], task[begin:begin + rows]
            x, y = normalize(images[i], memory_format, stats), labels[i, t].long()
            logits = model(x, t)  # [P, C]
            accuracy.update_pairs(t, logits.argmax(dim=-1), y)
            if with_loss:
                loss_sum.index_add_(0, t, cross_entropy(logits, y).double())
    else:
        per_pass = rows if pairs else max(1, rows // num_tasks)
        for begin in range(0, len(images), per_pass):
            x, y = normalize(images[begin:begin + per_pass], memory_format, stats), labels[begin:begin + per_pass]
            logits = all_task_logits(model, x, num_tasks)  # [T, B, C]
            accuracy.update(logits.argmax(dim=-1), y.t())
            if with_loss:
                target = y.t().long()
                loss = cross_entropy(logits, target.clamp(min=0))
                loss_sum += loss.where(target >= 0, 0.0).sum(dim=-1).double()
    distributed.sum_(accuracy.correct)
    distributed.sum_(accuracy.count)
    if not with_loss:
        return accuracy.per_task()
    distributed.sum_(loss_sum)
    per_task_loss = (loss_sum / accuracy.count.double()).where(accuracy.count > 0, torch.nan)
    return accuracy.per_task(), float(per_task_loss.nanmean().cpu())


def cross_entropy(logits, target):
    """Per-pair cross-entropy of logits [..., C] and targets [...], in the logits' precision but at least float32."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.nn.functional.cross_entropy(logits.flatten(0, -2), target.flatten(), reduction="none") \
        .view_as(target)


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
    device = resolve_device(args.device, params["tf32"])  # as the model trained: IEEE float32 on CUDA unless TF32
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
              "cuda_fp32_precision": precision.float32_precision(), "model_file": str(model_file),
              "epoch": saved.get("epoch"), "method": params["method"], "setting": params["setting"], "subset": subset}
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
