"""The training script's run: the param file, the device and the output dir, then epoch after epoch the training
epoch (training/loop.py), the evaluation (training/evaluate.py), the epoch's record and files; at the end
results.json (training/results.py). One seed trains its ``Run`` (model, weighting, optimiser) as it is; the engines
around the step, stacked seeds (``--seeds``) and CUDA graphs (``--cuda_graphs``), are imported only when asked for
(training/stacked.py, training/step_graph.py) and give a group with the methods of ``Run``."""
import json
import math
import time
from datetime import datetime, timezone
from functools import partial

import torch

from loaders import LOADERS, NUM_TASKS
from metrics import SELECTIONS
from models import build_model
from runtime import distributed
from training import config, loop, progress, results, run_dir, run_lock, tensorboard_log
from training.cli import Interrupted, RunError, resolve_device
from training.data import MEMORY_FORMATS, data_fingerprint, load_data
from training.evaluate import eval_rows, evaluate
from training.optim import base_learning_rates, describe_schedule, lr_factor, make_optimizer, parameter_groups
from training.run_dir import log
from weighting import build_weighting


def run(args, raw=None):
    """The training script's run of ``args`` (parsed and checked by its ``parse_args``); ``raw``: the param file's
    JSON object, when the script has read it."""
    params = config.load_params(args.param_file, args.set, raw, {"epochs": args.epochs, "data_root": args.data_root})
    if args.dry_run:
        with torch.device("meta"):  # counts only: no memory (uniform scaling on 1645 CLEVR tasks has 12G parameters)
            model = build_model(params["model"], NUM_TASKS[params["setting"]], **config.model_kwargs(params))
        print(json.dumps(results.parameter_counts(params, model)))
        return 0
    summary_writer = tensorboard_log.writer_class() if args.tensorboard else None  # missing package: stop now
    device = resolve_device(args.device, params["tf32"])  # IEEE float32 on CUDA unless the params allow TF32
    engine = None
    if len(args.seeds) > 1 or args.cuda_graphs == "on":
        from training import engine as engines  # stacked seeds and CUDA graphs: only when asked for
        engine = engines.Engine(args, params, device)  # its one-line errors before any output dir is touched
    if distributed.launched():
        distributed.init(device)
    outs = run_dir.run_dirs(args.out, params["exp_id"], args.seeds)
    locked = []
    try:
        for out in outs:
            distributed.on_main(run_dir.prepare_output_dir, out, args.resume, args.command,
                                args.overwrite)
            locked.append(out)
        return train(args, params, device, outs, engine, summary_writer)
    except (config.ParamError, RunError, Interrupted) as err:  # into train.log too, once it is open
        run_dir.note(f"{'interrupted' if isinstance(err, Interrupted) else 'error'}: {err}")
        raise
    finally:
        run_dir.close_log()
        for out in locked:
            distributed.on_main(run_lock.release, out)


def build(params, seed, device):
    """(model, weighting, optimizer) of the run of ``seed`` as the training script starts it."""
    num_tasks = NUM_TASKS[params["setting"]]
    torch.manual_seed(seed)
    model = build_model(params["model"], num_tasks, **config.model_kwargs(params))
    model = model.to(device, memory_format=MEMORY_FORMATS[params["memory_format"]])
    weighting = None
    if params["weighting"] is not None:
        weighting = build_weighting(params["weighting"], num_tasks, params["weighting_options"]).to(device)
    return model, weighting, make_optimizer(params, parameter_groups(params, model, weighting))


class Run:
    """One run: its model, weighting and optimiser, and the processes that share its batches (under torchrun
    training/ddp.py's ranks, imported only there)."""

    mode = None

    def __init__(self, model, weighting, optimizer, seed):
        self.model, self.weighting, self.optimizer, self.seeds = model, weighting, optimizer, [seed]
        self.processes = loop.ONE_PROCESS
        if distributed.is_distributed():
            from training import ddp
            self.processes = ddp.DataParallel(model, weighting)

    def train_epoch(self, train, params, epoch, stats, locations, bar=iter):
        """[loop.Epoch] of the run's epoch ``epoch``; ``bar`` wraps its batch iteration (``progress.batch_bar``)."""
        return [loop.train_epoch(self.model, self.weighting, self.optimizer, train, params, self.seeds[0], epoch,
                                 stats, locations, bar, self.processes)]

    def evaluate(self, evaluation, images, labels):
        """[(accuracy [T], loss)] of ``evaluation`` (``training.evaluate.evaluate`` with its settings)."""
        return [evaluation(self.model, images, labels)]

    def states(self, r):
        """The run's (model, weighting, optimiser) state dicts."""
        return (self.model.state_dict(), self.weighting.state_dict() if self.weighting else {},
                self.optimizer.state_dict())

    def records(self):
        """[entries of the run's epoch record]: the weighting's task weights, the model's own (``epoch_record``)."""
        weights = {} if self.weighting is None else {"task_weights": self.weighting.weights().detach().cpu().tolist()}
        return [{**weights, **self.model.epoch_record()}]

    def name(self, r):
        """How a log line names run r: nothing for one run."""
        return ""


