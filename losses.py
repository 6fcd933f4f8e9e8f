"""Task losses shared by every training paradigm."""
import torch.nn.functional as F

# Label of an image that is invalid for a task (by-ref tasks; ignore_index=-1 in the authors'
# barakhi/TD_MultiTask@8c3d589 train_multi_task_counter_stream_mmnist_byref.py).
IGNORE_INDEX = -1


def per_task_cross_entropy(logits, labels, num_valid=None):
    """Batch-mean cross-entropy of every task at once: logits [B, T, C], labels [B, T] (int64, -1 = invalid)
    -> [T]. Each task is averaged over its valid images only; a task with no valid image gets loss 0 and a
    zero gradient (not NaN). ``num_valid`` [T] replaces the divisor, the batch's valid-label counts (at least
    1): a DDP rank passes the global batch's counts / world size (see distributed.py)."""
    losses = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    if num_valid is None:
        num_valid = (labels != IGNORE_INDEX).sum(0).clamp(min=1)
    return losses.sum(0) / num_valid


def masked_cross_entropy(logits, labels, num_valid=None):
    """Batch-mean cross-entropy over the valid labels of a single-branch batch: logits [B, C], labels [B]
    (-1 = invalid, e.g. an image with no valid by-ref task); 0 with zero gradient when none is valid.
    ``num_valid`` replaces the divisor, as in ``per_task_cross_entropy``."""
    losses = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    if num_valid is None:
        num_valid = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return losses.sum() / num_valid
