"""Model registry and parameter counting.

Every model is either ``single_branch`` (``forward(images, tasks) -> [B, 10]``, one task per sample) or
``multi_branch`` (``forward(images) -> [B, T, 10]``, all tasks in one pass); see ``paradigm``.
"""
from .ablations import BUOnlyLeNet, TDOnlyControlNet
from .controlnet import ControlNet
from .gumbel_matrix import GumbelMatrixLeNet
from .lenet import MultiBranchLeNet, SingleTaskLeNets
from .modulation import ChannelModulatedLeNet, ExtendedChannelModulatedLeNet, TaskRoutedLeNet

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
}

LENET_PARAMS = 24_390   # one LeNet, weights and biases (spec §3)
LENET_WEIGHTS = 24_250  # one LeNet, weights only: the unit of the paper's Figure 3 axis


def build_model(name, num_tasks, **options):
    return MODELS[name](num_tasks, **options)


def count_parameters(model):
    """Returns ``(num_params, num_weights)``: all parameters (plus task-routing mask entries, which the
    original stores as parameters), and the same without biases."""
    fixed = model.num_fixed_params() if hasattr(model, "num_fixed_params") else 0
    num_params = sum(p.numel() for p in model.parameters()) + fixed
    biases = sum(p.numel() for name, p in model.named_parameters() if name.endswith("bias"))
    return num_params, num_params - biases
