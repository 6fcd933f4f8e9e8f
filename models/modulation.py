"""Channel-wise modulation baselines on one shared LeNet with one head (paper §4.3; Zhao et al.'s
Zhaoxiangyun/Multi-Task-Modulation-Module ``train_mm.py``, Strezoski et al.'s gstrezoski/TaskRouting@c13a743
``taskrouting.py``).

A per-task channel vector gates the LeNet at up to three sites (``gated``)::

    image -> conv1 -[g conv1]-> ReLU, pool -> conv2 -[g conv2]-> ReLU, pool -[g pool2]-> fc -> fc1 -> fc2

By default all three: 10+20+20 = 50 entries per task, the count that reproduces the paper's #P.

- ``ChannelModulatedLeNet`` (ch-mod, Zhao et al. 2018): learned vectors v, initialised to ones, applied
  as ReLU(v) as in Zhao et al.'s code; the extended variant is the same on a 15/25-channel LeNet.
- ``TaskRoutedLeNet`` (task routing, Strezoski et al. 2019): fixed random binary masks that switch off, for every
  task and gated site, ``int(C * sigma)`` of its C units, or ``units_off`` of them (the original's ``sigma`` is
  this count). The masks are buffers (saved in checkpoints, no gradient) drawn from the global RNG, i.e. from
  the run's seed, when the model is built, one site after the other in the order above. ``tied_masks``: the
  pool2 site reuses conv2's mask (the same 20 channels), so the units that reach the FC layer are exactly those
  conv2 keeps; otherwise each site draws its own mask and only the units on in both reach it.
  ``mask_gradient``: ``masked`` multiplies by the mask (no gradient reaches a switched-off unit);
  ``straight_through`` is the original's ``input.data.mul_(mask)``: the forward value is masked, but autograd
  does not see the product, so the gradient passes to every unit as if unmasked. It makes a difference only at a
  site no ReLU follows (pool2): behind a ReLU a masked unit is 0, where ReLU's gradient is 0.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .hooks import TrainingHooks
from .lenet import LeNet

GATED = ("conv1", "conv2", "pool2")
ALL_SITES = ",".join(GATED)
MASK_GRADIENTS = ("masked", "straight_through")


def check_gated(gated):
    """The gated sites of a comma list (``"conv1,conv2"``) as a tuple in network order; ValueError naming the
    valid sites otherwise."""
    sites = tuple(gated.split(",")) if isinstance(gated, str) else ()
    if not sites or any(site not in GATED for site in sites) or len(set(sites)) != len(sites):
        raise ValueError(f"gated must be a comma list of distinct sites among {ALL_SITES}, got {gated!r}")
    return tuple(site for site in GATED if site in sites)


class ChannelModulatedLeNet(TrainingHooks, nn.Module):
    paradigm = "single_branch"

    def __init__(self, num_tasks, c1=10, c2=20, hidden=50, gated=ALL_SITES):
        super().__init__()
        self.num_tasks = num_tasks
        self.bu = LeNet(1, c1, c2, hidden)
        channels = {"conv1": c1, "conv2": c2, "pool2": c2}
        self.modulation = nn.ParameterDict({
            site: nn.Parameter(torch.ones(num_tasks, channels[site])) for site in check_gated(gated)})

    def forward(self, images, tasks):
        one_hot = F.one_hot(tasks, self.num_tasks).to(images.dtype)
        gates = {site: F.relu(one_hot @ v)[:, :, None, None] for site, v in self.modulation.items()}
        return self.bu(images, gates)


class ExtendedChannelModulatedLeNet(ChannelModulatedLeNet):
    """ch-mod (extended): the same on a LeNet widened to 15 and 25 channels (paper §4.4)."""

    def __init__(self, num_tasks, c1=15, c2=25, hidden=50, gated=ALL_SITES):
        super().__init__(num_tasks, c1, c2, hidden, gated)


class TaskRoutedLeNet(TrainingHooks, nn.Module):
    paradigm = "single_branch"

    def __init__(self, num_tasks, c1=10, c2=20, hidden=50, sigma=None, units_off=None, gated=ALL_SITES,
                 tied_masks=False, mask_gradient="masked"):
        super().__init__()
        if mask_gradient not in MASK_GRADIENTS:
            raise ValueError(f"mask_gradient must be one of {', '.join(MASK_GRADIENTS)}, got {mask_gradient!r}")
        self.num_tasks = num_tasks
        self.gated = check_gated(gated)
        self.tied_masks = tied_masks
        self.mask_gradient = mask_gradient
        self.bu = LeNet(1, c1, c2, hidden)
        channels = {"conv1": c1, "conv2": c2, "pool2": c2}
        for site in self.gated:
            if site == "pool2" and tied_masks and "conv2" in self.gated:
                continue
            off = units_switched_off(site, channels[site], sigma, units_off)
            self.register_buffer(f"mask_{site}", routing_mask(num_tasks, channels[site], off))

    def mask(self, site):
        """The [T, C] mask of a gated site (pool2's is conv2's when the masks are tied)."""
        if site == "pool2" and not hasattr(self, "mask_pool2"):
            site = "conv2"
        return getattr(self, f"mask_{site}")

    def num_fixed_params(self):
        """Mask entries: the original registers them as (untrained) parameters, and the paper counts them. A tied
        mask is one mask."""
        return sum(buffer.numel() for name, buffer in self.named_buffers() if name.startswith("mask_"))

    def forward(self, images, tasks):
        gates = {}
        for site in self.gated:
            mask = self.mask(site)[tasks][:, :, None, None]
            gates[site] = mask if self.mask_gradient == "masked" else StraightThroughMask(mask)
        return self.bu(images, gates)


class StraightThroughMask:
    """A gate whose forward value is ``x * mask`` and whose gradient is the identity, as the original's in-place
    ``input.data.mul_(mask)``."""

    def __init__(self, mask):
        self.mask = mask

    def __call__(self, x):
        return x + (x * self.mask - x).detach()


def units_switched_off(site, channels, sigma=None, units_off=None):
    """How many of the ``channels`` units of ``site`` each task switches off: ``units_off``, or ``int(channels *
    sigma)`` (sigma 0.5 when neither is given). ValueError for both, or for a value out of range."""
    if sigma is not None and units_off is not None:
        raise ValueError("give task routing's sigma (a fraction) or units_off (a count), not both")
    if units_off is None:
        sigma = 0.5 if sigma is None else sigma
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0.0 <= sigma < 1.0:
            raise ValueError(f"task routing sigma must be a number in [0, 1), got {sigma!r}")
        return int(channels * sigma)
    if isinstance(units_off, bool) or not isinstance(units_off, int) or not 0 <= units_off < channels:
        raise ValueError(f"task routing units_off must be an integer from 0 to {channels - 1} (gated site {site} has "
                         f"{channels} units), got {units_off!r}")
    return units_off


def routing_mask(num_tasks, channels, off):
    """[T, C] binary mask with exactly ``off`` zeros per row, at random places."""
    order = torch.rand(num_tasks, channels).argsort(dim=1)
    mask = torch.ones(num_tasks, channels)
    mask.scatter_(1, order[:, :off], 0.0)
    return mask
