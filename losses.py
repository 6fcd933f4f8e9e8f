"""Every loss of the training: the task cross-entropies shared by every paradigm, and the localisation losses of
the CLEVR and CUB-200 experiments (paper §4.2, Table 3 'loc' column).

``spatial_classification_loss`` is the auxiliary loss at the bottom of TD (the authors'
``SpatialClassificationLoss``): the TD map [B, 1, H, W] is a distribution over pixels (log-softmax over all
H*W); the target is a one-hot at the ground-truth pixel (floor of x and y), padded by reflection and blurred
by a normalised 15 x 15 Gaussian kernel with s.d. 3 pixels; the loss is KL(target || softmax(map)) summed over
the pixels and averaged over the samples that have a target. As in the original, a target within 7 pixels
of the border does not have unit mass (the reflection adds a mirrored copy of the point, except on the border
row or column itself, and the blur that leaves the map is lost).

``location_regression_loss`` is the baselines' variant: an FC layer regresses (x, y); squared error on
coordinates divided by the image size. ``location_loss`` picks between the two by the model's output, and
``LocationTargets`` carries one training step's targets to whichever code runs the forward (the training loop or a
weighting's ``backward``).
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F

# Label of an image that is invalid for a task (by-ref tasks; ignore_index=-1 in the authors'
# barakhi/TD_MultiTask@8c3d589 train_multi_task_counter_stream_mmnist_byref.py).
IGNORE_INDEX = -1


def per_task_cross_entropy(logits, labels, num_valid=None):
    """Batch-mean cross-entropy of every task at once: logits [B, T, C], labels [B, T] (int64, -1 = invalid)
    -> [T]. Each task is averaged over its valid images only; a task with no valid image gets loss 0 and a
    zero gradient (not NaN). ``num_valid`` [T] replaces the divisor, the batch's valid-label counts (at least
    1): a DDP rank passes the global batch's counts / world size (see runtime/distributed.py)."""
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


SIGMA = 3.0
RADIUS = 7  # the original 15 x 15 kernel


def gaussian_kernel(sigma=SIGMA, radius=RADIUS):
    """[2r+1, 2r+1] Gaussian with s.d. ``sigma`` pixels, summing to 1."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    line = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = line[:, None] * line[None, :]
    return kernel / kernel.sum()


def has_location(xy, height, width):
    """[N] bool: a target inside the map (0 <= x < W, 0 <= y < H); -1 marks a missing one."""
    return (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] < width) & (xy[:, 1] < height)


def blurred_targets(xy, height, width, sigma=SIGMA, radius=RADIUS):
    """[N, H, W] targets for in-map pixel locations ``xy`` [N, 2] (x, y)."""
    points = torch.zeros(len(xy), 1, height, width, device=xy.device)
    index = torch.arange(len(xy), device=xy.device)
    points[index, 0, xy[:, 1].floor().long(), xy[:, 0].floor().long()] = 1.0
    padded = F.pad(points, (radius,) * 4, mode="reflect")
    kernel = gaussian_kernel(sigma, radius).to(xy.device)[None, None]
    return F.conv2d(padded, kernel)[:, 0]


def spatial_classification_loss(td_map, xy, sigma=SIGMA, num_valid=None):
    """td_map [B, 1, H, W] (logits), xy [B, 2] target pixels in map coordinates (negative or outside = none).
    Returns a scalar; 0 with a zero gradient when no sample has a target. ``num_valid`` replaces the divisor (the
    number of samples with a target), as in ``losses.per_task_cross_entropy``."""
    batch, _, height, width = td_map.shape
    valid = has_location(xy, height, width)
    if not valid.any():
        return td_map.sum() * 0.0
    log_p = F.log_softmax(td_map[valid].reshape(int(valid.sum()), height * width), dim=1)
    target = blurred_targets(xy[valid].float(), height, width, sigma).reshape(len(log_p), -1)
    return (torch.xlogy(target, target) - target * log_p).sum() / (len(log_p) if num_valid is None else num_valid)


def location_regression_loss(predicted, xy, size, num_valid=None):
    """The baselines' 'loc' loss: predicted, xy [B, 2] or [B, T, 2] (x, y) in pixels of a ``size`` x ``size`` input,
    xy negative = no target. Squared error of the coordinates divided by ``size``, averaged over x and y and over
    the samples with a target (per task for [B, T, 2]: a [T] result); 0 with a zero gradient where none has one.
    ``num_valid`` replaces the divisor (the number of samples with a target), as in ``spatial_classification_loss``."""
    valid = (xy >= 0).all(dim=-1)
    squared = ((predicted - xy.to(predicted.dtype)) / size).pow(2).mean(dim=-1)
    total = torch.where(valid, squared, torch.zeros_like(squared)).sum(dim=0)
    return total / (valid.sum(dim=0).clamp(min=1) if num_valid is None else num_valid)


def location_loss(where, xy, batch_xy, size, ranks=1):
    """The localisation loss ('loc', paper §4.2) of this rank's samples, divided by the targets of the whole global
    batch (``batch_xy``) over the number of ``ranks``, as the task losses are: the ranks' losses then average to
    the global batch's. ``where`` is ControlNet's TD bottom map [B, 1, S, S] (``spatial_classification_loss``) or a
    baseline's regressed (x, y) [B, 2] (one task per image; a scalar) or [B, T, 2] (every task; [T] losses) in
    pixels of the ``size`` x ``size`` input (``location_regression_loss``)."""
    if where.dim() == 4:
        num_valid = has_location(batch_xy, *where.shape[-2:]).sum().clamp(min=1)
        return spatial_classification_loss(where, xy, num_valid=num_valid / ranks)
    num_valid = (batch_xy >= 0).all(dim=-1).sum(dim=0).clamp(min=1)
    return location_regression_loss(where, xy, size, num_valid / ranks)


class LocationTargets(NamedTuple):
    """One training step's 'loc' targets: ``xy`` of this rank's samples, ``batch_xy`` of the whole global batch
    (the divisor), the input ``size`` in pixels, the loss ``weight`` (``spatial_loss_weight``) and the number of
    ``ranks``. ``loss(where)`` is the weighted ``location_loss`` of the model's location output ``where``."""
    xy: torch.Tensor
    batch_xy: torch.Tensor
    size: int
    weight: float
    ranks: int = 1

    def loss(self, where):
        return self.weight * location_loss(where, self.xy, self.batch_xy, self.size, self.ranks)
