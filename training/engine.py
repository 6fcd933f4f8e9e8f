"""The engines around one run's step, imported only when asked for: stacked seeds (``--seeds``: R runs of one
method that differ only in their seed, trained in one process as one stacked model, training/stacked.py) and the
step replayed as a CUDA graph (``--cuda_graphs``, training/step_graph.py; a single run with ``on`` trains as a stack
of one). Both train in one process; torchrun's data parallelism is the single run's (training/loop.py).

The stacked step is the single run's step (``training.loop.train_epoch``) over a leading replica dimension [R, ...],
written from device tensors only, so that a CUDA graph can replay it: the batch is picked by a step index tensor
that the step advances, and the losses and the first non-finite step of every run are kept on the device. The model's
training hooks (models/hooks.py) are those of one run, called on the stacked model, which runs them for every replica:
``before_step`` eagerly before every step (it writes in place what the forward pass reads), ``after_backward`` inside
the step. Run r's data order, task draws and model noise depend only on
(seeds[r], epoch), as its separate run's, so a stacked run is its separate run and resuming it is exact.
"""
import torch

import losses
from loaders import NUM_TASKS
from runtime import distributed
from training import config, loop, step_graph
from training.data import MEMORY_FORMATS, MNIST_STATS, normalize
from training.stacked import replica_optimizer_state, stack_runs
from weighting.batched import STACKED_WEIGHTINGS
from weighting.min_norm_solvers import MAX_BATCHED_TASKS

# --stack_mode auto: 'loop' on CPU (benchmarks/bench_stacked.py: vmap's grouped convolutions are 1.1-2.9x slower
# there), 'vmap' on CUDA (fewer kernel launches; measured by benchmarks/gpu_allocation.py)
AUTO_STACK_MODES = {"cpu": "loop", "cuda": "vmap"}


class Engine:
    """The checked choice of ``args`` (``--seeds``, ``--stack_mode``, ``--cuda_graphs``) for ``params`` on
    ``device``; ``ParamError`` (one line) for a combination that cannot train."""

    def __init__(self, args, params, device):
        self.graphs = step_graph.build(args.cuda_graphs, device, len(args.seeds), params)
        check_stackable(params, NUM_TASKS[params["setting"]], args.stack_mode,
                        "--seeds" if len(args.seeds) > 1 else "--cuda_graphs on")
        self.seeds, self.params = args.seeds, params
        self.mode = args.stack_mode if args.stack_mode != "auto" else \
            "loop" if params["dropout"] != "none" else AUTO_STACK_MODES.get(device.type, "loop")

    def group(self, runs):
        """The ``StackedGroup`` of ``runs`` (their (model, weighting, optimizer), resumed where they resume)."""
        return StackedGroup(runs, self.params, self.seeds, self.mode, self.graphs)


def check_stackable(params, num_tasks, mode, flag="--seeds"):
    """A stacked group (``--seeds``, or a single run under ``--cuda_graphs on``: a stack of one; ``flag`` names
    the one given) trains in one process a method whose weighting has a stacked form, without the localisation
    loss, and draws dropout masks in stacking mode 'loop' only; ParamError (one line) otherwise."""
    alone = "one --seed per run" if flag == "--seeds" else "--cuda_graphs auto or off"
    if distributed.launched():
        raise config.ParamError(f"{flag}: a stacked group trains in one process; start it with python, not torchrun "
                                f"(or give torchrun one --seed)")
    if params["spatial_loss_weight"] > 0:
        raise config.ParamError(f"{flag}: the localisation loss (spatial_loss_weight > 0) is not stacked; allowed: "
                                f"{alone}")
    if params["weighting"] is not None and params["weighting"] not in STACKED_WEIGHTINGS:
        raise config.ParamError(f"{flag}: weighting '{params['weighting']}' has no stacked form; allowed: "
                                f"{', '.join(STACKED_WEIGHTINGS)}, or {alone}")
    if params["weighting"] == "mgda" and num_tasks > MAX_BATCHED_TASKS:
        raise config.ParamError(f"{flag}: stacked MGDA (its host-free solver) solves up to {MAX_BATCHED_TASKS} "
                                f"tasks, setting '{params['setting']}' has {num_tasks}; allowed: {alone}")
    if params["dropout"] != "none" and mode == "vmap":
        raise config.ParamError("--stack_mode: 'vmap' cannot draw dropout masks per replica; allowed: auto, loop")


class StackedGroup:
    """R runs trained as one stacked model (``stacked.stack_runs``), with the methods of ``training.trainer.Run``:
    every replica reads and writes the files of its separate run. ``graphs``: the ``step_graph.StepGraph`` of the
    step, or None."""

    def __init__(self, runs, params, seeds, mode, graphs=None):
        self.seeds, self.mode, self.graphs = seeds, mode, graphs
        self.model = runs[0][0]  # a separate run's model: every replica is evaluated in it
        self.stack, self.weighting, self.optimizer = stack_runs(runs, params, mode)

    def train_epoch(self, train, params, epoch, stats, locations=None, progress=iter):
        return train_stacked_epoch(self.stack, self.weighting, self.optimizer, train, params, self.seeds, epoch,
                                   stats, self.graphs, progress)

    def evaluate(self, evaluation, images, labels):
        """Every replica evaluated in a separate run's model holding its weights: the separate run's figures."""
        figures = []
        for r in range(len(self.seeds)):
            self.model.load_state_dict(self.stack.replica_state_dict(r))
            figures.append(evaluation(self.model, images, labels))
        return figures

    def states(self, r):
        """Run r's (model, weighting, optimiser) state dicts, as its separate run holds them."""
        return (self.stack.replica_state_dict(r), self.weighting.replica_state_dict(r) if self.weighting else {},
                replica_optimizer_state(self.optimizer, r))

    def records(self):
        records = [{} for _ in self.seeds]
        if self.weighting is not None:
            for record, weights in zip(records, self.weighting.weights().detach().cpu().tolist()):
                record["task_weights"] = weights
        return [{**record, **own} for record, own in zip(records, self.stack.epoch_records())]

    def name(self, r):
        """How a log line names run r: its seed (nothing for a single run replayed as a CUDA graph)."""
        return f"seed {self.seeds[r]}: " if len(self.seeds) > 1 else ""


