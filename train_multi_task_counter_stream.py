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
(resume state) and best_model.pt, all written atomically.

Started by torchrun (``torchrun --nproc_per_node=N train_multi_task_counter_stream.py ...``), it trains one model
with DistributedDataParallel over N processes (one GPU each, or CPU processes) with the same global batches,
task draws and gradients as one process (see distributed.py); rank 0 writes the outputs.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
import config
import distributed
import gumbel_experiment
import losses
from provenance import describe_device, git_commit
import losses_spatial
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
REPO = Path(__file__).resolve().parent
# the forward keyword that returns a model's localisation output along with its logits
LOCATION_OUTPUT = {**{name: "with_td_map" for name in TD_MAP_MODELS},
                   **{name: "with_location" for name in LOCATION_HEAD_MODELS}}


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--param_file", required=True, help="JSON param file (see params/ and the README)")
    parser.add_argument("--epochs", type=positive_int, help="training epochs (default: the param file's, else 100)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="run seed: initialisation, order, tasks")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--out", help="output dir (default runs/<exp_id>/seed<k>)")
    parser.add_argument("--subset", type=positive_int, help="use only N training and N/5 val/test images (smoke runs)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--force", action="store_true", help="resume even if the param file changed")
    parser.add_argument("--data_root", help="data directory (default: the param data_root, else for Multi-MNIST and "
                        "CLEVR-like $MTL_DATA_ROOT or ./data, for CLEVR, CELEB-A, CUB-200 $MTL_CLEVR_ROOT, "
                        "$MTL_CELEBA_ROOT, $MTL_CUB_ROOT)")
    parser.add_argument("--dry_run", action="store_true", help="build the model, print its parameter counts, exit")
    return parser.parse_args(argv)


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
    args.command = " ".join(["python", Path(__file__).name] + list(sys.argv[1:] if argv is None else argv))
    code = exit_code(run, args)
    distributed.shutdown()  # the ranks end together: every error above is raised on all of them (distributed.py)
    return code


def exit_code(run, args):
    """``run(args)``'s exit code; a user mistake (ParamError) is one line on stderr and code 2, a fault during the
    run (RunError) one line and code 1. Shared by the scripts built on this one."""
    try:
        return run(args)
    except config.ParamError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


class RunError(RuntimeError):
    """A fault during the run (non-finite loss, failing write): reported as one line, exit code 1."""


