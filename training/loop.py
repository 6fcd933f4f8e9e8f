"""The training loop of the training script: build the model, weighting and optimiser, resume, train epoch by epoch
(one task drawn per sample for single-branch models, every task of an image for multi-branch ones), evaluate, and
write the run's files (checkpoint.pt, best_model.pt, metrics.jsonl, results.json) atomically. With ``--seeds`` the
runs of several seeds train as one stacked group (``Replicas``, training/stacked.py), each writing exactly the
files of its separate run."""
import argparse
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
from models.gumbel_matrix import allocation_matrix, router_parameters, temperature_schedule
from runtime import distributed, files
from runtime.files import REPO
from training import checkpoint, config, run_lock, stacked, step_graph, tensorboard_log
from training.cli import Interrupted, RunError, resolve_device
from training.data import MEMORY_FORMATS, MNIST_STATS, data_fingerprint, load_data, normalize
from training.evaluate import eval_rows, evaluate_stack
from training.optim import base_learning_rates, describe_schedule, lr_factor, make_optimizer, parameter_groups
from training.provenance import describe_device, git_commit
from training.run_dir import close_log, log, open_log, prepare_output_dir, read_checkpoint, resume, write
from weighting import build_weighting
from weighting.batched import STACKED_WEIGHTINGS
from weighting.min_norm_solvers import MAX_BATCHED_TASKS


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
    if len(args.seeds) > 1:
        check_stackable(params, num_tasks, args.stack_mode)
    graphs = step_graph.build(args.cuda_graphs, device, len(args.seeds), params)
    if distributed.launched():
        distributed.init(device)
    outs = run_dirs(args, params)
    locked = []
    try:
        for out in outs:
            distributed.on_main(prepare_output_dir, out, args.resume, args.command)
            locked.append(out)
        return train(args, params, epochs, device, outs, summary_writer, graphs)
    finally:
        close_log()
        for out in locked:
            distributed.on_main(run_lock.release, out)


def run_dirs(args, params):
    """The output dir of every seed: ``--out`` (default runs/<exp_id>/seed<k>) for one seed, <out>/seed<k> (default
    runs/<exp_id>/seed<k>) for each seed of a stacked group (``--seeds``)."""
    if len(args.seeds) == 1:
        return [Path(args.out or REPO / "runs" / params["exp_id"] / f"seed{args.seeds[0]}")]
    return [Path(args.out or REPO / "runs" / params["exp_id"]) / f"seed{seed}" for seed in args.seeds]


def check_stackable(params, num_tasks, mode):
    """A stacked group (``--seeds``) trains in one process a method whose weighting has a stacked form, without the
    localisation loss, and draws dropout masks in stacking mode 'loop' only; ParamError (one line) otherwise."""
    if distributed.launched():
        raise config.ParamError("--seeds: a stacked group trains in one process; start it with python, not torchrun "
                                "(or give torchrun one --seed)")
    if params["spatial_loss_weight"] > 0:
        raise config.ParamError("--seeds: the localisation loss (spatial_loss_weight > 0) is not stacked; allowed: "
                                "one --seed per run")
    if params["weighting"] is not None and params["weighting"] not in STACKED_WEIGHTINGS:
        raise config.ParamError(f"--seeds: weighting '{params['weighting']}' has no stacked form; allowed: "
                                f"{', '.join(STACKED_WEIGHTINGS)}, or one --seed per run")
    if params["weighting"] == "mgda" and num_tasks > MAX_BATCHED_TASKS:
        raise config.ParamError(f"--seeds: stacked MGDA solves up to {MAX_BATCHED_TASKS} tasks, setting "
                                f"'{params['setting']}' has {num_tasks}; allowed: one --seed per run")
    if params["dropout"] != "none" and mode == "vmap":
        raise config.ParamError("--stack_mode: 'vmap' cannot draw dropout masks per replica; allowed: auto, loop")


