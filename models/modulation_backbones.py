"""The baselines of Table 3 / Table 6a on the larger backbones (paper §4.3): channel modulation (ch-mod, Zhao
et al. 2018), task routing (Strezoski et al. 2019), uniform scaling (multi-branch, equal loss weights) and
single task (one whole backbone per task, Table 3c).

ch-mod and task routing multiply the output of every stage but the last by a per-task channel vector, at the
places where ControlNet's TD->BU2 laterals act (§4.3: "in the same recognition network locations"), with a
single head: as ``models.modulation`` on LeNet. ch-mod learns vectors initialised to ones and applies
ReLU(v); task routing uses fixed random binary masks with ``int(C * sigma)`` zeros per task and stage (drawn
from the global RNG when the model is built; stored as buffers). Uniform scaling shares the backbone's stages
and gives every task its own head (for CLEVR the VGG classifier, the split that reproduces Table 3a's #P).

``location_head=True`` adds the baselines' localisation variant (Table 3, 'loc' column): "an additional
regression loss, calculated by a FC layer at the top of the network" -- a Linear(F, 2) on the head's
penultimate features (one per task for uniform scaling), returned by ``forward(..., with_location=True)`` and
trained with ``losses.location_regression_loss``. The training script sets it when ``spatial_loss_weight``
is positive.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones import build_backbone, last_conv
from .hooks import TrainingHooks
from .modulation import routing_mask


class _ModulatedBackbone(TrainingHooks, nn.Module):
    """A backbone with per-task gates on stages 0..n-2 and one head: ``forward(images, tasks) -> logits``."""

    paradigm = "single_branch"
    location_output = "with_location"  # with location_head=True

    def __init__(self, num_tasks, backbone, num_classes, width, input_size, location_head):
        super().__init__()
        self.num_tasks = num_tasks
        self.bu = build_backbone(backbone, num_classes, width, input_size)
        self.input_shape = (3, self.bu.input_size, self.bu.input_size)
        self.gated = tuple(range(len(self.bu.channels) - 1))
        self.locator = nn.Linear(self.bu.head.num_features, 2) if location_head else None

    def gates(self, tasks):
        raise NotImplementedError

    def forward(self, images, tasks, with_location=False):
        """Logits [B, C]; with ``with_location`` (needs ``location_head=True``) the pair (logits, (x, y) [B, 2])."""
        if not with_location:
            return self.bu(images, self.gates(tasks))
        features = self.bu.head.features(self.bu.taps(images, self.gates(tasks))[-1])
        return self.bu.head.out(features), self.locator(features)


class ChannelModulatedBackbone(_ModulatedBackbone):
    def __init__(self, num_tasks, backbone="vgg11_clevr", num_classes=None, width=1.0, input_size=None,
                 location_head=False):
        super().__init__(num_tasks, backbone, num_classes, width, input_size, location_head)
        self.modulation = nn.ParameterDict({str(k): nn.Parameter(torch.ones(num_tasks, self.bu.channels[k]))
                                            for k in self.gated})

    def gates(self, tasks):
        one_hot = F.one_hot(tasks, self.num_tasks).to(self.modulation["0"].dtype)
        return {k: F.relu(one_hot @ self.modulation[str(k)])[:, :, None, None] for k in self.gated}


class TaskRoutedBackbone(_ModulatedBackbone):
    def __init__(self, num_tasks, backbone="vgg11_clevr", num_classes=None, width=1.0, input_size=None,
                 location_head=False, sigma=0.5):
        super().__init__(num_tasks, backbone, num_classes, width, input_size, location_head)
        if not 0.0 <= sigma < 1.0:
            raise ValueError(f"task routing sigma must be in [0, 1), got {sigma}")
        for k in self.gated:
            self.register_buffer(f"mask_{k}", routing_mask(num_tasks, self.bu.channels[k],
                                                                int(self.bu.channels[k] * sigma)))

    def num_fixed_params(self):
        """Mask entries, counted as parameters as in ``models.modulation.TaskRoutedLeNet``."""
        return sum(getattr(self, f"mask_{k}").numel() for k in self.gated)

    def gates(self, tasks):
        return {k: getattr(self, f"mask_{k}")[tasks][:, :, None, None] for k in self.gated}


class MultiBranchBackbone(TrainingHooks, nn.Module):
    """Shared stages, one head per task: ``forward(images) -> [B, T, C]`` (``trunk``, ``heads`` and
    ``last_shared_layer`` for the loss weightings, as ``models.lenet.MultiBranchLeNet``)."""

    paradigm = "multi_branch"
    location_output = "with_location"  # with location_head=True

    def __init__(self, num_tasks, backbone="vgg11_clevr", num_classes=None, width=1.0, input_size=None,
                 location_head=False):
        super().__init__()
        self.num_tasks = num_tasks
        bu = build_backbone(backbone, num_classes, width, input_size)
        self.input_shape = (3, bu.input_size, bu.input_size)
        self.stages = bu.stages
        self.branches = nn.ModuleList(bu.make_head() for _ in range(num_tasks))
        self.locators = nn.ModuleList(nn.Linear(bu.head.num_features, 2) for _ in range(num_tasks)) \
            if location_head else None

    @property
    def last_shared_layer(self):
        """GradNorm's W: the last conv of the shared stages."""
        return last_conv(self.stages)

    def trunk(self, x):
        for stage in self.stages:
            x = stage(x)
        return x

    def heads(self, z):
        return torch.stack([head(z) for head in self.branches], dim=1)

    def forward(self, x, with_location=False):
        """Logits [B, T, C]; with ``with_location`` (needs ``location_head=True``) the pair
        (logits, (x, y) [B, T, 2])."""
        if not with_location:
            return self.heads(self.trunk(x))
        z = self.trunk(x)
        features = [head.features(z) for head in self.branches]
        logits = torch.stack([head.out(f) for head, f in zip(self.branches, features)], dim=1)
        return logits, torch.stack([loc(f) for loc, f in zip(self.locators, features)], dim=1)


class SingleTaskBackbones(TrainingHooks, nn.Module):
    """Table 3c 'Single task': T independent backbones, each with its own head, ``forward(images) -> [B, T, C]``.
    No weight is shared, so training them with the summed loss (weighting 'sum') is training T separate networks;
    #P = T x the backbone."""

    paradigm = "multi_branch"

    def __init__(self, num_tasks, backbone="resnet18", num_classes=None, width=1.0, input_size=None):
        super().__init__()
        self.num_tasks = num_tasks
        self.networks = nn.ModuleList(build_backbone(backbone, num_classes, width, input_size)
                                      for _ in range(num_tasks))
        self.input_shape = (3, self.networks[0].input_size, self.networks[0].input_size)

    def forward(self, x):
        return torch.stack([network(x) for network in self.networks], dim=1)