def run(args):
    params = config.load_params(args.param_file)
    epochs = args.epochs or params["epochs"]
    num_tasks = NUM_TASKS[params["setting"]]
    if args.dry_run:
        with torch.device("meta"):  # counts only: no memory (uniform scaling on 1645 CLEVR tasks has 12G parameters)
            model = build_model(params["model"], num_tasks, **config.model_kwargs(params))
        print(json.dumps(parameter_counts(params, model)))
        return 0
    device = resolve_device(args.device)
    if distributed.launched():
        distributed.init(device)
    out = Path(args.out or REPO / "runs" / params["exp_id"] / f"seed{args.seed}")
    distributed.on_main(prepare_output_dir, out, args.resume)

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
    if saved is not None:
        state = resume(saved, out / "checkpoint.pt", params, model, weighting, optimizer)
    trained = distributed.wrap(model, device)  # the forward whose backward averages the gradients over the ranks

    splits = distributed.local_main_first(load_data, params, args.subset, args.data_root or params["data_root"])
    data = {split: (images.to(device), labels.to(device)) for split, (images, labels, _) in splits.items()}
    locations = splits["train"][2].to(device) if params["spatial_loss_weight"] > 0 else None
    info = {"command": args.command,
            "git_commit": git_commit(), "device": describe_device(device), "world_size": distributed.world_size(),
            "seed": args.seed, "epochs": epochs, "method": params["method"], "setting": params["setting"],
            "subset": args.subset, "protocol": params["protocol"], **parameter_counts(params, model)}
    processes = f" x {info['world_size']} processes" if distributed.is_distributed() else ""
    log(f"{params['exp_id']}: {params['method']} on {params['setting']}, {info['num_params']} params "
        f"(x{info['params_x']:.3f}), {len(data['train'][0])} train images, {info['device']}{processes}, out {out}")

    kept = SELECTIONS[KEPT_MODEL[params["protocol"]]]  # the accuracy that picks best_model.pt
    for epoch in range(state["epoch"], epochs):
        start = time.perf_counter()
        for group, base_lr in zip(optimizer.param_groups, base_learning_rates(params)):
            group["lr"] = base_lr * lr_factor(params, epoch, epochs)
        train_loss = train_epoch(trained, weighting, optimizer, data["train"], params, args.seed, epoch, out, state,
                                 stats, locations)
        record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "train_loss": train_loss}
        evaluated = (epoch + 1) % params["eval_every"] == 0 or epoch + 1 == epochs
        if evaluated:
            for split in ("val", "test"):
                if split in data:  # no val split under the authors' protocol
                    acc = evaluate(model, *data[split], num_tasks, rows, MEMORY_FORMATS[params["memory_format"]],
                                   stats, pairs)
                    record.update({f"{split}_acc_mean": float(acc.nanmean()), f"{split}_acc_per_task": acc.tolist()})
        state["wall_time_s"] += time.perf_counter() - start
        if weighting is not None:
            record["task_weights"] = weighting.weights().detach().cpu().tolist()
        if router_parameters(model):
            record["active_fraction_per_task"] = allocation_matrix(model).mean(dim=1).cpu().tolist()
        state["history"].append(record)
        best = evaluated and (state["best"] is None or record[kept] > state["best"][kept])
        if best:
            state["best"] = record
        state["epoch"] = epoch + 1
        distributed.on_main(save_epoch, out, model, weighting, optimizer, params, args, epochs, state, best)
        scores = f"(evaluated every {params['eval_every']} epochs)"
        if evaluated:
            now = "  ".join(f"{split} {record[f'{split}_acc_mean']:.2f}" for split in ("val", "test") if split in data)
            scores = f"{now}  (best {kept.split('_')[0]} {state['best'][kept]:.2f} at epoch {state['best']['epoch']})"
        log(f"epoch {epoch + 1}/{epochs}  loss {train_loss:.4f}  {scores}  {time.perf_counter() - start:.1f}s")

    results = {**info, **reported_figures(state["history"], KEPT_MODEL[params["protocol"]]),
               **({"active_fraction_per_task": state["best"]["active_fraction_per_task"]}
                  if "active_fraction_per_task" in state["best"] else {}),
               "wall_time_s": round(state["wall_time_s"], 2), "params": params}
    distributed.on_main(write, checkpoint.write_json, results, out / "results.json")
    at_val = "none at a best-validation epoch (protocol authors: no validation split)"
    if results["best_epoch"] is not None:
        at_val = f"at the best-validation epoch {results['best_epoch']}: {results['test_acc_mean']:.2f}"
    log(f"test accuracy {at_val}; at the best test epoch {results['best_test_epoch']} (optimistic): "
        f"{results['test_acc_mean_best_test']:.2f}; at the last epoch: {results['test_acc_mean_last']:.2f}; "
        f"best_model.pt: epoch {results['best_model_epoch']} ({results['best_model_selection']}); "
        f"results in {out / 'results.json'}")
    return 0


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


def save_epoch(out, model, weighting, optimizer, params, args, epochs, state, best):
    """The end-of-epoch files (rank 0): best_model.pt on a new best, checkpoint.pt, metrics.jsonl."""
    if best:
        write(checkpoint.save, {"epoch": state["epoch"], "model": model.state_dict(), "params": params},
              out / "best_model.pt")
    write(checkpoint.save, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "weighting": weighting.state_dict() if weighting else {}, "params": params,
                            "seed": args.seed, "epochs": epochs, **state}, out / "checkpoint.pt")
    write(checkpoint.write_text, "".join(json.dumps(r) + "\n" for r in state["history"]), out / "metrics.jsonl")


def log(message):
    """One line on stdout, from rank 0 only."""
    if distributed.is_main():
        tqdm.write(message)


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
    ``locations`` (float [N, T, 2]) adds the localisation loss ('loc', ``location_loss``), weighted by
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
    progress = tqdm(steps, desc=f"epoch {epoch + 1}", leave=False, unit="batch", disable=not distributed.is_main())
    for step, begin in enumerate(progress):
        batch = order[begin:begin + batch_size]  # the global batch, the same for any number of processes
        index = distributed.shard(batch)  # this rank's part of it
        x = normalize(images[index], memory_format, stats)
        optimizer.zero_grad(set_to_none=True)
        if routing:  # Gumbel-softmax temperature, counted in task-updates as the original (spec gumbel_matrix.md §5)
            update = (epoch * len(steps) + step) * labels.shape[1]
            set_temperature(routed, temperature_schedule(update, routing["temperature_init"], routing["temperature_min"]))
        if weighting is None:
            t = tasks[index]
            divisor = loss_divisor(labels[batch, tasks[batch]])
            if locations is None:
                loss = losses.masked_cross_entropy(model(x, t), labels[index, t].long(), divisor)
            else:
                logits, where = model(x, t, **{LOCATION_OUTPUT[params["model"]]: True})
                xy, batch_xy = locations[index, t], locations[batch, tasks[batch]]
                loss = losses.masked_cross_entropy(logits, labels[index, t].long(), divisor) + \
                    params["spatial_loss_weight"] * location_loss(where, xy, batch_xy, x.shape[-1])
            loss.backward()
            task_losses = loss.detach()
        else:
            located = {}
            if locations is not None:
                located["location_loss"] = lambda where: params["spatial_loss_weight"] * location_loss(
                    where, locations[index], locations[batch], x.shape[-1])
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


