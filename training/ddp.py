"""Data parallelism under torchrun: what one run's step (training/loop.py) asks of the processes that share every
global batch, answered for ``world_size`` ranks. Imported only when torchrun started the run.

Every rank holds the whole data set, the same model and weighting (rank 0's, broadcast at the start) and draws the
same epoch order and per-image tasks as one process would. Each global batch is cut into ``world_size`` contiguous
parts, one per rank (``shard``). A rank divides its summed losses by the global batch's valid-label count over
``world_size`` (``training.loop.loss_divisor``), so that the ranks' losses average to the global batch's loss; after
the backward pass every gradient of the optimiser's parameters (the model's and the weighting's) is averaged over the
ranks in one all-reduce (``synchronize``): the single-process gradient, whatever the weighting wrote into ``.grad``
(the rules on task gradients take them with ``autograd.grad`` and set ``.grad`` themselves, which DDP's gradient
hooks would not see). The model's buffers (batch-norm statistics) are then rank 0's on every rank, as DDP's
``broadcast_buffers`` makes them. A weighting whose rule reads statistics of the batch (task gradients, losses) gets
the global batch's through its ``reduce`` hook, which this layer sets (``Weighting.reduce``: the identity in one
process).
"""
import torch
import torch.distributed as dist

from runtime import distributed


class DataParallel:
    """The ranks of the process group that share every global batch (``training.loop.OneProcess``'s methods), and
    the ``reduce`` hook of ``weighting``. Broadcasts rank 0's model and weighting to every rank."""

    def __init__(self, model, weighting=None):
        self.world_size, self.rank = distributed.world_size(), distributed.rank()
        self.buffers = list(model.buffers())
        modules = [model] if weighting is None else [model, weighting]
        with torch.no_grad():
            for tensor in [t for module in modules for t in [*module.parameters(), *module.buffers()]]:
                broadcast_(tensor)
        if weighting is not None:
            weighting.reduce = self.reduce

    def shard(self, batch):
        """This rank's part of ``batch``: dim 0 cut into ``world_size`` contiguous parts of near-equal sizes."""
        return batch.tensor_split(self.world_size)[self.rank]

    def mean(self, tensor):
        """The average of ``tensor`` over the ranks (a new tensor, outside autograd)."""
        total = tensor.detach().clone()
        dist.all_reduce(total)
        return total / self.world_size

    def synchronize(self, parameters):
        """Averages ``.grad`` of ``parameters`` over the ranks, all of them in one all-reduce (every rank's step
        writes the gradients of the same parameters); then rank 0's model buffers to every rank."""
        grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
        if grads:
            flat = torch.cat([grad.flatten() for grad in grads])
            dist.all_reduce(flat)
            flat /= self.world_size
            for grad, part in zip(grads, flat.split([grad.numel() for grad in grads])):
                grad.copy_(part.view(grad.shape))
        for buffer in self.buffers:
            broadcast_(buffer)

    def reduce(self, statistic, per_image=False):
        """``Weighting.reduce`` under torchrun: the global batch's value of ``statistic``, which this rank computed
        from its part of the batch. A rank's losses are ``world_size`` times its share of the global batch's losses
        (``loss_divisor``), and so are their gradients: the global batch's is the ranks' average, or, for a statistic
        with one column per image of the rank's part (``per_image``: the gradients with respect to the shared
        representation, [..., D_r]), the ranks' columns side by side in rank order [..., sum of D_r] over
        ``world_size``."""
        if not per_image:
            return self.mean(statistic)
        return gather_columns(statistic) / self.world_size


def broadcast_(tensor):
    """Sets ``tensor`` to rank 0's in place (a channels_last tensor through a contiguous copy)."""
    if tensor.is_contiguous():
        dist.broadcast(tensor, src=0)
    else:
        copy = tensor.contiguous()
        dist.broadcast(copy, src=0)
        tensor.copy_(copy)


def gather_columns(tensor):
    """The ranks' ``tensor`` [..., D_r] concatenated along the last dimension in rank order, [..., sum of D_r] (D_r
    may differ)."""
    widths = [torch.zeros(1, dtype=torch.int64, device=tensor.device) for _ in range(distributed.world_size())]
    dist.all_gather(widths, torch.tensor([tensor.shape[-1]], device=tensor.device))
    widths = [int(width) for width in widths]
    padded = torch.nn.functional.pad(tensor.detach(), (0, max(widths) - tensor.shape[-1])).contiguous()
    parts = [torch.empty_like(padded) for _ in widths]
    dist.all_gather(parts, padded)
    return torch.cat([part[..., :width] for part, width in zip(parts, widths)], dim=-1)