def train(args, params, device, outs, engine=None, summary_writer=None):
    """The runs of ``args.seeds`` in ``outs`` (locked by this process): build, resume, train, evaluate, write."""
    epochs = args.epochs or params["epochs"]
    runs = [build(params, seed, device) for seed in args.seeds]
    saved = run_dir.read_checkpoints(outs, params, args, epochs)
    if saved is None:
        return 0  # every run had finished
    distributed.on_main(run_dir.open_log, *outs)
    states = [run_dir.start_state(s, out, params, objects, args.command) for s, out, objects in zip(saved, outs, runs)]
    run_dir.check_same_epoch(args.seeds, states)
    group = Run(*runs[0], args.seeds[0]) if engine is None else engine.group(runs)
    splits = distributed.local_main_first(load_data, params, args.subset, args.data_root or params["data_root"])
    fingerprint = data_fingerprint(splits)
    run_dir.check_fingerprints(saved, outs, states, fingerprint, args.force)
    for state in states:
        state["data_fingerprint"] = fingerprint
    job = Job(args, params, epochs, device, outs, states, splits, group)
    info = results.run_info(args, params, epochs, device, fingerprint, runs[0][0], group.mode)
    log_start(job, info)
    fit(job, summary_writer)
    for r, (seed, out, state) in enumerate(zip(args.seeds, outs, states)):
        results.write_results(info, seed, state, params, out, group.name(r))
    return 0


class Job:
    """What the epochs of a training share: the arguments, params, run dirs, their states, the data on the device
    and the group of runs that trains."""

    def __init__(self, args, params, epochs, device, outs, states, splits, group):
        self.args, self.params, self.epochs, self.outs, self.states = args, params, epochs, outs, states
        self.group = group
        self.data = {split: (images.to(device), labels.to(device)) for split, (images, labels, _) in splits.items()}
        self.locations = splits["train"][2].to(device) if params["spatial_loss_weight"] > 0 else None
        self.stats = (LOADERS[params["dataset"]].mean, LOADERS[params["dataset"]].std)
        self.evaluation = partial(evaluate, num_tasks=NUM_TASKS[params["setting"]], rows=eval_rows(params, device),
                                  memory_format=MEMORY_FORMATS[params["memory_format"]], stats=self.stats,
                                  pairs=params["dataset"] != "multi_mnist", with_loss=True)  # pairs: see evaluate
        self.base_lrs = base_learning_rates(params, group.model)  # every optimiser group's, before the schedule
        self.kept = SELECTIONS[results.KEPT_MODEL[params["protocol"]]]  # the accuracy that picks best_model.pt


def log_start(job, info):
    """The run's first two log lines: what trains where, and how."""
    args, params, group = job.args, job.params, job.group
    processes = f" x {info['world_size']} processes" if distributed.is_distributed() else ""
    together = f", {len(args.seeds)} seeds stacked ({group.mode})" if len(args.seeds) > 1 else ""
    together += ", CUDA graphs" if getattr(group, "graphs", None) is not None else ""
    outs = job.outs[0] if len(job.outs) == 1 else job.outs[0].parent
    log(f"{params['exp_id']}: {params['method']} on {params['setting']}, {info['num_params']} params "
        f"(x{info['params_x']:.3f}), {len(job.data['train'][0])} train images, {info['device']}{processes}{together}, "
        f"out {outs}")
    log(f"{job.epochs} epochs from epoch {job.states[0]['epoch'] + 1}, {params['optimizer']} lr {params['lr']:g}, "
        f"batch {params['batch_size']}, {describe_schedule(params, job.epochs)}, seed "
        f"{', '.join(map(str, args.seeds))}" + (f", overrides: {' '.join(args.set)}" if args.set else ""))


