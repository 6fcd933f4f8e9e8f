"""Common interface of the loss-weighting strategies (LibMTL-style: weighting is separate from the model)."""
import torch.nn as nn

from losses import per_task_cross_entropy


class Weighting(nn.Module):
    """A rule that turns the T task losses of a multi-branch model into parameter gradients.

    Learnable state (task weights, log-variances) lives in parameters/buffers of the module, so it is part of
    ``state_dict()``; its parameters go into the same optimiser as the model's. ``backward`` accumulates into
    ``.grad`` like ``loss.backward()``: the caller zeroes the gradients before and steps the optimiser after.

    A rule is either ``combine`` of the task losses (``combines_losses``: this class's ``backward``) or a
    ``backward`` of its own (task gradients). Either is written once, for one run; stacked seeds run it over their
    replicas (weighting/batched.py).

    A rule is written for one process. Where several processes share each global batch (torchrun, training/ddp.py),
    each runs the rule on its part of the batch, and their gradients are averaged after ``backward``; a rule that
    computes from statistics of the batch (task gradients, losses) first makes them the global batch's with
    ``reduce``, which that layer sets (in one process it returns its argument).
    """

    combines_losses = True  # the rule is ``combine`` of the task losses (False: a ``backward`` of its own)
    needs_trunk = False  # the rule calls the model's ``trunk`` and ``heads`` (a shared trunk: multi-branch models)
    stackable = False  # stacked seeds can run the rule over their replicas (weighting/batched.py)
    sync_free = False  # set by an engine that must not wait for the host (stacked seeds, CUDA graphs)

    def __init__(self, num_tasks):
        super().__init__()
        self.num_tasks = num_tasks

    def combine(self, losses):
        """Scalar training loss from the per-task losses [T]."""
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

    def reduce(self, statistic, per_image=False):
        """The global batch's value of ``statistic``, which this process computed from its part of the batch: the
        statistic itself in one process (training/ddp.py sets the ranks' average; ``per_image``: a statistic with one
        column per image of the part along its last dimension, whose columns are gathered)."""
        return statistic

    def check_stackable(self):
        """ValueError (one line) where this rule's stacked form cannot serve its setting (default: nothing)."""

    def after_step(self):
        """Called after the optimiser step (default: nothing)."""

    def after_epoch(self):
        """Called after each training epoch, before the checkpoint is written (default: nothing)."""

    def weights(self):
        """Current task weights [T], for logging."""
        raise NotImplementedError

