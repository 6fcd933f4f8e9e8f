"""The processes of a run started by torchrun: joining and leaving the process group, ranks, and the calls that
keep them together outside the training step (whose data parallelism is training/ddp.py's).

Evaluation is sharded by rank (``shard``), its counts summed (``sum_``). Only rank 0 touches the output dir
(``on_main``); the data cache is filled by each node's first rank (``local_main_first``). Every function works
unchanged in a single process, where it does nothing.
"""
import os
import sys

import torch
import torch.distributed as dist

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


def shard(tensor):
    """This rank's part of ``tensor``: dim 0 cut into ``world_size`` contiguous parts of near-equal sizes."""
    return tensor.tensor_split(world_size())[rank()]


def sum_(tensor):
    """Sums ``tensor`` over the ranks in place."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


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
