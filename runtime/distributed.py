"""Data-parallel training over several processes started by torchrun (DistributedDataParallel).

How a run is split (train_multi_task_counter_stream.py): every rank holds the whole data set and draws the same
epoch order and per-sample tasks as one process would; each global batch is cut into ``world_size`` contiguous
parts (``shard``), one per rank. A rank divides its summed loss by the global batch's valid-label count divided
by ``world_size``, so that the ranks' losses average to the global batch's loss and DDP's averaged gradient is
the single-process gradient. Evaluation is sharded the same way, its counts summed. Only rank 0 touches the
output dir (``on_main``). Every function works unchanged in a single process, where it does nothing.
"""
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


def launched():
    """Whether torchrun started this process (it sets WORLD_SIZE, RANK and LOCAL_RANK)."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def local_rank():
    return int(os.environ.get("LOCAL_RANK", "0"))


def init(device):
    """Joins the process group (address and rank from torchrun's environment): NCCL on CUDA, gloo on CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def shutdown():
    """Leaves the process group, all ranks together (the barrier: none closes its connections while another
    still receives, e.g. rank 0's last broadcast)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def exit_process(code):
    """Ends the process with ``code``. A torchrun process skips the interpreter's teardown, in which gloo now
    and then aborts a finished run ("terminate called without an active exception", torch 2.13), which
    torchrun reports as a failure; every output is written and flushed by then."""
    if not launched():
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_distributed() else 0


def world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_main():
    return rank() == 0


def wrap(model, device):
    """The DDP wrapper, whose forward makes the following backward average the gradients over the ranks (the
    model itself in one process)."""
    if not is_distributed():
        return model
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def unwrap(model):
    """The model inside a DDP wrapper (for ``trunk``, ``heads``, ``last_shared_layer``, ...)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def shard(tensor):
    """This rank's part of ``tensor``: dim 0 cut into ``world_size`` contiguous parts of near-equal sizes."""
    return tensor.tensor_split(world_size())[rank()]


def mean(tensor):
    """The average of ``tensor`` over the ranks (a new tensor, outside autograd)."""
    if not is_distributed():
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total / world_size()


def sum_(tensor):
    """Sums ``tensor`` over the ranks in place."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def average_gradients(parameters):
    """Averages ``.grad`` over the ranks, for parameters outside the DDP wrapper (the loss weightings')."""
    for parameter in parameters:
        if parameter.grad is not None:
            parameter.grad.copy_(mean(parameter.grad))


def cat(tensor):
    """The ranks' ``tensor`` [..., D_r] concatenated along the last dimension in rank order, [..., sum of D_r] (D_r
    may differ)."""
    if not is_distributed():
        return tensor
    widths = [torch.zeros(1, dtype=torch.int64, device=tensor.device) for _ in range(world_size())]
    dist.all_gather(widths, torch.tensor([tensor.shape[-1]], device=tensor.device))
    widths = [int(width) for width in widths]
    padded = torch.nn.functional.pad(tensor.detach(), (0, max(widths) - tensor.shape[-1])).contiguous()
    parts = [torch.empty_like(padded) for _ in widths]
    dist.all_gather(parts, padded)
    return torch.cat([part[..., :width] for part, width in zip(parts, widths)], dim=-1)


def on_main(fn, *args):
    """``fn(*args)`` on rank 0 only (output-dir checks, checkpoint reads and writes); every rank returns its
    result or raises its exception, so that an error stops all ranks alike instead of leaving some at a
    barrier. Also a barrier: no rank goes on before rank 0 is done."""
    if not is_distributed():
        return fn(*args)
    outcome = [None, None]
    if is_main():
        try:
            outcome = [fn(*args), None]
        except Exception as err:  # noqa: BLE001 - re-raised on every rank, rank 0 included
            outcome = [None, err]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def local_main_first(fn, *args):
    """``fn(*args)`` on every rank, on each node's local rank 0 first (so that only it fills the data cache). If it
    fails on some rank, it fails on all: each raises its own exception, or else the first failed rank's."""
    if not is_distributed():
        return fn(*args)
    first = local_rank() == 0
    if not first:
        dist.barrier()
    try:
        result, error = fn(*args), None
    except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
        result, error = None, err
    if first:
        dist.barrier()
    errors = [None] * world_size()
    dist.all_gather_object(errors, error)
    error = error or next((err for err in errors if err is not None), None)
    if error is not None:
        raise error
    return result