def train(args, params, epochs, device, outs, summary_writer=None, graphs=None):
    """The runs of ``args.seeds`` in ``outs`` (locked by this process): build, resume, train, evaluate, write. One
    seed trains its model as it is; several train as one stacked group (``Replicas``), each writing the files of
    its separate run; ``graphs``: the CUDA graph of the step (``step_graph.build``), or None."""
    num_tasks = NUM_TASKS[params["setting"]]
    runs = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        model = build_model(params["model"], num_tasks, **config.model_kwargs(params))
        model = model.to(device, memory_format=MEMORY_FORMATS[params["memory_format"]])
        weighting = None
        if params["weighting"] is not None:
            weighting = build_weighting(params["weighting"], num_tasks, params["weighting_options"]).to(device)
        runs.append((model, weighting, make_optimizer(params, parameter_groups(params, model, weighting))))
    rows = eval_rows(params, device)
    stats = (LOADERS[params["dataset"]].mean, LOADERS[params["dataset"]].std)
    pairs = params["dataset"] != "multi_mnist"  # evaluate only the defined (image, task) pairs (see evaluate)

    saved = [distributed.on_main(read_checkpoint, out / "checkpoint.pt", params,
                                 argparse.Namespace(**{**vars(args), "seed": seed}), epochs) if args.resume else None
             for seed, out in zip(args.seeds, outs)]
    finished = [s is not None and s["epoch"] >= epochs and (out / "results.json").exists()
                for s, out in zip(saved, outs)]
    if all(finished):
        for s, out in zip(saved, outs):
            log(f"{out} holds a finished run ({s['epoch']} of {epochs} epochs); nothing to do, nothing changed")
        return 0
    if any(finished):
        done = [seed for seed, f in zip(args.seeds, finished) if f]
        raise config.ParamError(f"--seeds: seed(s) {done} have finished runs in {outs[0].parent}; give --seeds the "
                                f"others only")
    distributed.on_main(open_log, *outs)
    states = [{"epoch": 0, "history": [], "best": None, "wall_time_s": 0.0} if s is None else
              resume(s, out / "checkpoint.pt", params, *run) for s, out, run in zip(saved, outs, runs)]
    if len({state["epoch"] for state in states}) > 1:
        where = ", ".join(f"seed {seed}: {state['epoch']}" for seed, state in zip(args.seeds, states))
        raise config.ParamError(f"--seeds: the runs stand at different epochs ({where}); a stacked group trains in "
                                f"step, resume them with one --seed each")
    group = Replicas(runs, params, device, args.seeds, args.stack_mode, graphs)

    splits = distributed.local_main_first(load_data, params, args.subset, args.data_root or params["data_root"])
    fingerprint = data_fingerprint(splits)
    for s, out in zip(saved, outs):
        if s is not None and s.get("data_fingerprint", fingerprint) != fingerprint and not args.force:
            raise config.ParamError(f"--resume: {out / 'checkpoint.pt'} was trained on other data (fingerprint "
                                    f"{s['data_fingerprint']}, now {fingerprint}: another --data_root or data "
                                    f"files); pass --force to resume anyway, or choose another --out")
    for state in states:
        state["data_fingerprint"] = fingerprint
    data = {split: (images.to(device), labels.to(device)) for split, (images, labels, _) in splits.items()}
    locations = splits["train"][2].to(device) if params["spatial_loss_weight"] > 0 else None
    info = {"command": args.command,
            "git_commit": git_commit(), "device": describe_device(device), "world_size": distributed.world_size(),
            "epochs": epochs, "method": params["method"], "setting": params["setting"],
            "subset": args.subset, "overrides": args.set, "data_fingerprint": fingerprint,
            "protocol": params["protocol"], **parameter_counts(params, runs[0][0])}
    if len(args.seeds) > 1:
        info["stacked"] = {"seeds": args.seeds, "mode": group.mode}
    processes = f" x {info['world_size']} processes" if distributed.is_distributed() else ""
    together = f", {len(args.seeds)} seeds stacked ({group.mode})" if len(args.seeds) > 1 else ""
    together += ", CUDA graphs" if group.graphs is not None else ""
    log(f"{params['exp_id']}: {params['method']} on {params['setting']}, {info['num_params']} params "
        f"(x{info['params_x']:.3f}), {len(data['train'][0])} train images, {info['device']}{processes}{together}, "
        f"out {outs[0] if len(outs) == 1 else outs[0].parent}")
    log(f"{epochs} epochs from epoch {states[0]['epoch'] + 1}, {params['optimizer']} lr {params['lr']:g}, "
        f"batch {params['batch_size']}, {describe_schedule(params, epochs)}, seed {', '.join(map(str, args.seeds))}"
        + (f", overrides: {' '.join(args.set)}" if args.set else ""))

    boards = [tensorboard_log.open_writer(summary_writer, out, state["epoch"]) for out, state in zip(outs, states)] \
        if summary_writer and distributed.is_main() else []
    try:
        for epoch in range(states[0]["epoch"], epochs):
            train_one(epoch, epochs, group, data, params, args, outs, states, stats, locations, rows, pairs, num_tasks)
            for board, state in zip(boards, states):
                tensorboard_log.log_epoch(board, state["history"][-1])
    except KeyboardInterrupt:
        where = outs[0] if len(outs) == 1 else outs[0].parent / "seed*"
        raise Interrupted(interrupted_message(where, states[0]["epoch"], epochs, args.command)) from None
    finally:
        for board in boards:
            board.close()

    for r, (seed, out, state) in enumerate(zip(args.seeds, outs, states)):
        results = {**info, "seed": seed, **reported_figures(state["history"], KEPT_MODEL[params["protocol"]]),
                   **({"active_fraction_per_task": state["best"]["active_fraction_per_task"]}
                      if "active_fraction_per_task" in state["best"] else {}),
                   "wall_time_s": round(state["wall_time_s"], 2), "params": params}
        distributed.on_main(write, files.write_json, results, out / "results.json")
        at_val = "none at a best-validation epoch (protocol authors: no validation split)"
        if results["best_epoch"] is not None:
            at_val = f"at the best-validation epoch {results['best_epoch']}: {results['test_acc_mean']:.2f}"
        log(f"{group.name(r)}test accuracy {at_val}; at the best test epoch {results['best_test_epoch']} "
            f"(optimistic): {results['test_acc_mean_best_test']:.2f}; at the last epoch: "
            f"{results['test_acc_mean_last']:.2f}; best_model.pt: epoch {results['best_model_epoch']} "
            f"({results['best_model_selection']}); results in {out / 'results.json'}")
    return 0


