"""Learned parameter allocation: Gumbel-Matrix routing (Maziarz et al., arXiv 1910.04915, "Flexible Multi-task
Networks by Learning Parameter Allocation"; their code: google-research/google-research@0c1bbe5f,
``learning_parameter_allocation/``, lpa/ below).

A routed layer holds K components (a conv or a linear module each). Every task t owns, per routed layer, K binary
allocation variables z[t, k] ~ Bernoulli(P[t, k]) (the "Gumbel matrix", paper Sec. 3). The logits of a layer are one
``[T, K, 2]`` parameter initialised to log[p0, 1 - p0], so P = softmax(logits)[..., 0] (lpa/pathnet/pathnet_lib.py
GumbelMatrixRouter). In training, z is a hard straight-through Gumbel-softmax sample over the two outcomes (one sample
per (task, component) and per forward pass, shared by all images of the batch); at evaluation it is greedy: on iff P
>= 0.5. The layer output for a task is the mean of its selected components' outputs, and zero when it selects none
(lpa/pathnet WeightedSumCombiner).

The baselines of paper Sec. 5.1 are fixed allocations of the same layer: ``no_sharing`` (the identity matrix, task t
uses component t only; needs K = T) and ``shared_bottom`` (all ones: every task averages all components).

Two networks: :class:`GumbelMatrixMNISTNet` (the paper's Sec. 5.1 MNIST model, one task per image) and
:class:`GumbelMatrixLeNet` (our LeNet with a routed encoder for Multi-MNIST, all tasks in one pass).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hooks import TrainingHooks
from .lenet import NUM_CLASSES, BatchedLinear

ALLOCATIONS = ("gumbel_matrix", "no_sharing", "shared_bottom")
GUMBEL_EPS = 1e-20  # inside both logs of the Gumbel noise, as the original

# The param file's router_options, which the training hooks of a model with learned allocation read: option ->
# (default, (min, max)); defaults of Maziarz et al.'s google-research/google-research@0c1bbe5f
# learning_parameter_allocation/pathnet/pathnet_lib.py.
ROUTER_OPTIONS = {
    "lr": (1e-3, (1e-8, 10.0)),               # their own Adam's lr, halved with the model's (MNIST recipe: = model lr)
    "temperature_init": (50.0, (1e-3, 1e6)),  # tau = max(min, init / sqrt(task-updates + 1))
    "temperature_min": (0.5, (1e-3, 1e6)),
    "budget": (1.0, (0.0, 1.0)),              # fraction of the routed components a task may use before the penalty
    "budget_penalty": (0.0, (0.0, 1e3)),      # penalty * max(0, mean P - budget); 0 = off
}


def temperature_schedule(update, initial=50.0, minimum=0.5):
    """Gumbel-softmax temperature after ``update`` task-updates: max(minimum, initial / sqrt(update + 1))
    (lpa/pathnet/pathnet_lib.py; with the defaults it reaches 0.5 at update 9,999)."""
    return max(minimum, initial / math.sqrt(update + 1))


def sample_connections(logits, temperature, uniform=None):
    """Hard straight-through Gumbel-softmax sample of the 'connected' outcome (paper Sec. 3;
    lpa/pathnet/pathnet_lib.py).

    ``logits [..., 2]`` (connected, not connected) -> ``[...]`` of exact 0/1 values in the forward pass whose gradient
    is that of the relaxed sample softmax((logits + g) / temperature)[..., 0], g ~ Gumbel(0, 1) i.i.d. The Gumbel
    noise comes from ``uniform`` (U(0, 1) of logits' shape) when given, else from ``torch.rand_like(logits)``.
    """
    if uniform is None:
        uniform = torch.rand_like(logits)
    gumbel = -torch.log(-torch.log(uniform + GUMBEL_EPS) + GUMBEL_EPS)
    soft = torch.softmax((logits + gumbel) / temperature, dim=-1)
    hard = (soft == soft.max(dim=-1, keepdim=True).values).to(soft.dtype)
    return (hard + (soft - soft.detach()))[..., 0]


def allocation_weights(masks):
    """Combination weights from binary masks ``[..., K]``: m / max(sum m, 1), i.e. the mean over the selected
    components and all zeros when none is selected (gradient also flows through the
    denominator, as TF's maximum in lpa/)."""
    return masks / masks.sum(dim=-1, keepdim=True).clamp(min=1.0)


class GumbelMatrixRouter(nn.Module):
    """Learned allocation of one routed layer: logits ``[T, K, 2]`` (one parameter per layer, as in lpa/). Its
    Gumbel noise comes from a U(0, 1) tensor of the logits' shape, which a stacked run feeds per replica
    (``random_draws``, models/hooks.py)."""

    random_draws = "uniform"

    def __init__(self, num_tasks, num_components, probs_init=0.5, temperature=50.0):
        super().__init__()
        if not 0.0 < probs_init < 1.0:
            raise ValueError(f"probs_init must be in (0, 1), got {probs_init}")
        init = torch.log(torch.tensor([probs_init, 1.0 - probs_init]))
        self.logits = nn.Parameter(init.repeat(num_tasks, num_components, 1))
        self.temperature = temperature  # set by the trainer every update (temperature_schedule)
        self.noise = None  # U(0, 1) [T, K, 2] for the next sample instead of torch's generator (stacked runs)

    def noise_shape(self):
        """The shape of the U(0, 1) tensor of one sample: the logits' ``[T, K, 2]``."""
        return self.logits.shape

    def probabilities(self):
        """Connection probabilities P ``[T, K]``."""
        return torch.softmax(self.logits, dim=-1)[..., 0]

    def greedy(self):
        """Evaluation allocation ``[T, K]``: connected iff logit(connected) >= logit(not connected), i.e. P >= 0.5."""
        return (self.logits[..., 0] >= self.logits[..., 1]).to(self.logits.dtype)

    def masks(self):
        """``[T, K]`` binary masks for one forward pass: sampled in training mode, greedy in eval mode."""
        if self.training:
            return sample_connections(self.logits, self.temperature, self.noise)
        return self.greedy()


class FixedRouter(nn.Module):
    """A fixed binary allocation ``[T, K]`` (a buffer: saved, never trained)."""

    def __init__(self, allocation):
        super().__init__()
        self.register_buffer("allocation", allocation.float())

    def probabilities(self):
        return self.allocation

    def greedy(self):
        return self.allocation

    def masks(self):
        return self.allocation


def make_router(allocation, num_tasks, num_components, probs_init=0.5):
    """The router of one layer for an allocation method of paper Sec. 5.1 (``ALLOCATIONS``)."""
    if allocation == "gumbel_matrix":
        return GumbelMatrixRouter(num_tasks, num_components, probs_init)
    if allocation == "no_sharing":
        if num_components != num_tasks:
            raise ValueError(f"allocation 'no_sharing' gives component t to task t and needs num_components = "
                             f"num_tasks = {num_tasks}, got num_components = {num_components}")
        return FixedRouter(torch.eye(num_tasks))
    if allocation == "shared_bottom":
        return FixedRouter(torch.ones(num_tasks, num_components))
    raise ValueError(f"unknown allocation {allocation!r}; allowed: {', '.join(ALLOCATIONS)}")


class ParallelComponents(nn.Module):
    """K independent components of one routed layer, each ``layer_k`` + ReLU (the ReLU is inside the component as
    in the original, lpa/models.py), run as one layer with K times the output channels: component k owns output channels
    [k * C, (k + 1) * C) of ``layer``, whose weights no other component touches, so this is exactly K separate
    conv / linear modules, only faster. ``x [N, ...] -> [N, K, C, ...]``. Each component gets the Keras init of
    its own (glorot-uniform with its own fan-in / fan-out, zero bias)."""

    def __init__(self, layer, num_components):
        super().__init__()
        self.layer, self.num_components = layer, num_components
        for weight in layer.weight.unflatten(0, (num_components, -1)):
            nn.init.xavier_uniform_(weight)
        nn.init.zeros_(layer.bias)

    def forward(self, x):
        return F.relu(self.layer(x)).unflatten(1, (self.num_components, -1))


def conv_components(num_components, in_channels, out_channels, kernel_size):
    return ParallelComponents(nn.Conv2d(in_channels, num_components * out_channels, kernel_size), num_components)


def linear_components(num_components, in_features, out_features):
    return ParallelComponents(nn.Linear(in_features, num_components * out_features), num_components)


class RoutedLayer(nn.Module):
    """K components of the same output shape, combined per task by its allocation (paper Sec. 3; lpa/pathnet/utils.py).
    All components always run (the original builds the layer with ``sparse=False``), so unselected components
    still give the logits a straight-through gradient."""

    def __init__(self, components, router):
        super().__init__()
        self.components = components
        self.router = router

    def forward(self, x, tasks):
        """``x [N, ...]``, ``tasks [N]`` int64 (the task of each row) -> ``[N, ...]``."""
        weights = allocation_weights(self.router.masks())[tasks]  # [N, K]
        return torch.einsum("nk,nk...->n...", weights, self.components(x))

    def forward_all_tasks(self, x):
        """The same layer for every task on one input ``x [B, ...]`` -> ``[T*B, ...]`` task-major: the components run
        once on the B images (their output does not depend on the task), then each task combines them."""
        weights = allocation_weights(self.router.masks())  # [T, K]
        return torch.einsum("tk,bk...->tb...", weights, self.components(x)).flatten(0, 1)


class TaskLinear(nn.Module):
    """One linear head per task (the per-task Dense(10) of lpa/utils.py), applied to each row with its own task's head.
    Keras initialisation: glorot-uniform weights, zero biases."""

    def __init__(self, num_tasks, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_tasks, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(num_tasks, out_features))
        for weight in self.weight:
            nn.init.xavier_uniform_(weight)

    def forward(self, x, tasks):
        return torch.einsum("ni,noi->no", x, self.weight[tasks]) + self.bias[tasks]


class GumbelMatrixMNISTNet(TrainingHooks, nn.Module):
    """The Sec. 5.1 MNIST network (lpa/models.py get_keras_layers_for_mnist_experiment): three routed layers of K
    components, each a valid conv with ``filters`` channels and a ReLU (5x5, then 3x3, 3x3), average pooling 2 after
    the first two, flatten (36), dropout, and one linear head per task. With 4 tasks and K = 4: 1,600 routed and 1,480
    head parameters.

    ``paradigm = "single_branch"``: ``forward(images [B, 1, 28, 28] in [0, 1], tasks [B] int64) -> logits [B, 10]``.
    """

    paradigm = "single_branch"

    def __init__(self, num_tasks=4, allocation="gumbel_matrix", num_components=4, probs_init=0.5, filters=4,
                 dropout=0.5):
        super().__init__()
        self.num_tasks = num_tasks
        shapes = [(1, 5), (filters, 3), (filters, 3)]  # (in channels, kernel) of the three routed layers
        self.layers = nn.ModuleList(
            RoutedLayer(conv_components(num_components, cin, filters, k),
                        make_router(allocation, num_tasks, num_components, probs_init))
            for cin, k in shapes)
        self.dropout = nn.Dropout(dropout)
        self.heads = TaskLinear(num_tasks, filters * 3 * 3, NUM_CLASSES)

    def forward(self, images, tasks):
        x = F.avg_pool2d(self.layers[0](images, tasks), 2)  # 28 -> 24 -> 12
        x = F.avg_pool2d(self.layers[1](x, tasks), 2)       # 12 -> 10 -> 5
        x = self.layers[2](x, tasks).flatten(1)             # 5 -> 3: 3 * 3 * filters
        return self.heads(self.dropout(x), tasks)


class GumbelMatrixLeNet(TrainingHooks, nn.Module):
    """LeNet with a routed encoder for Multi-MNIST (our design): routed conv1 (1->c1, k5) + ReLU, max-pool 2, routed
    conv2 (c1->c2, k5) + ReLU, max-pool 2, routed fc (320->hidden) + ReLU, each layer K components; then per-task
    fc1 + ReLU + fc2 heads exactly as :class:`~models.lenet.MultiBranchLeNet`. ReLU inside each component commutes
    with max-pooling, so the LeNet order is kept. Components get the Keras init of the original (lpa/models.py).

    ``paradigm = "multi_branch"``: ``forward(images [B, 1, 28, 28]) -> logits [B, T, 10]``; every task runs on every
    image with its own allocation (one mask sample per task, routed layer and forward pass). ``allocation`` is
    ``gumbel_matrix`` (default), ``no_sharing`` (K = T: T independent encoders, i.e. single-task LeNets) or
    ``shared_bottom`` (with K = 1 exactly the multi-branch LeNet).
    """

    paradigm = "multi_branch"

    def __init__(self, num_tasks, allocation="gumbel_matrix", num_components=4, probs_init=0.5, c1=10, c2=20,
                 hidden=50):
        super().__init__()
        self.num_tasks = num_tasks
        banks = [conv_components(num_components, 1, c1, 5), conv_components(num_components, c1, c2, 5),
                 linear_components(num_components, c2 * 4 * 4, hidden)]
        self.layers = nn.ModuleList(
            RoutedLayer(bank, make_router(allocation, num_tasks, num_components, probs_init)) for bank in banks)
        self.fc1 = BatchedLinear(num_tasks, hidden, hidden)
        self.fc2 = BatchedLinear(num_tasks, hidden, NUM_CLASSES)
        self.temperature = None  # the routers' temperature tensor, which ``before_step`` creates and overwrites

    # training hooks (models/hooks.py); ``options``: the param file's router_options, {} without learned allocation

    def before_step(self, update, options):
        """The Gumbel-softmax temperature of the ``update``-th step, counted in task-updates (every task trains on
        every image) as Maziarz et al.'s mnist_train.py counts them; one tensor of the weights' dtype and device, which
        every step overwrites."""
        if options:
            value = temperature_schedule(update * self.num_tasks, options["temperature_init"],
                                         options["temperature_min"])
            weight = self.fc2.weight
            if self.temperature is None or (self.temperature.dtype, self.temperature.device) != (weight.dtype,
                                                                                                   weight.device):
                self.temperature = torch.empty((), dtype=weight.dtype, device=weight.device)
                set_temperature(self, self.temperature)
            self.temperature.fill_(value)

    def penalty(self, options):
        """The budget penalty (``budget_penalty``, averaged over the tasks as the task losses are), when it is on."""
        if options and options["budget_penalty"] > 0:
            return budget_penalty(self, options["budget"], options["budget_penalty"]).mean()
        return None

    def epoch_record(self):
        """The fraction of routed components that each task's greedy allocation uses (learned allocation only)."""
        if not router_parameters(self):
            return {}
        return {"active_fraction_per_task": allocation_matrix(self).mean(dim=-1).cpu().tolist()}

    def parameter_groups(self, lr, options):
        """The weights at ``lr``; the learned allocation logits in a group of their own at ``router_options.lr``
        (the original's second Adam; Adam is per parameter, so one Adam with two groups is the same)."""
        if not router_parameters(self):
            return super().parameter_groups(lr, options)
        return [{"params": weight_parameters(self), "lr": lr},
                {"params": router_parameters(self), "lr": options["lr"]}]

    def forward(self, images):
        batch = len(images)
        tasks = torch.arange(self.num_tasks, device=images.device).repeat_interleave(batch)
        x = F.max_pool2d(self.layers[0].forward_all_tasks(images), 2)  # task-major: rows t*B .. t*B + B - 1
        x = F.max_pool2d(self.layers[1](x, tasks), 2)
        rep = self.layers[2](x.flatten(1), tasks)                  # [T*B, hidden]
        rep = rep.view(self.num_tasks, batch, -1).transpose(0, 1)  # [B, T, hidden]
        return self.fc2(F.relu(self.fc1(rep)))


# --- helpers for any model that contains routers -------------------------------------------------------------------

def routers(model):
    """The routers of ``model``, in module order (one per routed layer)."""
    return [m for m in model.modules() if isinstance(m, (GumbelMatrixRouter, FixedRouter))]


def set_temperature(model, temperature):
    for router in routers(model):
        if isinstance(router, GumbelMatrixRouter):
            router.temperature = temperature


def router_parameters(model):
    """The allocation logits (the original's ``router_dist`` variables, trained by their own Adam)."""
    return [router.logits for router in routers(model) if isinstance(router, GumbelMatrixRouter)]


def weight_parameters(model):
    """Every parameter except the allocation logits."""
    logits = {id(p) for p in router_parameters(model)}
    return [p for p in model.parameters() if id(p) not in logits]


def budget_penalty(model, budget, penalty):
    """Per-task budget penalty ``[T]`` (lpa/utils.py create_auxiliary_loss_function): penalty * max(0, sum over routed
    layers and components of P[t, k] / total number of routed components - budget). Uses the probabilities (expected
    connections), not samples."""
    probabilities = [router.probabilities() for router in routers(model)]
    used = torch.stack([p.sum(dim=1) for p in probabilities]).sum(dim=0)
    total = sum(p.shape[1] for p in probabilities)
    return penalty * (used / total - budget).clamp(min=0.0)


def add_budget_gradient(model, budget, penalty):
    """Adds the gradient of the budget penalty, averaged over the tasks as the task losses are, to the allocation
    logits' ``.grad`` and returns the penalty. Taken apart from the loss's backward pass: the penalty depends on the
    logits alone, so every process of a distributed run adds the same gradient after DDP's averaging."""
    logits = router_parameters(model)
    value = budget_penalty(model, budget, penalty).mean()
    for parameter, grad in zip(logits, torch.autograd.grad(value, logits)):
        parameter.grad = grad if parameter.grad is None else parameter.grad + grad
    return value.detach()


def allocation_matrix(model, greedy=True):
    """``[T, L*K]``: per task, the greedy binary allocation (or the probabilities) of all routed layers side by
    side (layer-major columns), the matrix of the paper's allocation figures and of ``clusters/plot``."""
    parts = [router.greedy() if greedy else router.probabilities() for router in routers(model)]
    return torch.cat(parts, dim=1).detach()
