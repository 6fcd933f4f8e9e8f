"""One run's training epoch, in plain eager PyTorch: draw the batch, forward, the loss (or the weighting's backward),
the optimiser step. The run's data order and task draws come from ``epoch_generator(seed, epoch)`` and the model's
own draws (Gumbel samples, dropout masks) from torch's generator seeded with ``epoch_seed(seed, epoch)``, so an epoch
depends only on (seed, epoch) and a resumed run continues exactly. What a model needs beyond its forward pass
(the Gumbel-matrix temperature and budget gradient) it does in its hooks (``models.hooks.TrainingHooks``).

The step is that of one process. What changes when several processes share each global batch (torchrun) is asked of
``processes``: this process's part of the batch (``shard``), the number of processes that divide the summed losses
(``world_size``, see ``loss_divisor``), the average of the gradients after the backward pass (``synchronize``) and
of the task losses for the record (``mean``). ``OneProcess`` answers for one process, where each does nothing;
training/ddp.py answers under torchrun. Stacked seeds and CUDA graphs wrap this step in training/engine.py.
"""
from typing import NamedTuple, Optional

import numpy as np
import torch
import losses
from training.data import MEMORY_FORMATS, MNIST_STATS, normalize


class Epoch(NamedTuple):
    """What an epoch returns: the mean training loss over its steps, and its first step with a non-finite loss
    (``{"step": 0-based, "tasks": the tasks drawn in that batch}`` or ``{"step", "task_losses"}``), else None."""
    loss: float
    bad: Optional[dict]


class OneProcess:
    """The processes that share a global batch, when there is one: it trains on the whole batch, and its losses and
    gradients are already the global batch's (training/ddp.py's ``DataParallel`` answers the same under torchrun)."""

    world_size = 1

    def shard(self, batch):
        """This process's part of the global batch's indices ``batch``."""
        return batch

    def mean(self, tensor):
        """The average of ``tensor`` over the processes."""
        return tensor

    def synchronize(self, parameters):
        """After the backward pass: averages ``.grad`` of ``parameters`` over the processes."""


ONE_PROCESS = OneProcess()


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


def train_epoch(model, weighting, optimizer, train, params, seed, epoch, stats=MNIST_STATS, locations=None,
                progress=iter, processes=ONE_PROCESS):
    """One epoch of one run on ``train`` = (images, labels) on the device. ``weighting`` None: a single-branch model,
    one task drawn per image; else a multi-branch model and its loss weighting. ``locations`` (float [N, T, 2]) adds
    the localisation loss (``losses.location_loss``), weighted by ``spatial_loss_weight``. ``progress`` wraps the
    iteration over the batches (the training script's progress bar: ``training.progress.batch_bar``). ``processes``:
    the processes that share every global batch (``OneProcess``, or training/ddp.py's under torchrun). Returns
    ``Epoch(mean loss, first bad step)``; a non-finite loss does not stop the epoch (the caller reports it)."""
    images, labels = train
    generator = epoch_generator(seed, epoch)
    torch.manual_seed(epoch_seed(seed, epoch))  # the model's own draws
    order = torch.randperm(len(images), generator=generator).to(images.device)
    tasks = None if weighting is not None else draw_tasks((labels >= 0).cpu(), generator).to(images.device)
    batch_size, steps = params["batch_size"], -(-len(images) // params["batch_size"])
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    model.train()
    loss_sum, first_bad, bad_losses = torch.zeros((), device=images.device), torch.tensor(-1, device=images.device), \
        torch.zeros((), device=images.device)
    for step in progress(range(steps)):
        batch = order[step * batch_size:(step + 1) * batch_size]  # the global batch, the same for any world size
        optimizer.zero_grad(set_to_none=True)
        model.before_step(epoch * steps + step, params.get("router_options"))
        if weighting is None:
            task_losses = single_branch_backward(model, images, labels, tasks, batch, params, stats, locations,
                                                 processes)
        else:
            task_losses = weighted_backward(model, weighting, images, labels, batch, params, stats, locations,
                                            processes)
        processes.synchronize(parameters)  # the gradients of the global batch
        model.after_backward(params.get("router_options"))
        optimizer.step()
        if weighting is not None:
            weighting.after_step()
        task_losses = processes.mean(task_losses)
        loss_sum += task_losses.mean()
        keep = (first_bad >= 0) | torch.isfinite(task_losses).all()  # on the device: no wait for the step
        first_bad, bad_losses = first_bad.where(keep, step), bad_losses.where(keep, task_losses)
    return Epoch(float(loss_sum) / steps, first_bad_step(int(first_bad), bad_losses, order, tasks, batch_size))


def first_bad_step(step, task_losses, order, tasks, batch_size):
    """``Epoch.bad`` of the epoch's first non-finite step (-1: none)."""
    if step < 0:
        return None
    if tasks is not None:
        return {"step": step, "tasks": sorted(set(tasks[order[step * batch_size:(step + 1) * batch_size]].tolist()))}
    return {"step": step, "task_losses": task_losses.tolist()}


def inputs(model, images, index, params, stats):
    """The normalised images of ``index``, in the model's precision."""
    dtype = next(model.parameters()).dtype
    return normalize(images[index], MEMORY_FORMATS[params["memory_format"]], stats).to(dtype)


def single_branch_backward(model, images, labels, tasks, batch, params, stats, locations, processes):
    """Forward and backward of a single-branch model on this process's images of the global batch ``batch``, each
    image with its drawn task; its loss [1]."""
    index, world_size = processes.shard(batch), processes.world_size
    x, t = inputs(model, images, index, params, stats), tasks[index]
    y, divisor = labels[index, t].long(), loss_divisor(labels[batch, tasks[batch]], world_size)
    if locations is None:
        loss = losses.masked_cross_entropy(model(x, t), y, divisor)
    else:
        logits, where = model(x, t, **{model.location_output: True})
        targets = losses.LocationTargets(locations[index, t], locations[batch, tasks[batch]], x.shape[-1],
                                         params["spatial_loss_weight"], world_size)
        loss = losses.masked_cross_entropy(logits, y, divisor) + targets.loss(where)
    loss.backward()
    return loss.detach()[None]


def weighted_backward(model, weighting, images, labels, batch, params, stats, locations, processes):
    """The weighting's backward of a multi-branch model on this process's images of the global batch ``batch``; the
    per-task losses [T]."""
    index, world_size = processes.shard(batch), processes.world_size
    located = {} if locations is None else {"locations": losses.LocationTargets(
        locations[index], locations[batch], images.shape[-1], params["spatial_loss_weight"], world_size)}
    return weighting.backward(model, inputs(model, images, index, params, stats), labels[index].long(),
                              loss_divisor(labels[batch], world_size), **located)


def loss_divisor(labels, world_size=1):
    """What a process divides its summed losses by: the valid labels (per task) of the whole global batch, over the
    number of processes that share it. Their losses then average to the global batch's loss, and so do their
    gradients: the same step as one process, also when their parts hold different numbers of valid labels
    (by-reference tasks)."""
    return (labels >= 0).sum(0).clamp(min=1) / world_size
