"""The weighting of R stacked runs (training/stacked.py, training/engine.py), from the rule written for one run.

The R runs' weightings of one rule (``Weighting.stackable``: the paper's Table 2, sum, uniform, kendall, gradnorm,
mgda) are one module whose every parameter and buffer is the runs' stacked along a leading dimension, [R, ...],
replica r's slice its separate run's. Each call of the rule for replica r runs the rule's own method with replica
r's slices in place of its tensors (``torch.func.functional_call``: gradients and in-place updates reach the
slices): ``combine`` of replica r's task losses for a rule on the losses (``combines_losses``; the losses of all
replicas come from one pass of the stacked model, and one backward pass of their sum gives each replica its own
run's gradients), else the rule's ``backward`` with replica r's model (``StackedModel.replica``) and batch. The
rules run with ``sync_free`` (MGDA: the solver that never waits for the host, for CUDA graphs).
"""
import copy

import torch
import torch.nn as nn
from torch.func import functional_call, vmap

from losses import per_task_cross_entropy

from . import WEIGHTINGS

STACKED_WEIGHTINGS = tuple(name for name, cls in WEIGHTINGS.items() if cls.stackable)


class _Method(nn.Module):
    """``rule.<name>(*args)`` as a module's forward, so that ``functional_call`` can run any method of the rule."""

    def __init__(self, rule):
        super().__init__()
        self.rule, self.name = rule, None

    def forward(self, *args):
        return getattr(self.rule, self.name)(*args)


class StackedWeighting(nn.Module):
    """R runs' weightings of one stackable rule (built with ``build_weighting`` and the same options), every
    replica holding its separate weighting's state (on its device); ValueError (one line) for a rule without a
    stacked form or a setting that its stacked form cannot serve."""

    def __init__(self, weightings):
        super().__init__()
        first = weightings[0]
        if not first.stackable or any(type(w) is not type(first) for w in weightings):
            raise ValueError(f"no stacked form of weighting {type(first).__name__}; stacked runs support "
                             f"{', '.join(WEIGHTINGS[name].__name__ for name in STACKED_WEIGHTINGS)}")
        first.check_stackable()
        self.num_replicas, self.num_tasks = len(weightings), first.num_tasks
        self.method = _Method(copy.deepcopy(first))
        self.rule.sync_free = True
        with torch.no_grad():
            for name, parameter in first.named_parameters(recurse=False):
                setattr(self.rule, name, nn.Parameter(torch.stack([getattr(w, name) for w in weightings]),
                                                      requires_grad=parameter.requires_grad))
            for name, _ in first.named_buffers(recurse=False):
                self.rule.register_buffer(name, torch.stack([getattr(w, name) for w in weightings]))

    @property
    def rule(self):
        """The rule, holding the stacked [R, ...] tensors."""
        return self.method.rule

    def call(self, r, name, *args):
        """``rule.<name>(*args)`` of replica r: with its slices of the stacked parameters and buffers."""
        self.method.name = name
        tensors = {f"rule.{key}": value[r] for key, value in [*self.rule.named_parameters(recurse=False),
                                                               *self.rule.named_buffers(recurse=False)]}
        return functional_call(self.method, tensors, args)

    def backward(self, model, images, labels, num_valid):
        """The rule's step of every replica of the stacked ``model`` on images [R, B, ...], labels [R, B, T] with
        divisors [R, T]; the task losses [R, T]."""
        replicas = range(self.num_replicas)
        if self.rule.combines_losses:
            losses = vmap(per_task_cross_entropy)(model(images), labels, num_valid)  # a separate run's layout
            sum(self.call(r, "combine", losses[r]) for r in replicas).backward()
            return losses.detach()
        return torch.stack([self.call(r, "backward", model.replica(r), images[r], labels[r], num_valid[r])
                            for r in replicas])

    def after_step(self):
        for r in range(self.num_replicas):
            self.call(r, "after_step")

    def after_epoch(self):
        for r in range(self.num_replicas):
            self.call(r, "after_epoch")

    def weights(self):
        """Task weights [R, T], for logging."""
        return torch.stack([self.call(r, "weights") for r in range(self.num_replicas)])

    def replica_state_dict(self, r):
        """Replica r's ``state_dict()``: the keys and values of its separate run's weighting."""
        return {key: value[r].detach().clone() for key, value in self.rule.state_dict().items()}
