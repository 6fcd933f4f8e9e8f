"""Loss weightings (weighting/) and per-task cross-entropy (losses.py), on a tiny stand-in multi-branch model."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from losses import per_task_cross_entropy
from models.hooks import TrainingHooks
from weighting import GradNorm, Kendall, WEIGHTINGS, build_weighting
from weighting.min_norm_solvers import find_min_norm_element

torch.set_num_threads(1)
DTYPE = torch.float64


class TinyMultiBranch(TrainingHooks, nn.Module):
    """Stand-in for the multi-branch LeNet: trunk = ReLU(fc(x)), one linear head per task."""

    def __init__(self, num_tasks, in_features=6, rep=5, num_classes=4):
        super().__init__()
        self.fc = nn.Linear(in_features, rep)
        self.task_heads = nn.ModuleList(nn.Linear(rep, num_classes) for _ in range(num_tasks))

    @property
    def last_shared_layer(self):
        return self.fc

    def trunk(self, x):
        return F.relu(self.fc(x))

    def heads(self, z):
        return torch.stack([head(z) for head in self.task_heads], dim=1)

    def forward(self, x):
        return self.heads(self.trunk(x))


def make_problem(num_tasks, seed, batch=8, num_classes=4):
    torch.manual_seed(seed)
    model = TinyMultiBranch(num_tasks, num_classes=num_classes).to(DTYPE)
    images = torch.randn(batch, 6, dtype=DTYPE)
    labels = torch.randint(0, num_classes, (batch, num_tasks))
    labels[::3, 0] = -1  # some invalid labels
    return model, images, labels


def loop_losses(model, images, labels):
    """Per-task losses with plain F.cross_entropy, one task at a time."""
    logits = model(images)
    return torch.stack([F.cross_entropy(logits[:, t], labels[:, t], ignore_index=-1) for t in range(labels.shape[1])])


def param_grads(model):
    return [p.grad.clone() for p in model.parameters()]


def grads_of(model, scalar_fn):
    """Gradients of scalar_fn(copy) w.r.t. a fresh copy of the model's parameters."""
    clone = copy.deepcopy(model)
    clone.zero_grad()
    scalar_fn(clone).backward()
    return param_grads(clone)


def assert_grads_close(actual, expected):
    for a, e in zip(actual, expected):
        assert torch.allclose(a, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["gradnorm", "mgda", "pcgrad", "imtl", "famo", "dwa"])
def test_the_statistics_of_a_rule_go_through_reduce(name):
    """What a rule computes from the batch (task gradients, losses) passes through ``Weighting.reduce`` (the
    identity in one process; training/ddp.py's average or gather over the ranks under torchrun): gradients with
    respect to the shared representation [T, B * D] as per-image columns, every other statistic as it is."""
    model, images, labels = make_problem(3, seed=0)
    weighting = build_weighting(name, 3).to(DTYPE)
    calls = []

    def reduce(statistic, per_image=False):
        calls.append((tuple(statistic.shape), per_image))
        return statistic
    weighting.reduce = reduce
    weighting.backward(model, images, labels)
    weighting.after_step()
    weighting.after_epoch()
    columns = (3, 8 * 5)  # T tasks x (B images x 5 features of z)
    expected = {"gradnorm": [((3, 5, 6), False), ((3,), False)], "mgda": [(columns, True), ((3,), False)],
                "pcgrad": [((3, 5 * 6 + 5), False)], "imtl": [(columns, True)], "famo": [((3,), False)] * 2,
                "dwa": [((3,), False)]}
    assert calls == expected[name]


# ---------------------------------------------------------------- per_task_cross_entropy


def test_per_task_cross_entropy_matches_loop():
    model, images, labels = make_problem(3, seed=0)
    losses = per_task_cross_entropy(model(images), labels)
    assert losses.shape == (3,)
    assert torch.allclose(losses, loop_losses(model, images, labels))
    assert_grads_close(grads_of(model, lambda m: per_task_cross_entropy(m(images), labels).sum()),
                       grads_of(model, lambda m: loop_losses(m, images, labels).sum()))


def test_per_task_cross_entropy_all_invalid_task():
    logits = torch.randn(5, 2, 10, requires_grad=True)
    labels = torch.randint(0, 10, (5, 2))
    labels[:, 1] = -1
    losses = per_task_cross_entropy(logits, labels)
    assert losses[1] == 0.0 and torch.isfinite(losses).all()
    assert losses[0].item() == pytest.approx(F.cross_entropy(logits[:, 0], labels[:, 0]).item())
    losses.sum().backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[:, 1] == 0).all()


# ---------------------------------------------------------------- uniform


def test_uniform():
    model, images, labels = make_problem(3, seed=1)
    weighting = build_weighting("uniform", 3, {})
    losses = weighting.backward(model, images, labels)
    assert not losses.requires_grad and torch.allclose(losses, loop_losses(model, images, labels))
    assert_grads_close(param_grads(model), grads_of(model, lambda m: loop_losses(m, images, labels).sum() / 3))
    assert torch.allclose(weighting.weights(), torch.full((3,), 1 / 3))