def train_one(epoch, epochs, group, data, params, args, outs, states, stats, locations, rows, pairs, num_tasks):
    """Trains and evaluates epoch ``epoch`` (0-based) of every run of ``group``, records it in its ``states`` entry
    and writes its epoch's files. In a stacked group a run's epoch time is the group's."""
    start = time.perf_counter()
    for param_group, base_lr in zip(group.optimizer.param_groups, base_learning_rates(params)):
        param_group["lr"] = base_lr * lr_factor(params, epoch, epochs)
    train_losses = group.train_epoch(data["train"], params, epoch, outs, states, stats, locations)
    if group.weighting is not None:
        group.weighting.after_epoch()
    evaluated = (epoch + 1) % params["eval_every"] == 0 or epoch + 1 == epochs
    scores = {split: evaluate_stack(group.stack, *data[split], num_tasks, rows, MEMORY_FORMATS[params["memory_format"]],
                                    stats, pairs, with_loss=True)
              for split in ("val", "test") if evaluated and split in data}  # no val split under the authors' protocol
    records = []
    for r, train_loss in enumerate(train_losses):
        record = {"epoch": epoch + 1, "lr": group.optimizer.param_groups[0]["lr"], "train_loss": train_loss}
        for split, (accuracy, loss) in scores.items():
            record.update({f"{split}_acc_mean": float(accuracy[r].nanmean()), f"{split}_loss": float(loss[r]),
                           f"{split}_acc_per_task": accuracy[r].tolist()})
        records.append(record)
    seconds = time.perf_counter() - start
    kept = SELECTIONS[KEPT_MODEL[params["protocol"]]]  # the accuracy that picks best_model.pt
    active = group.active_fractions()
    for r, (record, state, out) in enumerate(zip(records, states, outs)):
        state["wall_time_s"] += seconds
        record.update({"epoch_time_s": round(seconds, 3),
                       "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        if group.weighting is not None:
            record["task_weights"] = group.task_weights(r)
        if active is not None:
            record["active_fraction_per_task"] = active[r]
        state["history"].append(record)
        best = evaluated and (state["best"] is None or record[kept] > state["best"][kept])
        if best:
            state["best"] = record
        state["epoch"] = epoch + 1
        distributed.on_main(save_epoch, out, group.replica_states(r), params, args, group.seeds[r], epochs, state,
                            best)
        scores = f"(evaluated every {params['eval_every']} epochs)"
        if evaluated:
            now = "  ".join(f"{split} {record[f'{split}_acc_mean']:.2f}" for split in ("val", "test") if split in data)
            scores = f"{now}  (best {kept.split('_')[0]} {state['best'][kept]:.2f} at epoch {state['best']['epoch']})"
        log(f"{group.name(r)}epoch {epoch + 1}/{epochs}  loss {record['train_loss']:.4f}  {scores}  {seconds:.1f}s")


# --stack_mode auto: 'loop' on CPU (benchmarks/bench_stacked.py: vmap's grouped convolutions are 1.1-2.9x slower
# there), 'vmap' on CUDA (fewer kernel launches; measured by benchmarks/gpu_allocation.py)
AUTO_STACK_MODES = {"cpu": "loop", "cuda": "vmap"}


class Replicas:
    """The runs that this process trains, all with ``train_stacked_epoch``: one run (its model, weighting and
    optimiser as they are, DDP-wrapped under torchrun; a stack of one), or R runs of one method that differ only in
    their seed, trained as one stacked model (training/stacked.py; ``--seeds``) whose every replica can be read as
    its separate run. ``graphs``: the group's ``step_graph.StepGraph`` (CUDA graphs of the step), or None."""

    def __init__(self, runs, params, device, seeds, mode="auto", graphs=None):
        self.seeds, self.mode, self.graphs = seeds, None, graphs
        if len(runs) == 1:
            self.model, self.weighting, self.optimizer = runs[0]
            self.stack = stacked.OneRun(distributed.wrap(self.model, device))  # DDP's forward averages the gradients
            self.step_weighting = None if self.weighting is None else stacked.OneWeighting(self.weighting)
            return
        self.mode = mode if mode != "auto" else \
            "loop" if params["dropout"] != "none" else AUTO_STACK_MODES.get(device.type, "loop")
        self.model, self.weighting, self.optimizer = stacked.stack_runs(runs, params, self.mode)
        self.stack, self.step_weighting = self.model, self.weighting

    def train_epoch(self, train, params, epoch, outs, states, stats, locations):
        """One epoch of every run (``train_stacked_epoch``); their mean training losses."""
        return train_stacked_epoch(self.stack, self.step_weighting, self.optimizer, train, params, self.seeds, epoch,
                                   outs, states, stats, locations, self.graphs)

    def active_fractions(self):
        """Per run, the fraction of active components of every task (Gumbel-Matrix's greedy allocation, [R][T]
        lists); None for a model without learned allocation."""
        if not router_parameters(self.model if self.mode is None else self.model.template):
            return None
        matrices = allocation_matrix(self.model)[None] if self.mode is None else self.model.allocation_matrix()
        return matrices.mean(dim=-1).cpu().tolist()

    def replica_states(self, r):
        """Run r's (model, weighting, optimiser) state dicts, as its separate run holds them."""
        if self.mode is None:
            return (self.model.state_dict(), self.weighting.state_dict() if self.weighting else {},
                    self.optimizer.state_dict())
        return (self.model.replica_state_dict(r), self.weighting.replica_state_dict(r) if self.weighting else {},
                stacked.replica_optimizer_state(self.optimizer, r))

    def task_weights(self, r):
        weights = self.weighting.weights().detach()
        return (weights if self.mode is None else weights[r]).cpu().tolist()

    def name(self, r):
        """How a log line names run r: nothing for one run, its seed in a group."""
        return "" if self.mode is None else f"seed {self.seeds[r]}: "


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


def save_epoch(out, replica, params, args, seed, epochs, state, best):
    """The end-of-epoch files (rank 0) of the run in ``out`` from its (model, weighting, optimiser) state dicts
    ``replica``: best_model.pt on a new best, checkpoint.pt, metrics.jsonl."""
    model, weighting, optimizer = replica
    if best:
        write(checkpoint.save, {"epoch": state["epoch"], "model": model, "params": params}, out / "best_model.pt")
    write(checkpoint.save, {"model": model, "optimizer": optimizer, "weighting": weighting, "params": params,
                            "seed": seed, "epochs": epochs, "subset": args.subset, **state}, out / "checkpoint.pt")
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
    """One epoch of one run: ``train_stacked_epoch`` of the run as a stack of one (``stacked.OneRun``). ``model`` is
    the DDP wrapper in a distributed run. Returns the run's mean training loss."""
    one_weighting = None if weighting is None else stacked.OneWeighting(weighting)
    return train_stacked_epoch(stacked.OneRun(model), one_weighting, optimizer, train, params, [seed], epoch, [out],
                               [state], stats, locations)[0]


def train_stacked_epoch(model, weighting, optimizer, train, params, seeds, epoch, outs, states, stats=MNIST_STATS,
                        locations=None, graphs=None):
    """One epoch of the runs ``seeds``: ``model`` is a stack of R runs (``stacked.StackedModel``, ``weighting`` a
    ``weighting.batched`` one) or one run (``stacked.OneRun`` and ``stacked.OneWeighting``, R = 1), the same step
    either way. Run r's data order, task draws and model noise depend only on (seeds[r], epoch), so resuming is
    exact and a stacked run is its separate run. Inputs carry the replica dimension first ([R, B, ...]). In a
    distributed run (one run) each rank trains on its part of every global batch and the logged losses are averaged
    over the ranks: the global batch's, as in one process. ``locations`` (float [N, T, 2], one run) adds the
    localisation loss ('loc', ``losses.location_loss``), weighted by ``spatial_loss_weight``: on ControlNet's TD map,
    or on a baseline's location head. A full batch's step is a function of device tensors only (``train_step``: the
    batch is picked by a step index tensor, no host synchronisation), captured as a CUDA graph when ``graphs`` (a
    ``step_graph.StepGraph``) is given; the last, partial batch takes the same step eagerly. The first non-finite
    loss of a run is reported after the epoch. Returns every run's mean training loss."""
    images, labels = train
    device, n, batch_size, replicas = images.device, len(images), params["batch_size"], len(seeds)
    generators = [epoch_generator(seed, epoch) for seed in seeds]
    model.seed_noise([epoch_seed(seed, epoch) for seed in seeds])  # the model's own draws (Gumbel samples, dropout)
    orders = torch.stack([torch.randperm(n, generator=g) for g in generators]).to(device)  # [R, N]
    tasks = None
    if weighting is None:
        valid = (labels >= 0).cpu()
        tasks = torch.stack([draw_tasks(valid, g) for g in generators]).to(device)  # [R, N]
    model.train()
    steps, full = -(-n // batch_size), n // batch_size
    routing = params.get("router_options")
    temperatures = None
    if routing:  # Gumbel-softmax temperature, counted in task-updates as Maziarz et al.'s mnist_train.py
        temperatures = torch.tensor([temperature_schedule((epoch * steps + step) * labels.shape[1],
                                                          routing["temperature_init"], routing["temperature_min"])
                                     for step in range(steps)], dtype=model.dtype, device=device)
    live = {"orders": orders, "tasks": tasks, "temperatures": temperatures,
            "step": torch.zeros(1, dtype=torch.int64, device=device),
            "loss_sum": torch.zeros(replicas, device=device),
            "first_bad": torch.full((replicas,), -1, dtype=torch.int64, device=device),
            "bad_losses": torch.zeros(replicas, 1 if weighting is None else labels.shape[1], dtype=model.dtype,
                                      device=device)}
    if graphs is not None:
        live = graphs.stage(live, (images.data_ptr(), labels.data_ptr(), n, batch_size, id(model), id(weighting),
                                   id(optimizer), tuple(map(id, model.noise_generators()))))
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]

    def gradients(batch):
        train_step(model, weighting, optimizer, images, labels, params, stats, locations, live, batch)
        return [parameter.grad for parameter in parameters]

    def full_batch():  # batch number live["step"] of the epoch's order
        return gradients(live["orders"][:, :full * batch_size].view(replicas, full, batch_size)
                         .index_select(1, live["step"])[:, 0])

    def update():
        optimizer.step()
        if weighting is not None:
            weighting.after_step()

    progress = tqdm(range(steps), desc=f"epoch {epoch + 1}", leave=False, unit="batch",
                    disable=not (distributed.is_main() and sys.stderr.isatty()))  # no bar frames in a log file
    for step in progress:
        if step == full:
            gradients(live["orders"][:, full * batch_size:])  # the partial batch
            update()
        elif graphs is not None:
            graphs.step(full_batch, update, parameters, model.noise_generators())
        else:
            full_batch()
            update()
    for r, bad in enumerate(live["first_bad"].tolist()):
        if bad >= 0:
            report_nonfinite(bad, epoch, params, orders[r], None if tasks is None else tasks[r], batch_size, outs[r],
                             states[r], live["bad_losses"][r])
    return [float(total) / steps for total in live["loss_sum"].tolist()]


def train_step(model, weighting, optimizer, images, labels, params, stats, locations, live, batch):
    """The gradients of one step of every run on ``batch`` [R, B] (indices into ``images``, the global batches, the
    same for any number of processes), from device tensors only: the epoch's task draws, temperatures and step
    index ``live["step"]``, which the step advances by one after adding its losses to ``live``'s loss sum and
    first non-finite step and losses of every run."""
    index = distributed.shard(batch.T).T  # this rank's part of the global batches
    x = normalize(images[index.flatten()], MEMORY_FORMATS[params["memory_format"]], stats).to(model.dtype) \
        .unflatten(0, index.shape)
    optimizer.zero_grad(set_to_none=True)
    routing = params.get("router_options")
    if routing:
        model.set_temperature(live["temperatures"].index_select(0, live["step"])[0])
    if weighting is None:
        t, batch_tasks = live["tasks"].gather(1, index), live["tasks"].gather(1, batch)
        divisors = model.per_replica(loss_divisor, labels[batch, batch_tasks])
        if locations is None:
            loss = model.per_replica(losses.masked_cross_entropy, model(x, t), labels[index, t].long(), divisors)
        else:
            def located_loss(logits, where, y, divisor, xy, batch_xy):
                targets = losses.LocationTargets(xy, batch_xy, x.shape[-1], params["spatial_loss_weight"],
                                                 distributed.world_size())
                return losses.masked_cross_entropy(logits, y, divisor) + targets.loss(where)
            logits, where = model(x, t, **{LOCATION_OUTPUT[params["model"]]: True})
            loss = model.per_replica(located_loss, logits, where, labels[index, t].long(), divisors,
                                     locations[index, t], locations[batch, batch_tasks])
        loss.sum().backward()
        task_losses = loss.detach()[:, None]
    else:
        located = {} if locations is None else {"locations": [losses.LocationTargets(
            locations[i], locations[b], x.shape[-1], params["spatial_loss_weight"], distributed.world_size())
            for i, b in zip(index, batch)]}
        divisors = model.per_replica(loss_divisor, labels[batch])
        task_losses = weighting.backward(model, x, labels[index].long(), divisors, **located)
        distributed.average_gradients(weighting.parameters())
    if routing and routing["budget_penalty"] > 0:
        model.add_budget_gradient(routing["budget"], routing["budget_penalty"])
    task_losses = distributed.mean(task_losses)
    step_loss = task_losses.mean(dim=1)
    live["loss_sum"].add_(step_loss)
    newly_bad = (live["first_bad"] < 0) & ~torch.isfinite(step_loss)
    live["first_bad"].copy_(torch.where(newly_bad, live["step"], live["first_bad"]))
    live["bad_losses"].copy_(torch.where(newly_bad[:, None], task_losses, live["bad_losses"]))
    live["step"].add_(1)


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
