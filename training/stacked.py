"""Stacked runs: R runs of one method and one setting that differ only in their seed (the 5 seeds of a
Table 2 cell) trained in one process as one model.

Replica r is the run of the training script with ``--seed seeds[r]``, exactly: its initial weights are the model
built after ``torch.manual_seed(seeds[r])``; its data order and task draws come from
``epoch_generator(seeds[r], epoch)``; the model's own random draws (those of every module that declares
``random_draws``, models/hooks.py: Gumbel noise, dropout masks) come from a generator seeded with
``epoch_seed(seeds[r], epoch)``, the seed that the separate run gives torch's global generator, drawn in the same
order: a module fed ``"uniform"`` takes the U(0, 1) tensor drawn for it before the forward pass, one fed
``"generator"`` draws from the replica's generator (``loop`` mode only). Parameters and buffers are
stacked along a leading replica dimension [R, ...] (``torch.func.stack_module_state``); a forward pass is
``torch.func.functional_call`` of the template model with replica r's tensors, either replica after replica
(``loop``: the kernels of a separate run) or all at once under ``torch.func.vmap`` (``vmap``: one grouped
convolution or batched matmul per layer, the fewer kernel launches that a GPU wants). The loss of the stack is the
sum of the replicas' losses, so the gradient of each replica's slice is its own run's gradient. One optimiser over
the stacked parameters is R independent optimisers: Adam, SGD and RMSprop act elementwise and the replicas step in
sync (one shared step count), see ``torch.optim.Adam``. Every replica's model, optimiser and weighting state can be
read and written in the format of a separate run (``replica_state_dict``, ``replica_optimizer_state``), so a
replica writes the files that its separate run would and can resume from them.

The stacked group's epoch and step are training/engine.py's (``--seeds`` of the training script); a group evaluates
every replica in a separate run's model.
"""
import copy
import types

import torch
import torch.nn as nn
from torch.func import functional_call, vmap

from models.hooks import RANDOM_DRAWS, TrainingHooks
from training.data import MEMORY_FORMATS
from training import optim
from training.optim import make_optimizer
from weighting.batched import StackedWeighting

MODES = ("loop", "vmap")