def fit(job, summary_writer):
    """Every remaining epoch; TensorBoard scalars when asked for; Ctrl-C ends with the command that continues."""
    boards = [tensorboard_log.open_writer(summary_writer, out, state["epoch"]) for out, state in
              zip(job.outs, job.states)] if summary_writer and distributed.is_main() else []
    try:
        for epoch in range(job.states[0]["epoch"], job.epochs):
            train_one(epoch, job)
            for board, state in zip(boards, job.states):
                tensorboard_log.log_epoch(board, state["history"][-1])
    except KeyboardInterrupt:
        where = job.outs[0] if len(job.outs) == 1 else job.outs[0].parent / "seed*"
        raise Interrupted(results.interrupted_message(where, job.states[0]["epoch"], job.epochs,
                                                      job.args.command)) from None
    finally:
        for board in boards:
            board.close()


def train_one(epoch, job):
    """Trains and evaluates epoch ``epoch`` (0-based) of every run of the job, records it in its state and writes
    its epoch's files. The epoch time counts training and evaluation; in a stacked group a run's epoch time is the
    group's. A terminal shows the epoch's batches as a bar (``progress.batch_bar``)."""
    start, params, group = time.perf_counter(), job.params, job.group
    for param_group, base_lr in zip(group.optimizer.param_groups, job.base_lrs):
        param_group["lr"] = base_lr * lr_factor(params, epoch, job.epochs)
    epochs = group.train_epoch(job.data["train"], params, epoch, job.stats, job.locations,
                               progress.batch_bar(epoch, job.epochs))
    for r, bad in enumerate(epoch.bad for epoch in epochs):
        if bad is not None:
            raise RunError(nonfinite_message(bad, epoch, params, job.outs[r], job.states[r]))
    if group.weighting is not None:
        group.weighting.after_epoch()
    evaluated = (epoch + 1) % params["eval_every"] == 0 or epoch + 1 == job.epochs
    scores = {split: group.evaluate(job.evaluation, *job.data[split])
              for split in ("val", "test") if evaluated and split in job.data}  # no val split: the authors' protocol
    seconds = time.perf_counter() - start
    for r, (trained, extra) in enumerate(zip(epochs, group.records())):
        record = {"epoch": epoch + 1, "lr": group.optimizer.param_groups[0]["lr"], "train_loss": trained.loss}
        for split, per_run in scores.items():
            accuracy, loss = per_run[r]
            record.update({f"{split}_acc_mean": float(accuracy.nanmean()), f"{split}_loss": float(loss),
                           f"{split}_acc_per_task": accuracy.tolist()})
        job.states[r]["wall_time_s"] += seconds
        record.update({"epoch_time_s": round(seconds, 3),
                       "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **extra})
        finish_epoch(job, r, record, evaluated, seconds)


def finish_epoch(job, r, record, evaluated, seconds):
    """Run r's epoch record into its state, its files (best_model.pt on a new best, checkpoint.pt, metrics.jsonl)
    and its log line, which ends with the time the run has left (``progress.seconds_left`` of its history, the
    records of its metrics.jsonl, a resumed run's earlier epochs included)."""
    state, kept, params = job.states[r], job.kept, job.params
    state["history"].append(record)
    best = evaluated and (state["best"] is None or record[kept] > state["best"][kept])
    if best:
        state["best"] = record
    state["epoch"] = record["epoch"]
    distributed.on_main(run_dir.save_epoch, job.outs[r], job.group.states(r), params, job.args,
                        job.group.seeds[r], job.epochs, state, best)
    scores = f"(evaluated every {params['eval_every']} epochs)"
    if evaluated:
        now = "  ".join(f"{split} {record[f'{split}_acc_mean']:.2f}" for split in ("val", "test") if split in job.data)
        scores = f"{now}  (best {kept.split('_')[0]} {state['best'][kept]:.2f} at epoch {state['best']['epoch']})"
    left = progress.duration(progress.seconds_left(state["history"], job.epochs))
    log(f"{job.group.name(r)}epoch {record['epoch']}/{job.epochs}  loss {record['train_loss']:.4f}  {scores}  "
        f"{seconds:.1f}s  left {left}")


def nonfinite_message(bad, epoch, params, out, state):
    """The one line that stops a run at its first non-finite loss (``loop.Epoch.bad``)."""
    if "tasks" in bad:
        where = f"tasks drawn in that batch {bad['tasks']}"
    else:
        values = bad["task_losses"]
        where = f"non-finite loss of tasks {[t for t, v in enumerate(values) if not math.isfinite(v)]}, " \
                f"task losses {[float(f'{v:.4g}') for v in values]}"
    kept = f"the last good checkpoint (epoch {state['epoch']}) is {out / 'checkpoint.pt'}" if state["epoch"] else \
        "no epoch finished, so no checkpoint was written"
    return (f"non-finite loss at epoch {epoch + 1}, step {bad['step'] + 1}, method '{params['method']}' ({where}); "
            f"stopped without saving this epoch; {kept}")
