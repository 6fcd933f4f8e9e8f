"""Model registry and parameter counting.

Every model is either ``single_branch`` (``forward(images, tasks) -> [B, C]``, one task per sample) or
``multi_branch`` (``forward(images) -> [B, T, C]``, all tasks in one pass); see ``paradigm``.

The LeNet family (Multi-MNIST, Table 2) takes [1, 28, 28] images and has C = 10 classes. The ``backbone_*``
models are the same methods on the larger backbones of paper §4.2 (VGG-11 for CLEVR, VGG-7 for CELEB-A,
ResNet-18 for CUB-200; ``models.backbones``), built with ``backbone``, ``num_classes`` and ``input_size``; their
``input_shape`` is [3, S, S] (``input_shape(model)``).
"""
import torch

from .ablations import BUOnlyLeNet, TDOnlyControlNet
from .backbones import build_backbone
from .controlnet import ControlNet
from .controlnet_backbones import BackboneControlNet
from .gumbel_matrix import GumbelMatrixLeNet
from .lenet import MultiBranchLeNet, SingleTaskLeNets
from .modulation import ChannelModulatedLeNet, ExtendedChannelModulatedLeNet, TaskRoutedLeNet
from .modulation_backbones import ChannelModulatedBackbone, MultiBranchBackbone, SingleTaskBackbones, TaskRoutedBackbone

MODELS = {
    "controlnet": ControlNet,
    "ch_mod": ChannelModulatedLeNet,
    "ch_mod_extended": ExtendedChannelModulatedLeNet,
    "task_routing": TaskRoutedLeNet,
    "multi_branch": MultiBranchLeNet,
    "single_task": SingleTaskLeNets,
    "td_only": TDOnlyControlNet,
    "bu_only": BUOnlyLeNet,
    "gumbel_matrix": GumbelMatrixLeNet,
    "backbone_controlnet": BackboneControlNet,
    "backbone_ch_mod": ChannelModulatedBackbone,
    "backbone_task_routing": TaskRoutedBackbone,
    "backbone_multi_branch": MultiBranchBackbone,
    "backbone_single_task": SingleTaskBackbones,
}
# The LeNet-family model -> the same method on a larger backbone (paper §4.3: same places, one head).
ON_BACKBONE = {"controlnet": "backbone_controlnet", "ch_mod": "backbone_ch_mod",
               "task_routing": "backbone_task_routing", "multi_branch": "backbone_multi_branch",
               "single_task": "backbone_single_task"}
# The localisation loss ('loc', Tables 3 and 6a) trains ControlNet's TD map or a baseline's location head (the
# class attribute ``location_output``, models/hooks.py).
TD_MAP_MODELS = tuple(name for name, cls in MODELS.items() if cls.location_output == "with_td_map")
LOCATION_HEAD_MODELS = tuple(name for name, cls in MODELS.items() if cls.location_output == "with_location")
BACKBONE_OPTIONS = ("backbone", "num_classes", "input_size")  # set from the param file's data set, not model_options
LENET_INPUT = (1, 28, 28)

LENET_PARAMS = 24_390   # one LeNet, weights and biases (the unit of paper Table 2's modulation rows)
LENET_WEIGHTS = 24_250  # one LeNet, weights only: the unit of the paper's Figure 3 axis


def build_model(name, num_tasks, **options):
    return MODELS[name](num_tasks, **options)


def input_shape(model):
    """[C, H, W] of one input image: the model's ``input_shape``, else LeNet's [1, 28, 28]."""
    return tuple(getattr(model, "input_shape", LENET_INPUT))


def unit_counts(backbone="lenet", **options):
    """``(num_params, num_weights)`` of one plain backbone, the unit of the paper's #P multiples (Table 2: one
    LeNet; Table 3: "the corresponding BU architecture"); ``options`` as ``build_backbone``'s. Counted on the meta
    device (no memory)."""
    if backbone == "lenet":
        return LENET_PARAMS, LENET_WEIGHTS
    with torch.device("meta"):
        return count_parameters(build_backbone(backbone, **options))


def count_parameters(model):
    """Returns ``(num_params, num_weights)``: all parameters (plus task-routing mask entries, which the
    original stores as parameters), and the same without biases."""
    fixed = model.num_fixed_params() if hasattr(model, "num_fixed_params") else 0
    num_params = sum(p.numel() for p in model.parameters()) + fixed
    biases = sum(p.numel() for name, p in model.named_parameters() if name.endswith("bias"))
    return num_params, num_params - biases