# ---------------------------------------------------------------- GradNorm


def manual_losses_and_grad_W(model, images, labels):
    """Per-task losses and grad_W L_t for W = fc.weight, by the chain rule without autograd:
    dL_t/dlogits = (softmax - onehot) / n_valid on valid rows, dL_t/dz = that @ V_t, through the ReLU, @ x."""
    with torch.no_grad():
        pre = model.fc(images)
        z = pre.clamp(min=0)
        losses, grads = [], []
        for t, head in enumerate(model.task_heads):
            valid = labels[:, t] >= 0
            logits = head(z)
            log_probs = logits - logits.logsumexp(dim=1, keepdim=True)
            onehot = F.one_hot(labels[:, t].clamp(min=0), logits.shape[1]).to(DTYPE)
            n_valid = valid.sum()
            losses.append(-(log_probs * onehot).sum(1)[valid].sum() / n_valid)
            d_logits = (log_probs.exp() - onehot) * valid[:, None] / n_valid
            d_pre = (d_logits @ head.weight) * (pre > 0)
            grads.append(d_pre.T @ images)
    return torch.stack(losses), grads


def test_gradnorm_hand_computed_step():
    num_tasks, alpha = 3, 1.5
    model, images, labels = make_problem(num_tasks, seed=2)
    weighting = GradNorm(num_tasks, alpha=alpha).to(DTYPE)

    # step 1 stores L_i(0)
    losses0 = weighting.backward(model, images, labels)
    expected_losses0, _ = manual_losses_and_grad_W(model, images, labels)
    assert torch.allclose(losses0, expected_losses0)
    assert torch.equal(weighting.initial_losses, losses0)

    # step 2: another batch and unequal weights
    model.zero_grad()
    weighting.zero_grad()
    with torch.no_grad():
        weighting.task_weights.copy_(torch.tensor([0.5, 1.7, 0.8], dtype=DTYPE))
    images2 = torch.randn_like(images)
    labels2 = torch.randint(0, 4, labels.shape)
    losses = weighting.backward(model, images2, labels2)

    manual_losses, grad_W = manual_losses_and_grad_W(model, images2, labels2)
    assert torch.allclose(losses, manual_losses)
    w = torch.tensor([0.5, 1.7, 0.8], dtype=DTYPE)
    norms = torch.stack([g.norm() for g in grad_W])
    G = w * norms
    ratios = manual_losses / expected_losses0
    targets = G.mean() * (ratios / ratios.mean()) ** alpha
    assert torch.allclose(weighting.task_weights.grad, torch.sign(G - targets) * norms)
    assert weighting.task_weights.grad.abs().min() > 0  # no task exactly on target in this case

    # network grads: only from sum_i w_i L_i (the gradient loss must not reach the network)
    assert_grads_close(param_grads(model), grads_of(model, lambda m: (w * loop_losses(m, images2, labels2)).sum()))


def test_gradnorm_renormalisation_and_clamp():
    weighting = GradNorm(2)
    with torch.no_grad():
        weighting.task_weights.copy_(torch.tensor([3.0, 1.0]))
    weighting.after_step()
    assert torch.allclose(weighting.weights(), torch.tensor([1.5, 0.5]))
    with torch.no_grad():
        weighting.task_weights.copy_(torch.tensor([-1.0, 3.0]))
    weighting.after_step()
    assert (weighting.weights() > 0).all() and weighting.weights().sum().item() == pytest.approx(2.0)


def test_gradnorm_state_and_task_without_labels():
    model, images, labels = make_problem(2, seed=3)
    weighting = GradNorm(2).to(DTYPE)
    assert {"task_weights", "initial_losses"} <= set(weighting.state_dict())
    assert [p is weighting.task_weights for p in weighting.parameters()] == [True]
    labels[:, 1] = -1  # task 1 has no label in the first batch: L_1(0) is taken at its first labelled batch
    weighting.backward(model, images, labels)
    assert weighting.initial_losses[1] == 0.0
    assert all(torch.isfinite(g).all() for g in param_grads(model))
    assert torch.isfinite(weighting.task_weights.grad).all()
    labels[:, 1] = 0
    losses = weighting.backward(model, images, labels)
    assert weighting.initial_losses[1] == losses[1]


# ---------------------------------------------------------------- Kendall


@pytest.mark.parametrize("variant, c, d, s_init", [
    ("gal", 1.0, 1.0, 0.0),
    ("classification", 1.0, 0.5, 0.0),
    ("regression", 0.5, 0.5, -0.5),
])
def test_kendall_closed_form(variant, c, d, s_init):
    weighting = build_weighting("kendall", 3, {"variant": variant})
    assert torch.equal(weighting.log_vars.detach(), torch.full((3,), s_init))
    s = torch.tensor([0.3, -0.2, 1.1])
    with torch.no_grad():
        weighting.log_vars.copy_(s)
    losses = torch.tensor([2.0, 0.7, 1.3], requires_grad=True)
    total = weighting.combine(losses)
    expected = sum(c * math.exp(-si) * li + d * si for si, li in zip(s.tolist(), [2.0, 0.7, 1.3]))
    assert total.item() == pytest.approx(expected)
    total.backward()
    assert torch.allclose(weighting.log_vars.grad, -c * torch.exp(-s) * losses.detach() + d)
    assert torch.allclose(losses.grad, c * torch.exp(-s))
    assert torch.allclose(weighting.weights(), c * torch.exp(-s))