class _Apply(nn.Module):
    """``fn(model, *args)`` as a module's forward, so that ``functional_call`` can run any method of ``model``."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.fn = None

    def forward(self, *args):
        return self.fn(self.model, *args)


class StackedModel(nn.Module):
    """R replicas of one architecture (``models``: R built models of the same class and shapes), ``mode`` 'loop' or
    'vmap' (module docstring). Inputs and outputs carry the replica dimension first: ``forward(images [R, B, ...],
    tasks [R, B])`` -> [R, B, C] for a single-branch model, ``forward(images)`` -> [R, B, T, C] for a multi-branch
    one; ``trunk`` and ``heads`` likewise (the weightings on task gradients). With ``memory_format``
    channels_last every replica's conv weight is a channels_last slice of its stacked tensor, as in a separate run.
    In training mode a model with random modules needs ``seed_noise`` first."""

    def __init__(self, models, mode="loop", memory_format=torch.contiguous_format):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown stacking mode {mode!r}; valid: {', '.join(MODES)}")
        template = models[0]
        shapes = [[(name, p.shape) for name, p in m.state_dict().items()] for m in models]
        if any(type(m) is not type(template) or s != shapes[0] for m, s in zip(models, shapes)):
            raise ValueError("stacked replicas must be models of one class with the same parameter shapes")
        self.mode, self.num_replicas, self.paradigm = mode, len(models), template.paradigm
        apply_fn = _Apply(copy.deepcopy(template).to("meta"))  # not a submodule: its meta tensors are not ours
        object.__setattr__(self, "_apply_fn", apply_fn)
        object.__setattr__(self, "template", apply_fn.model)
        self.memory_format = memory_format
        self.param_names = [name for name, _ in template.named_parameters()]
        self.buffer_names = [name for name, _ in template.named_buffers()]
        named = [dict(m.named_parameters()) for m in models]
        self.stacked = nn.ParameterList(
            nn.Parameter(_stack([n[name].detach() for n in named], memory_format),
                         requires_grad=named[0][name].requires_grad) for name in self.param_names)
        named = [dict(m.named_buffers()) for m in models]
        for index, name in enumerate(self.buffer_names):
            self.register_buffer(f"buffer{index}", _stack([n[name] for n in named], memory_format))
        self.uniform_fed, self.generator_fed = _random_modules(self.template)
        if mode == "vmap" and self.generator_fed:
            raise ValueError(f"stacking mode 'vmap' cannot draw {_label(self.generator_fed[0])} per replica; "
                             f"use 'loop'")
        self.random = bool(self.uniform_fed or self.generator_fed)
        self.generators = None
        # the training hooks that the template's class defines (those of models/hooks.py do nothing: not called)
        self.hooked = {name for name in ("before_step", "penalty", "epoch_record")
                       if getattr(type(template), name) is not getattr(TrainingHooks, name)}
        self.template.train(self.training)

    def train(self, mode=True):
        super().train(mode)
        self.template.train(mode)
        return self

    def tensors(self):
        """{name: stacked [R, ...] tensor} of every parameter and buffer, by the template's names."""
        buffers = [getattr(self, f"buffer{index}") for index in range(len(self.buffer_names))]
        return {**dict(zip(self.param_names, self.stacked)), **dict(zip(self.buffer_names, buffers))}

    def parameter(self, name):
        """The stacked parameter [R, ...] of the template's parameter ``name``."""
        return self.stacked[self.param_names.index(name)]

    def seed_noise(self, seeds):
        """One generator per replica for the model's own draws, seeded as its separate run seeds torch's generator
        (``torch.manual_seed(seed)`` seeds the CPU and CUDA generators alike)."""
        device = self.stacked[0].device
        if self.generators is None or len(self.generators) != len(seeds):
            self.generators = [torch.Generator(device=device) for _ in seeds]
        for generator, seed in zip(self.generators, seeds):  # the same generators every epoch (a CUDA graph's)
            generator.manual_seed(seed)

    def noise_generators(self):
        """The generators of the model's own draws that a CUDA graph of the step must register."""
        return list(self.generators or []) if self.random else []

    def call(self, fn, *args, draws=True):
        """``fn(model, *args)`` for every replica, replica r with its own tensors and ``arg[r]`` of each [R, ...]
        argument; the results (a tensor or a tuple of tensors) are stacked along a new first dimension. In training
        mode each replica draws its model noise from its generator, unless ``draws`` is False (for an ``fn`` that
        samples nothing)."""
        self._apply_fn.fn = fn
        noisy = draws and self.training and self.random
        if noisy and self.generators is None:
            raise RuntimeError("a stacked model with random modules needs seed_noise(seeds) before training")
        tensors = {f"model.{name}": tensor for name, tensor in self.tensors().items()}
        noise = self._uniform_draws() if noisy else []
        try:
            if self.mode == "vmap":
                return vmap(self._replica_call)(tensors, noise, *args)
            outputs = []
            for r in range(self.num_replicas):
                self._feed_generators(r if noisy else None)
                outputs.append(self._replica_call({name: t[r] for name, t in tensors.items()},
                                                  [n[r] for n in noise],
                                                  *(arg[r] for arg in args)))
            if isinstance(outputs[0], tuple):
                return tuple(torch.stack(parts) for parts in zip(*outputs))
            return torch.stack(outputs)
        finally:
            self._unfeed()

    def _replica_call(self, tensors, noise, *args):
        for module, uniform in zip(self.uniform_fed, noise):
            module.noise = uniform
        return functional_call(self._apply_fn, tensors, args)

    def _uniform_draws(self):
        """Per module fed ``"uniform"`` (in module order, the order of a forward pass), the U(0, 1) draws
        [R, *noise_shape()] of every replica from its own generator: what the module draws in its separate run."""
        per_replica = [self._replica_noise(r) for r in range(self.num_replicas)]
        return [torch.stack(draws) for draws in zip(*per_replica)]

    def _replica_noise(self, r):
        """Replica r's U(0, 1) draws of every module fed ``"uniform"``, from its generator."""
        dtype, device = self.stacked[0].dtype, self.stacked[0].device
        return [torch.rand(module.noise_shape(), generator=self.generators[r], dtype=dtype, device=device)
                for module in self.uniform_fed]

    def _feed_generators(self, r):
        """Replica r's generator to every module fed ``"generator"``; r None: torch's global generator."""
        for module in self.generator_fed:
            module.generator = None if r is None else self.generators[r]

    def _unfeed(self):
        """Every random module back to torch's global generator."""
        for module in self.uniform_fed:
            module.noise = None
        self._feed_generators(None)

    def replica(self, r):
        """Replica r as the model of one run (``Replica``), for a weighting's ``backward``."""
        return Replica(self, r)

    def hook(self, r, name, *args):
        """The template's training hook ``name`` (models/hooks.py) of replica r: with its tensors, drawing no noise."""
        self._apply_fn.fn = lambda model, *values: getattr(model, name)(*values)
        tensors = {f"model.{key}": tensor[r] for key, tensor in self.tensors().items()}
        return functional_call(self._apply_fn, tensors, args)

    # the training hooks of models/hooks.py, for every replica: the stacked engine calls them as the step of one run
    # calls its model's

    def before_step(self, update, options):
        if "before_step" in self.hooked:
            for r in range(self.num_replicas):
                self.hook(r, "before_step", update, options)

    def after_backward(self, options):
        """The gradient of every replica's ``penalty``: of their sum (each replica's slices get its own)."""
        penalties = [self.hook(r, "penalty", options) for r in range(self.num_replicas)] \
            if "penalty" in self.hooked else [None]
        if all(penalty is not None for penalty in penalties):
            torch.stack(penalties).sum().backward()

    def epoch_records(self):
        """Every replica's ``epoch_record()``."""
        if "epoch_record" not in self.hooked:
            return [{} for _ in range(self.num_replicas)]
        return [self.hook(r, "epoch_record") for r in range(self.num_replicas)]

    def _name_of(self, template_parameter):
        return next(name for name, p in self.template.named_parameters() if p is template_parameter)

    def forward(self, images, tasks=None):
        if self.paradigm == "single_branch":
            return self.call(lambda model, x, t: model(x, t), images, tasks)
        return self.call(lambda model, x: model(x), images)

    @property
    def dtype(self):
        return self.stacked[0].dtype

    def per_replica(self, fn, *args):
        """``fn(*args[r])`` of every replica, stacked: under ``vmap`` in that mode (one batched kernel), else one
        replica after the other."""
        if self.mode == "vmap":
            return vmap(fn)(*args)
        return torch.stack([fn(*(arg[r] for arg in args)) for r in range(self.num_replicas)])

    def replica_state_dict(self, r):
        """Replica r's ``state_dict()``: the same keys and values as its separate run's model."""
        tensors = self.tensors()
        return {key: tensors[key][r].detach().clone() for key in self.template.state_dict()}

    def load_replica_state_dict(self, r, state):
        """Sets replica r from a separate run's (or ``replica_state_dict``'s) model state; RuntimeError naming the
        keys that do not fit."""
        tensors = self.tensors()
        expected = list(self.template.state_dict())
        wrong = sorted(set(state) ^ set(expected)) + [k for k in expected if k in state and
                                                        tuple(state[k].shape) != tuple(tensors[k].shape[1:])]
        if wrong:
            raise RuntimeError(f"replica state does not fit the stacked model: keys {wrong}")
        with torch.no_grad():
            for key in expected:
                tensors[key][r].copy_(state[key])


