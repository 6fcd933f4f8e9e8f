"""Optional TensorBoard logging for the training script (``--tensorboard``): each epoch's record of metrics.jsonl
as scalars, step = epoch, in ``<out>/tensorboard`` (``tensorboard --logdir <out>/tensorboard``).

Tags: ``loss/train``, ``lr``, ``accuracy_val/mean`` and ``accuracy_val/task_<t>`` (likewise ``accuracy_test``) on
the evaluated epochs, and ``task_weight/task_<t>`` for runs with a loss weighting (the record's ``task_weights``).
Needs the ``tensorboard`` package, which nothing else in this repo needs.
"""
from pathlib import Path

from training import config


def writer_class():
    """``torch.utils.tensorboard.SummaryWriter``; a ParamError (one line, exit code 2) when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise config.ParamError("--tensorboard needs the tensorboard package, which is not installed: "
                                "pip install tensorboard (or run without --tensorboard)") from None
    return SummaryWriter


def open_writer(summary_writer, out, epochs_done):
    """The writer into ``<out>/tensorboard``; a resumed run first drops what was logged after its checkpoint's
    epoch (``purge_step``), so that a killed and resumed run shows each epoch once."""
    return summary_writer(log_dir=str(Path(out) / "tensorboard"), purge_step=epochs_done + 1 if epochs_done else None)


def log_epoch(writer, record):
    """Writes one metrics.jsonl record (see the module docstring for the tags)."""
    step = record["epoch"]
    writer.add_scalar("loss/train", record["train_loss"], step)
    writer.add_scalar("lr", record["lr"], step)
    for split in ("val", "test"):
        if f"{split}_acc_mean" in record:
            writer.add_scalar(f"accuracy_{split}/mean", record[f"{split}_acc_mean"], step)
            for task, accuracy in enumerate(record[f"{split}_acc_per_task"]):
                writer.add_scalar(f"accuracy_{split}/task_{task}", accuracy, step)
    for task, weight in enumerate(record.get("task_weights", [])):
        writer.add_scalar(f"task_weight/task_{task}", weight, step)
    writer.flush()