def test_kendall_backward_fills_model_and_log_var_grads():
    model, images, labels = make_problem(2, seed=4)
    weighting = Kendall(2).to(DTYPE)
    losses = weighting.backward(model, images, labels)
    assert_grads_close(param_grads(model), grads_of(model, lambda m: loop_losses(m, images, labels).sum()))
    assert torch.allclose(weighting.log_vars.grad, 1.0 - losses)
    assert "log_vars" in weighting.state_dict()


# ---------------------------------------------------------------- MGDA


def grads_wrt_rep(model, images, labels):
    """SK MGDA-UB step 2: one forward/backward per task on a detached copy of z; returns [T, B * rep]."""
    z = model.trunk(images).detach()
    grads = []
    for t in range(labels.shape[1]):
        z_t = z.clone().requires_grad_()
        loss = F.cross_entropy(model.heads(z_t)[:, t], labels[:, t], ignore_index=-1)
        grads.append(torch.autograd.grad(loss, z_t)[0].flatten())
    return torch.stack(grads)


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_mgda_two_tasks_closed_form(seed):
    model, images, labels = make_problem(2, seed=seed)
    weighting = build_weighting("mgda", 2, {}).to(DTYPE)
    weighting.backward(model, images, labels)

    G = grads_wrt_rep(model, images, labels)
    M = G @ G.T
    gamma = ((M[1, 1] - M[0, 1]) / (M[0, 0] + M[1, 1] - 2 * M[0, 1])).clamp(0, 1).item()
    alpha = torch.tensor([gamma, 1 - gamma], dtype=DTYPE)
    used = weighting.weights()
    assert torch.allclose(used, alpha, atol=1e-6)
    assert_grads_close(param_grads(model), grads_of(model, lambda m: (used * loop_losses(m, images, labels)).sum()))


def test_mgda_two_tasks_interior_solution():
    """A case where both tasks get weight, so the check above is not only about vertices."""
    model, images, labels = make_problem(2, seed=0, batch=16)
    labels[:, 1] = labels[:, 0].clamp(min=0)  # correlated tasks
    weighting = build_weighting("mgda", 2, {}).to(DTYPE)
    weighting.backward(model, images, labels)
    G = grads_wrt_rep(model, images, labels)
    M = G @ G.T
    gamma = ((M[1, 1] - M[0, 1]) / (M[0, 0] + M[1, 1] - 2 * M[0, 1])).item()
    assert 0 < gamma < 1 and weighting.weights()[0].item() == pytest.approx(gamma, abs=1e-6)


@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
def test_mgda_normalization(normalization):
    model, images, labels = make_problem(3, seed=8)
    weighting = build_weighting("mgda", 3, {"normalization": normalization}).to(DTYPE)
    losses = weighting.backward(model, images, labels)
    G = grads_wrt_rep(model, images, labels)
    scale = {"none": 1.0, "l2": G.norm(dim=1), "loss": losses, "loss+": losses * G.norm(dim=1)}[normalization]
    G = G / (scale[:, None] if torch.is_tensor(scale) else scale)
    expected, _ = find_min_norm_element(G)
    assert torch.allclose(weighting.weights(), expected, atol=1e-6)
    # the final loss uses the raw losses, whatever the normalisation
    assert_grads_close(param_grads(model), grads_of(model, lambda m: (expected * loop_losses(m, images, labels)).sum()))
    assert "alpha" in weighting.state_dict()


# ---------------------------------------------------------------- registry


def test_build_weighting_errors():
    assert list(WEIGHTINGS) == ["uniform", "sum", "gradnorm", "kendall", "mgda", "dwa", "rlw", "pcgrad", "cagrad",
                                "imtl", "nash_mtl", "aligned_mtl", "famo"]
    with pytest.raises(ValueError, match="unknown weighting 'dwb'; valid: uniform, sum, gradnorm, kendall, mgda, dwa"):
        build_weighting("dwb", 2, {})
    with pytest.raises(ValueError, match="valid: alpha"):
        build_weighting("gradnorm", 2, {"alhpa": 1.0})
    with pytest.raises(ValueError, match="valid: normalization, max_iter"):
        build_weighting("mgda", 2, {"normalisation": "l2"})
    with pytest.raises(ValueError, match="valid: none"):
        build_weighting("uniform", 2, {"alpha": 1.0})
    with pytest.raises(ValueError, match="valid: gal, classification, regression"):
        build_weighting("kendall", 2, {"variant": "gaussian"})
    with pytest.raises(ValueError, match="valid: none, l2, loss, loss\\+"):
        build_weighting("mgda", 2, {"normalization": "L2"})
    assert build_weighting("gradnorm", 2, {"alpha": 0.12}).alpha == 0.12
    assert build_weighting("mgda", 4, {"max_iter": 10}).max_iter == 10
