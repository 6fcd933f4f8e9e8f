"""The training loop of the training script: build the model, weighting and optimiser, resume, train epoch by epoch
(one task drawn per sample for single-branch models, every task of an image for multi-branch ones), evaluate, and
write the run's files (checkpoint.pt, best_model.pt, metrics.jsonl, results.json) atomically."""
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from loaders import LOADERS, NUM_TASKS
import losses
from metrics import SELECTIONS, select_record
from models import LOCATION_HEAD_MODELS, TD_MAP_MODELS, build_model, count_parameters, unit_counts
from models.gumbel_matrix import (
    add_budget_gradient, allocation_matrix, router_parameters, set_temperature, temperature_schedule)
from runtime import distributed, files
from runtime.files import REPO
from training import checkpoint, config, run_lock, tensorboard_log
from training.cli import Interrupted, RunError, resolve_device
from training.data import MEMORY_FORMATS, MNIST_STATS, data_fingerprint, load_data, normalize
from training.evaluate import eval_rows, evaluate
from training.optim import base_learning_rates, describe_schedule, lr_factor, make_optimizer, parameter_groups
from training.provenance import describe_device, git_commit
from training.run_dir import close_log, log, open_log, prepare_output_dir, read_checkpoint, resume, write
from weighting import build_weighting


# the forward keyword that returns a model's localisation output along with its logits
LOCATION_OUTPUT = {**{name: "with_td_map" for name in TD_MAP_MODELS},
                   **{name: "with_location" for name in LOCATION_HEAD_MODELS}}


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
        close_log()
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


def save_epoch(out, model, weighting, optimizer, params, args, epochs, state, best):
    """The end-of-epoch files (rank 0): best_model.pt on a new best, checkpoint.pt, metrics.jsonl."""
    if best:
        write(checkpoint.save, {"epoch": state["epoch"], "model": model.state_dict(), "params": params},
              out / "best_model.pt")
    write(checkpoint.save, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "weighting": weighting.state_dict() if weighting else {}, "params": params,
                            "seed": args.seed, "epochs": epochs, "subset": args.subset, **state}, out / "checkpoint.pt")
    write(files.write_text, "".join(json.dumps(r) + "\n" for r in state["history"]), out / "metrics.jsonl")


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


def parameter_counts(params, model):
    """Parameters and weights (parameters without biases), also as multiples of the plain backbone: the paper's #P
    (one LeNet in Table 2; "the corresponding BU architecture" in Table 3)."""
    num_params, num_weights = count_parameters(model)
    unit_params, unit_weights = unit_counts(**config.backbone_kwargs(params))
    return {"method": params["method"], "setting": params["setting"], "num_params": num_params,
            "num_weights": num_weights, "params_x": round(num_params / unit_params, 4),
            "weights_x": round(num_weights / unit_weights, 4)}


def interrupted_message(out, epoch, epochs, command):
    """Where an interrupted run stands: the epoch reached, the last checkpoint, the command that continues it."""
    if epoch == 0:
        kept = "no epoch finished, so no checkpoint was written; run the same command to start again"
    else:
        resume = command if " --resume" in f"{command} " else f"{command} --resume"
        kept = f"the last checkpoint is {out / 'checkpoint.pt'}; continue with: {resume}"
    return f"stopped in epoch {epoch + 1} of {epochs} ({epoch} finished); {kept}"
