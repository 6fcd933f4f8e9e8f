"""Channel-wise modulation baselines on one shared LeNet with one head (paper §4.3; Zhao et al.'s
Zhaoxiangyun/Multi-Task-Modulation-Module ``train_mm.py``, Strezoski et al.'s gstrezoski/TaskRouting@c13a743
``taskrouting.py``).

Both gate the conv1 output (before ReLU), the conv2 output (before ReLU) and the pooled 4x4 map with a
per-task channel vector: 10+20+20 = 50 entries per task, the count that reproduces the paper's #P.

- ``ChannelModulatedLeNet`` (ch-mod, Zhao et al. 2018): learned vectors v, initialised to ones, applied
  as ReLU(v) as in Zhao et al.'s code; the extended variant is the same on a 15/25-channel LeNet.
- ``TaskRoutedLeNet`` (task routing, Strezoski et al. 2019): fixed random binary masks; for every task and
  layer, ``int(C * sigma)`` units are switched off. The masks are buffers (saved in checkpoints, no
  gradient) drawn from the global RNG, i.e. from the run's seed, when the model is built.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .hooks import TrainingHooks
from .lenet import LeNet

GATED = ("conv1", "conv2", "pool2")


class ChannelModulatedLeNet(TrainingHooks, nn.Module):
    paradigm = "single_branch"

    def __init__(self, num_tasks, c1=10, c2=20, hidden=50):
        super().__init__()
        self.num_tasks = num_tasks
        self.bu = LeNet(1, c1, c2, hidden)
        self.modulation = nn.ParameterDict({
            name: nn.Parameter(torch.ones(num_tasks, c)) for name, c in zip(GATED, (c1, c2, c2))})

    def forward(self, images, tasks):
        one_hot = F.one_hot(tasks, self.num_tasks).to(images.dtype)
        gates = {name: F.relu(one_hot @ v)[:, :, None, None] for name, v in self.modulation.items()}
        return self.bu(images, gates)


class ExtendedChannelModulatedLeNet(ChannelModulatedLeNet):
    """ch-mod (extended): the same on a LeNet widened to 15 and 25 channels (paper §4.4)."""

    def __init__(self, num_tasks, c1=15, c2=25, hidden=50):
        super().__init__(num_tasks, c1, c2, hidden)


class TaskRoutedLeNet(TrainingHooks, nn.Module):
    paradigm = "single_branch"

    def __init__(self, num_tasks, c1=10, c2=20, hidden=50, sigma=0.5):
        super().__init__()
        if not 0.0 <= sigma < 1.0:
            raise ValueError(f"task routing sigma must be in [0, 1), got {sigma}")
        self.num_tasks = num_tasks
        self.bu = LeNet(1, c1, c2, hidden)
        for name, c in zip(GATED, (c1, c2, c2)):
            self.register_buffer(f"mask_{name}", routing_mask(num_tasks, c, sigma))

    def num_fixed_params(self):
        """Mask entries: the original registers them as (untrained) parameters, and the paper counts them."""
        return sum(getattr(self, f"mask_{name}").numel() for name in GATED)

    def forward(self, images, tasks):
        gates = {name: getattr(self, f"mask_{name}")[tasks][:, :, None, None] for name in GATED}
        return self.bu(images, gates)


def routing_mask(num_tasks, channels, sigma):
    """[T, C] binary mask with exactly ``int(C * sigma)`` zeros per row, at random places."""
    off = int(channels * sigma)
    order = torch.rand(num_tasks, channels).argsort(dim=1)
    mask = torch.ones(num_tasks, channels)
    mask.scatter_(1, order[:, :off], 0.0)
    return mask