class Replica:
    """Replica r of a ``StackedModel`` seen as its separate run's model, for the rule of a weighting written for one
    run (weighting/batched.py): ``forward``, ``trunk``, ``heads``, ``last_shared_layer`` and ``dropout`` on views of
    its slices of the stacked tensors (taken once, so that ``autograd.grad`` with respect to ``last_shared_layer``
    reaches the forward pass), its random draws from its own generator. A dropout that the rule holds (the model's
    ``dropout.hold()``) keeps its masks across the calls."""

    def __init__(self, stack, r):
        self.stack, self.r, self.paradigm = stack, r, stack.paradigm
        self.tensors = {f"model.{name}": tensor[r] for name, tensor in stack.tensors().items()}
        self.dropout = getattr(stack.template, "dropout", None)

    def call(self, fn, *args):
        stack = self.stack
        stack._apply_fn.fn = fn
        noisy = stack.training and stack.random
        try:
            stack._feed_generators(self.r if noisy else None)
            return stack._replica_call(self.tensors, stack._replica_noise(self.r) if noisy else [], *args)
        finally:
            stack._unfeed()

    def __call__(self, images):
        return self.call(lambda model, x: model(x), images)

    def trunk(self, images):
        return self.call(lambda model, x: model.trunk(x), images)

    def heads(self, rep):
        return self.call(lambda model, z: model.heads(z), rep)

    @property
    def last_shared_layer(self):
        """GradNorm's W: ``.weight`` of the template's ``last_shared_layer``, replica r's view."""
        template = self.stack.template
        name = next(name for name, m in template.named_modules() if m is template.last_shared_layer)
        return types.SimpleNamespace(weight=self.tensors[f"model.{name}.weight"])


