"""The random draws of a model's own modules (``random_draws``, models/hooks.py): a module that declares how it is
fed is seeded per replica of a stacked run exactly as in its separate run, in either feeding, with nothing in
training/stacked.py that knows the module."""
import copy

import pytest
import torch
import torch.nn as nn

from models.hooks import TrainingHooks
from training import stacked as stacking

SEEDS = (3, 4)
NOISE_SEEDS = (11, 12)  # what each separate run gives torch's global generator (loop.epoch_seed in training)


class UniformNoise(nn.Module):
    """Adds U(0, 1) noise of one shape; fed ``"uniform"``."""

    random_draws = "uniform"

    def __init__(self, shape):
        super().__init__()
        self.shape, self.noise = shape, None

    def noise_shape(self):
        return self.shape

    def forward(self, x):
        return x + (torch.rand(self.shape, dtype=x.dtype, device=x.device) if self.noise is None else self.noise)


class BernoulliMask(nn.Module):
    """Multiplies by a Bernoulli(0.5) mask per element; fed ``"generator"``."""

    random_draws = "generator"
    random_draws_label = "toy masks"

    def __init__(self):
        super().__init__()
        self.generator = None

    def forward(self, x):
        return x * torch.bernoulli(torch.full_like(x, 0.5), generator=self.generator)


class ToyModel(TrainingHooks, nn.Module):
    """[B, 4] -> [B, 1, 3]: a linear layer, then uniform noise, then (``masked``) a Bernoulli mask."""

    paradigm = "multi_branch"

    def __init__(self, masked):
        super().__init__()
        self.linear, self.noisy = nn.Linear(4, 3), UniformNoise((3,))
        self.mask = BernoulliMask() if masked else None

    def forward(self, x):
        out = self.noisy(self.linear(x))
        return (self.mask(out) if self.mask is not None else out).unsqueeze(1)


def train_steps(model, images, steps=3):
    """The outputs of ``steps`` SGD steps on the sum of squared outputs (of every replica, for a stack)."""
    optimizer, outputs = torch.optim.SGD(model.parameters(), lr=0.1), []
    for _ in range(steps):
        optimizer.zero_grad()
        outputs.append(model(images))
        outputs[-1].square().sum().backward()
        optimizer.step()
    return outputs


@pytest.mark.parametrize("masked,mode", [(True, "loop"), (False, "loop"), (False, "vmap")])
def test_a_module_declaring_its_draws_is_seeded_per_replica(float64, masked, mode):
    """Three training steps: every replica's outputs and weights equal its separate run's, whose draws come from
    torch's global generator seeded with the replica's seed; the replicas' draws differ."""
    runs = []
    for seed in SEEDS:
        torch.manual_seed(seed)
        runs.append(ToyModel(masked))
    stack = stacking.StackedModel([copy.deepcopy(model) for model in runs], mode)
    images = torch.randn(len(SEEDS), 5, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="needs seed_noise"):
        stack(images)
    stack.seed_noise(list(NOISE_SEEDS))
    stacked_outputs = train_steps(stack, images)
    for r, (model, seed) in enumerate(zip(runs, NOISE_SEEDS)):
        torch.manual_seed(seed)
        for step, output in enumerate(train_steps(model, images[r])):
            torch.testing.assert_close(stacked_outputs[step][r], output, rtol=1e-12, atol=1e-14,
                                       msg=f"replica {r} step {step}")
        for key, value in model.state_dict().items():
            torch.testing.assert_close(stack.replica_state_dict(r)[key], value, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(stacked_outputs[0][0], stacked_outputs[0][1])  # the replicas' draws differ
    assert stack.template.noisy.noise is None and (not masked or stack.template.mask.generator is None)
    assert len(stack.noise_generators()) == len(SEEDS)


def test_declared_draws_fail_with_one_line():
    with pytest.raises(ValueError, match="stacking mode 'vmap' cannot draw toy masks per replica; use 'loop'"):
        stacking.StackedModel([ToyModel(masked=True)] * 2, "vmap")
    model = ToyModel(masked=False)
    model.noisy.__class__ = type("Dice", (UniformNoise,), {"random_draws": "dice"})
    with pytest.raises(ValueError, match="Dice.random_draws is 'dice'; valid: uniform, generator"):
        stacking.StackedModel([model] * 2)
