"""The stacked form of a weighting (training/stacked.py, training/engine.py): the weightings of R stacked runs as one module,
on the device and without host synchronisation. A rule with ``Weighting.stackable`` (the paper's Table 2: sum,
uniform, kendall, gradnorm, mgda) is written once over a leading run dimension (``Weighting.combine`` of losses
[R, T], ``Weighting.backward_runs``); its stacked form is a copy of the rule's module whose every parameter and buffer
is the runs' stacked along that dimension, [R, ...], replica r's slice its separate run's. The model is a stacked
model: ``model(images [R, B, ...])`` -> logits [R, B, T, C], ``per_replica``; ``trunk`` / ``heads`` and
``held_dropout_masks`` (MGDA) and ``last_shared_layer.weight`` [R, out, in] (GradNorm). ``backward`` returns the
per-task losses [R, T]. The losses of the replicas are summed before the backward pass, so each replica's
parameters get their own run's gradient.
"""
import copy

import torch
import torch.nn as nn

from . import WEIGHTINGS

STACKED_WEIGHTINGS = tuple(name for name, cls in WEIGHTINGS.items() if cls.stackable)


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
        self.rule = copy.deepcopy(first)
        with torch.no_grad():
            for name, parameter in first.named_parameters(recurse=False):
                setattr(self.rule, name, nn.Parameter(torch.stack([getattr(w, name) for w in weightings]),
                                                      requires_grad=parameter.requires_grad))
            for name, _ in first.named_buffers(recurse=False):
                self.rule.register_buffer(name, torch.stack([getattr(w, name) for w in weightings]))

    def backward(self, model, images, labels, num_valid):
        return self.rule.backward_runs(model, images, labels, num_valid)

    def after_step(self):
        self.rule.after_step()

    def after_epoch(self):
        self.rule.after_epoch()

    def weights(self):
        """Task weights [R, T], for logging."""
        return torch.broadcast_to(self.rule.weights(), (self.num_replicas, self.num_tasks))

    def replica_state_dict(self, r):
        """Replica r's ``state_dict()``: the keys and values of its separate run's weighting."""
        return {key: value[r].detach().clone() for key, value in self.rule.state_dict().items()}