def _random_modules(model):
    """The modules of ``model`` with random draws of their own (``random_draws``, models/hooks.py), in module order:
    ``(fed "uniform", fed "generator")``."""
    declared = [(m, getattr(type(m), "random_draws", None)) for m in model.modules()]
    for module, how in declared:
        if how is not None and how not in RANDOM_DRAWS:
            raise ValueError(f"{type(module).__name__}.random_draws is {how!r}; valid: {', '.join(RANDOM_DRAWS)}")
    return [m for m, how in declared if how == "uniform"], [m for m, how in declared if how == "generator"]


def _label(module):
    """What ``module`` draws, in words (its ``random_draws_label``), for a message."""
    return getattr(module, "random_draws_label", f"the random draws of {type(module).__name__}")


def _stack(tensors, memory_format):
    """[R, ...] from R equal-shaped tensors; with channels_last, a 4-d tensor's slices [r] are channels_last."""
    if memory_format == torch.channels_last and tensors[0].dim() == 4:
        return torch.stack([t.permute(0, 2, 3, 1) for t in tensors]).permute(0, 1, 4, 2, 3)
    return torch.stack(tensors)


def stacked_groups(params, stacked, weighting):
    """The separate run's groups (``training.optim.parameter_groups`` of the template), every parameter replaced by
    its stacked one, in the same order, so that optimiser state indices agree with a separate run's."""
    groups = optim.parameter_groups(params, stacked.template, None)
    for group in groups:
        group["params"] = [stacked.parameter(stacked._name_of(p)) for p in group["params"]]
    if weighting is not None:
        groups[0]["params"] += list(weighting.parameters())
    return groups


def stack_runs(runs, params, mode="loop"):
    """``(model, weighting, optimizer)`` of the stack of R separate runs ``runs`` (their ``(model, weighting,
    optimizer)`` as the training script builds them, in ``params``' memory format), each replica holding a copy of
    its run's current state."""
    model = StackedModel([m for m, _, _ in runs], mode, MEMORY_FORMATS[params["memory_format"]])
    weighting = StackedWeighting([w for _, w, _ in runs]) if runs[0][1] is not None else None
    optimizer = make_optimizer(params, stacked_groups(params, model, weighting))
    for r, (_, _, separate) in enumerate(runs):
        load_replica_optimizer_state(optimizer, r, separate.state_dict())
    return model, weighting, optimizer


def replica_optimizer_state(optimizer, r):
    """Replica r's ``optimizer.state_dict()``, as its separate run's optimiser would hold it: the state tensors of a
    stacked parameter's shape sliced at r, the shared step counts copied."""
    saved = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {index: {key: (value[r] if torch.is_tensor(value) and value.shape == params[index].shape else value)
                     .clone() if torch.is_tensor(value) else value for key, value in entry.items()}
             for index, entry in saved["state"].items()}
    return {"state": state, "param_groups": copy.deepcopy(saved["param_groups"])}


def load_replica_optimizer_state(optimizer, r, saved):
    """Sets replica r's slice of the optimiser state from a separate run's ``optimizer.state_dict()`` (and the
    hyperparameters of every group from it: all replicas share them). The shared step counts must agree with the
    replicas already loaded: ValueError otherwise."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if len(saved["param_groups"]) != len(optimizer.param_groups) or \
            sum(len(g["params"]) for g in saved["param_groups"]) != len(params):
        raise ValueError("the optimiser state does not fit the stacked parameters (other groups or parameters)")
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        group.update({key: value for key, value in saved_group.items() if key != "params"})
    for index, entry in saved["state"].items():
        param, mine = params[index], optimizer.state[params[index]]
        for key, value in entry.items():
            if torch.is_tensor(value) and value.shape == param.shape[1:]:
                mine.setdefault(key, torch.zeros_like(param))[r].copy_(value)
            elif key in mine and not (torch.equal(mine[key], value) if torch.is_tensor(value) else mine[key] == value):
                raise ValueError(f"replica {r}: optimiser state {key!r} differs from the other replicas' ({value} "
                                 f"vs {mine[key]}); stacked replicas step in sync")
            else:
                mine[key] = value.clone() if torch.is_tensor(value) else value


