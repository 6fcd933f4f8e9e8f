"""Common interface of the loss-weighting strategies (LibMTL-style: weighting is separate from the model)."""
import torch.nn as nn

from losses import per_task_cross_entropy


class Weighting(nn.Module):
    """A rule that turns the T task losses of a multi-branch model into parameter gradients.

    Learnable state (task weights, log-variances) lives in parameters/buffers of the module, so it is part of
    ``state_dict()``; its parameters go into the same optimiser as the model's. ``backward`` accumulates into
    ``.grad`` like ``loss.backward()``: the caller zeroes the gradients before and steps the optimiser after.
    """

    def __init__(self, num_tasks):
        super().__init__()
        self.num_tasks = num_tasks

    def combine(self, losses):
        """Scalar training loss from the per-task losses [T]."""
        raise NotImplementedError

    def backward(self, model, images, labels):
        """Forward and backward of ``combine(losses)``; returns the per-task losses [T], detached."""
        losses = per_task_cross_entropy(model(images), labels)
        self.combine(losses).backward()
        return losses.detach()

    def after_step(self):
        """Called after the optimiser step (default: nothing)."""

    def weights(self):
        """Current task weights [T], for logging."""
        raise NotImplementedError