def location_loss(where, xy, batch_xy, size):
    """The localisation loss ('loc', paper §4.2) of this rank's samples, divided as ``loss_divisor`` does: by the
    targets of the whole global batch (``batch_xy``) over the number of ranks. ``where`` is ControlNet's TD bottom
    map [B, 1, S, S] (the spatial classification loss) or a baseline's regressed (x, y) [B, 2] (one task per image;
    a scalar) or [B, T, 2] (every task; [T] losses) in pixels of the ``size`` x ``size`` input (``losses_spatial``)."""
    if where.dim() == 4:
        num_valid = losses_spatial.has_location(batch_xy, *where.shape[-2:]).sum().clamp(min=1)
        return losses_spatial.spatial_classification_loss(where, xy, num_valid=num_valid / distributed.world_size())
    num_valid = (batch_xy >= 0).all(dim=-1).sum(dim=0).clamp(min=1)
    return losses_spatial.location_regression_loss(where, xy, size, num_valid / distributed.world_size())


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
def evaluate(model, images, labels, num_tasks, rows, memory_format, stats=MNIST_STATS, pairs=False):
    """Accuracy per task [T] (percent): every task applied to every image where it is defined (paper §3), all
    tasks of a chunk of images in one pass (``rows`` image-task pairs per pass; single-branch models see each
    image T times). With ``pairs`` (CLEVR, CELEB-A, CUB-200), single-branch models see only the pairs with a valid
    label, ``rows`` per pass, and multi-branch models ``rows`` images per pass: the same accuracies (invalid pairs
    are never counted), without the ~90% of CLEVR's by-reference pairs that are undefined.
    In a distributed run each rank evaluates its part of the images and the counts are summed over the ranks."""
    model.eval()
    images, labels = distributed.shard(images), distributed.shard(labels)
    accuracy = TaskAccuracy(num_tasks, images.device)
    if pairs and model.paradigm == "single_branch":
        image, task = (labels >= 0).nonzero(as_tuple=True)
        for begin in range(0, len(task), rows):
            i, t = image[begin:begin + rows], task[begin:begin + rows]
            accuracy.update_pairs(t, model(normalize(images[i], memory_format, stats), t).argmax(dim=1), labels[i, t])
    else:
        per_pass = rows if pairs else max(1, rows // num_tasks)
        for begin in range(0, len(images), per_pass):
            x, y = normalize(images[begin:begin + per_pass], memory_format, stats), labels[begin:begin + per_pass]
            accuracy.update(all_task_logits(model, x, num_tasks).argmax(dim=2), y.t())
    distributed.sum_(accuracy.correct)
    distributed.sum_(accuracy.count)
    return accuracy.per_task()


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


def lr_factor(params, epoch, epochs):
    """The authors' schedule: halve the lr before every 0-based epoch e with (e + 1) % int(0.3 * epochs) == 0
    (epochs 29, 59, 89 of 100), i.e. at 30/60/90% of training; at most three halvings (the original halves
    every epoch when epochs < 4); constant when that period is 0."""
    period = int(epochs * 0.3)
    if params["lr_schedule"] == "none" or period == 0:
        return 1.0
    return 0.5 ** min(3, (epoch + 1) // period)


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
        checkpoint.write_text("ok", out / ".write_probe")
        (out / ".write_probe").unlink()
    except OSError as err:
        raise RunError(f"output dir {out} is not writable: {err.strerror or err}; choose another with --out") from None


def prepare_output_dir(out, resume):
    """Fails at start, not after hours of training, when the output dir is unusable or already in use."""
    check_writable(out)
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
    before = {key: spec[1] for key, spec in config.SCHEMA.items() if spec[1] is not config.REQUIRED}
    before.update(saved["params"])  # a key added to the schema since the checkpoint was written has its default
    changed = sorted(key for key in set(params) | set(before) if params.get(key) != before.get(key))
    if saved["seed"] != args.seed:
        changed.append(f"--seed ({saved['seed']} -> {args.seed})")
    if saved["epochs"] != epochs:
        changed.append(f"--epochs ({saved['epochs']} -> {epochs}, which changes the lr schedule)")
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