def train_stacked_epoch(model, weighting, optimizer, train, params, seeds, epoch, stats=MNIST_STATS, graphs=None,
                        progress=iter):
    """One epoch of the R runs ``seeds`` stacked in ``model`` (a ``stacked.StackedModel``; ``weighting`` a
    ``weighting.batched.StackedWeighting`` or None): ``loop.train_epoch`` of every run at once. A full batch's step
    is a function of device tensors only (``stacked_step``), captured as a CUDA graph when ``graphs`` (a
    ``step_graph.StepGraph``) is given; the last, partial batch takes the same step eagerly. ``progress`` wraps the
    iteration over the batches (as ``loop.train_epoch``'s). Returns every run's ``loop.Epoch``."""
    images, labels = train
    n, batch_size, replicas = len(images), params["batch_size"], len(seeds)
    steps, full = -(-n // batch_size), n // batch_size
    live = epoch_tensors(model, weighting, labels, seeds, epoch)
    if graphs is not None:
        live = graphs.stage(live, (images.data_ptr(), labels.data_ptr(), n, batch_size, id(model), id(weighting),
                                   id(optimizer), tuple(map(id, model.noise_generators()))))
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]

    def gradients(batch):
        stacked_step(model, weighting, optimizer, images, labels, params, stats, live, batch)
        return [parameter.grad for parameter in parameters]

    def full_batch():  # batch number live["step"] of the epoch's order
        return gradients(live["orders"][:, :full * batch_size].view(replicas, full, batch_size)
                         .index_select(1, live["step"])[:, 0])

    def update():
        optimizer.step()
        if weighting is not None:
            weighting.after_step()

    model.train()
    for step in progress(range(steps)):
        model.before_step(epoch * steps + step, params.get("router_options"))
        if step == full:
            gradients(live["orders"][:, full * batch_size:])  # the partial batch
            update()
        elif graphs is not None:
            graphs.step(full_batch, update, parameters, model.noise_generators())
        else:
            full_batch()
            update()
    tasks = live["tasks"]
    return [loop.Epoch(float(total) / steps, loop.first_bad_step(bad, bad_losses, order,
                                                                 None if tasks is None else tasks[r], batch_size))
            for r, (total, bad, bad_losses, order) in enumerate(zip(live["loss_sum"].tolist(),
                                                                    live["first_bad"].tolist(), live["bad_losses"],
                                                                    live["orders"]))]


def epoch_tensors(model, weighting, labels, seeds, epoch):
    """The device tensors that the stacked step reads and updates this epoch: every run's data order and task
    draws [R, N] (``loop.epoch_generator``), the step index, the loss sums, first non-finite steps and their losses;
    seeds the replicas' own noise (``loop.epoch_seed``)."""
    device, replicas = labels.device, len(seeds)
    generators = [loop.epoch_generator(seed, epoch) for seed in seeds]
    model.seed_noise([loop.epoch_seed(seed, epoch) for seed in seeds])  # the model's own draws (Gumbel, dropout)
    orders = torch.stack([torch.randperm(len(labels), generator=g) for g in generators]).to(device)  # [R, N]
    tasks = None
    if weighting is None:
        valid = (labels >= 0).cpu()
        tasks = torch.stack([loop.draw_tasks(valid, g) for g in generators]).to(device)  # [R, N]
    return {"orders": orders, "tasks": tasks,
            "step": torch.zeros(1, dtype=torch.int64, device=device),
            "loss_sum": torch.zeros(replicas, device=device),
            "first_bad": torch.full((replicas,), -1, dtype=torch.int64, device=device),
            "bad_losses": torch.zeros(replicas, 1 if weighting is None else labels.shape[1], dtype=model.dtype,
                                      device=device)}


def stacked_step(model, weighting, optimizer, images, labels, params, stats, live, batch):
    """The gradients of one step of every run on ``batch`` [R, B] (indices into ``images``), from device tensors
    only (``epoch_tensors``); advances ``live["step"]`` by one after adding the losses to ``live``."""
    x = normalize(images[batch.flatten()], MEMORY_FORMATS[params["memory_format"]], stats).to(model.dtype) \
        .unflatten(0, batch.shape)
    optimizer.zero_grad(set_to_none=True)
    if weighting is None:
        t = live["tasks"].gather(1, batch)
        divisors = model.per_replica(loop.loss_divisor, labels[batch, t])
        loss = model.per_replica(losses.masked_cross_entropy, model(x, t), labels[batch, t].long(), divisors)
        loss.sum().backward()
        task_losses = loss.detach()[:, None]
    else:
        divisors = model.per_replica(loop.loss_divisor, labels[batch])
        task_losses = weighting.backward(model, x, labels[batch].long(), divisors)
    model.after_backward(params.get("router_options"))
    step_loss = task_losses.mean(dim=1)
    live["loss_sum"].add_(step_loss)
    newly_bad = (live["first_bad"] < 0) & ~torch.isfinite(step_loss)
    live["first_bad"].copy_(torch.where(newly_bad, live["step"], live["first_bad"]))
    live["bad_losses"].copy_(torch.where(newly_bad[:, None], task_losses, live["bad_losses"]))
    live["step"].add_(1)

