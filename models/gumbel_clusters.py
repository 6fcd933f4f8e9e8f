"""The network of the three-task-clusters experiment of Maziarz et al. (arXiv 1910.04915, Sec. 5.3;
google-research/google-research@0c1bbe5f ``learning_parameter_allocation/models.py``
get_keras_layers_for_task_clusters_experiment, a small version of the
"Diversity and Depth in Per-Example Routing Models" network).

Shared stem: 1x1 conv (8 filters) + GroupNorm(4) + ReLU. Then three routed layers of 16 components: 8 x [conv 3x3]
and 8 x [conv 5x5], each conv with 8 filters, TF "same" padding, stride 2, followed by its own GroupNorm(4) and ReLU;
every routed layer is followed by a shared GroupNorm(4) + ReLU. 32 -> 16 -> 8 -> 4: flatten (4 x 4 x 8 = 128),
dropout 0.5, one linear head per task. Routing, heads and the fixed allocations come from
:mod:`models.gumbel_matrix` (Gumbel-matrix router, mean of the selected components, zero output if none is selected).
Keras / TF1 defaults of the original: glorot-uniform kernels (per component), zero biases, GroupNorm with
epsilon 1e-6 and unit scale / zero offset.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gumbel_matrix import ParallelComponents, RoutedLayer, TaskLinear, make_router
from .hooks import TrainingHooks

GROUP_NORM_EPS = 1e-6  # tf.contrib.layers.group_norm's default


def same_padding(size, kernel, stride):
    """TF "same" padding of one axis: (before, after), the odd pixel after, so that the output has
    ceil(size / stride) positions."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConvGroupNorm(nn.Conv2d):
    """Conv2d with TF "same" padding followed by GroupNorm. Used with ``norm_groups = 4 * K`` under
    :class:`~models.gumbel_matrix.ParallelComponents`, which gives every component its own 8 output channels: each
    GroupNorm group then lies inside one component, i.e. every component has its own GroupNorm(4)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, norm_groups):
        super().__init__(in_channels, out_channels, kernel_size, stride)
        self.norm = nn.GroupNorm(norm_groups, out_channels, eps=GROUP_NORM_EPS)

    def forward(self, x):
        (k_h, k_w), (s_h, s_w) = self.kernel_size, self.stride
        top, bottom = same_padding(x.shape[-2], k_h, s_h)
        left, right = same_padding(x.shape[-1], k_w, s_w)
        return self.norm(super().forward(F.pad(x, (left, right, top, bottom))))


class ComponentGroups(nn.ModuleList):
    """Several banks of parallel components (one per kernel size) seen as one routed layer's K components:
    ``x -> [N, K, C, H, W]`` with the banks' components one after the other (3x3 first, as the original's list)."""

    def forward(self, x):
        return torch.cat([bank(x) for bank in self], dim=1)


def routed_conv_layer(in_channels, filters, kernels, stride, norm_groups):
    """The components of one routed layer: for each (kernel, count) in ``kernels``, ``count`` components of
    conv k x k (``filters`` channels, stride) + GroupNorm(``norm_groups``) + ReLU."""
    return ComponentGroups(
        ParallelComponents(SameConvGroupNorm(in_channels, count * filters, kernel, stride, count * norm_groups), count)
        for kernel, count in kernels)


class GumbelClustersNet(TrainingHooks, nn.Module):
    """The Sec. 5.3 network (see the module docstring) for ``num_tasks`` tasks of ``num_classes`` classes each.

    ``paradigm = "single_branch"``: ``forward(images [B, in_channels, 32, 32] in [0, 1], tasks [B] int64) ->
    logits [B, num_classes]``. ``allocation``: ``gumbel_matrix`` (learned) or ``shared_bottom`` (every task averages
    all components); ``no_sharing`` would need one component per task (K = T).
    """

    paradigm = "single_branch"

    def __init__(self, num_tasks, num_classes=9, allocation="gumbel_matrix", probs_init=0.5, filters=8,
                 kernels=((3, 8), (5, 8)), num_layers=3, norm_groups=4, in_channels=1, image_size=32, dropout=0.5):
        super().__init__()
        self.num_tasks = num_tasks
        num_components = sum(count for _, count in kernels)
        self.stem = SameConvGroupNorm(in_channels, filters, 1, 1, norm_groups)
        nn.init.xavier_uniform_(self.stem.weight)
        nn.init.zeros_(self.stem.bias)
        self.layers = nn.ModuleList(
            RoutedLayer(routed_conv_layer(filters, filters, kernels, 2, norm_groups),
                        make_router(allocation, num_tasks, num_components, probs_init))
            for _ in range(num_layers))
        self.norms = nn.ModuleList(nn.GroupNorm(norm_groups, filters, eps=GROUP_NORM_EPS) for _ in range(num_layers))
        self.dropout = nn.Dropout(dropout)
        size = image_size // 2 ** num_layers
        self.heads = TaskLinear(num_tasks, filters * size * size, num_classes)

    def forward(self, images, tasks):
        x = F.relu(self.stem(images))
        for layer, norm in zip(self.layers, self.norms):
            x = F.relu(norm(layer(x, tasks)))
        return self.heads(self.dropout(x.flatten(1)), tasks)
