"""Common interface of the loss-weighting strategies (LibMTL-style: weighting is separate from the model)."""
import torch.nn as nn
from torch.func import vmap

from losses import per_task_cross_entropy


class Weighting(nn.Module):
    """A rule that turns the T task losses of a multi-branch model into parameter gradients.

    Learnable state (task weights, log-variances) lives in parameters/buffers of the module, so it is part of
    ``state_dict()``; its parameters go into the same optimiser as the model's. ``backward`` accumulates into
    ``.grad`` like ``loss.backward()``: the caller zeroes the gradients before and steps the optimiser after.

    A rule with ``stackable`` (the paper's Table 2: sum, uniform, kendall, gradnorm, mgda) is written once for R runs
    at once, every tensor with a leading run dimension: ``combine`` of losses [R, T], or ``backward_runs``. Its state
    is [T] in a run and [R, T] in its stacked form (weighting/batched.py: R runs trained as one stacked model).

    Under DDP (see runtime/distributed.py) ``model`` is the DDP wrapper and each rank's task losses average to the global
    batch's, so a rule linear in the losses (uniform, sum, kendall) is exact with DDP's averaged gradients; the
    caller averages the weighting's own gradients. Rules that use task gradients (GradNorm, MGDA) take them with
    ``autograd.grad``, which DDP does not synchronise, and combine them over the ranks themselves.
    """

    stackable = False  # whether ``combine`` / ``backward_runs`` serve R stacked runs (weighting/batched.py)

    def __init__(self, num_tasks):
        super().__init__()
        self.num_tasks = num_tasks

    def combine(self, losses):
        """Scalar training loss from the per-task losses [T] (a stackable rule: also [R, T], summed over the runs)."""
        raise NotImplementedError

    def backward(self, model, images, labels, num_valid=None, locations=None):
        """Forward and backward of ``combine(losses)``; returns the per-task losses [T], detached (this rank's
        under DDP). ``num_valid``: divisor of the summed task losses (see ``per_task_cross_entropy``).
        ``locations`` (the 'loc' variants, Table 3): the step's ``losses.LocationTargets``; the per-task location
        losses [T] of the model's regressed locations [B, T, 2] are added to the classification losses before they
        are combined."""
        if locations is None:
            losses = per_task_cross_entropy(model(images), labels, num_valid)
        else:
            logits, where = model(images, with_location=True)
            losses = per_task_cross_entropy(logits, labels, num_valid) + locations.loss(where)
        self.combine(losses).backward()
        return losses.detach()

    def backward_runs(self, runs, images, labels, num_valid):
        """``backward`` of R runs at once (a stackable rule): ``runs`` is the model of R runs (a stacked model,
        training/stacked.py), images [R, B, ...], labels [R, B, T], ``num_valid`` [R, T]; returns the
        per-task losses [R, T], detached."""
        losses = task_losses(runs(images), labels, num_valid)
        self.combine(losses).backward()
        return losses.detach()

    def check_stackable(self):
        """ValueError (one line) where this rule's stacked form cannot serve its setting (default: nothing)."""

    def after_step(self):
        """Called after the optimiser step (default: nothing)."""

    def after_epoch(self):
        """Called after each training epoch, before the checkpoint is written (default: nothing)."""

    def weights(self):
        """Current task weights [T], for logging (a stacked form's: [R, T] where they are state, else [T])."""
        raise NotImplementedError


def task_losses(logits, labels, num_valid):
    """Per-task cross-entropy [R, T] of R stacked runs' logits [R, B, T, C], under ``vmap``: the gradients then have
    the layout of a separate run's (a stacked replica steps as its run to the bit, in float32 too)."""
    return vmap(per_task_cross_entropy)(logits, labels, num_valid)
