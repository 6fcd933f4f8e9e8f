"""The weightings beyond the paper (docs/weightings.md) against hand-computed cases: for the rules on task gradients,
known gradient vectors g_t (rows of G, conflicting where it matters) and the combined update worked out by hand; for
DWA, RLW and FAMO, known loss histories, seeded draws and one logit update. Then one step of each on the tiny
multi-branch model of test_weighting.py, against autograd."""
import itertools
import math

import pytest
import torch

from training import config
from test_weighting import DTYPE, assert_grads_close, grads_of, loop_losses, make_problem, param_grads
from weighting import WEIGHTINGS, build_weighting

SQRT2, SQRT3, SQRT5, SQRT6 = math.sqrt(2), math.sqrt(3), math.sqrt(5), math.sqrt(6)


def rows(*vectors):
    return torch.tensor(vectors, dtype=DTYPE)


def update(name, grads, **options):
    """(beta, beta @ G) of weighting ``name`` for the task gradients ``grads`` [T, D]."""
    beta = build_weighting(name, len(grads), options).coefficients(grads)
    return beta, beta @ grads


def close(actual, expected, tol=1e-9):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=DTYPE), rtol=0, atol=tol)


# ---------------------------------------------------------------- PCGrad (Yu et al. 2020, Alg. 1)


def test_pcgrad_two_conflicting_tasks():
    # g1.g2 = -1 < 0: g1^PC = g1 - (-1/2) g2 = (1/2, 1/2), g2^PC = g2 - (-1/1) g1 = (0, 1); update (1/2, 3/2)
    beta, step = update("pcgrad", rows([1.0, 0.0], [-1.0, 1.0]))
    close(step, [0.5, 1.5])
    close(beta, [2.0, 1.5])


def test_pcgrad_leaves_agreeing_gradients_alone():
    beta, step = update("pcgrad", rows([1.0, 0.0], [1.0, 1.0], [0.0, 2.0]))
    close(beta, [1.0, 1.0, 1.0])
    close(step, [2.0, 3.0])


def test_pcgrad_three_tasks_order_free():
    # g3 is orthogonal to g1 and g2: the order does not matter; g1, g2 as in the two-task case
    _, step = update("pcgrad", rows([1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 1.0]))
    close(step, [0.5, 1.5, 1.0])


def test_pcgrad_three_tasks_is_one_of_the_random_orders():
    grads = rows([1.0, 0.0], [-1.0, 0.5], [0.2, -1.0])

    def projected(i, order):  # Alg. 1 for task i with the other tasks in this order, on the vectors themselves
        g = grads[i].clone()
        for j in order:
            if g @ grads[j] < 0:
                g = g - (g @ grads[j]) / (grads[j] @ grads[j]) * grads[j]
        return g

    options = [[projected(i, order) for order in itertools.permutations([j for j in range(3) if j != i])]
               for i in range(3)]
    sums = [sum(choice) for choice in itertools.product(*options)]
    assert len({tuple(s.round(decimals=9).tolist()) for s in sums}) > 1  # the order matters in this case
    torch.manual_seed(0)
    for _ in range(5):
        _, step = update("pcgrad", grads)
        assert any(torch.allclose(step, s, atol=1e-9) for s in sums)


# ---------------------------------------------------------------- CAGrad (Liu et al. 2021, Sec. 3.1)


def cagrad_dual(grads, w, c):
    """F(w) = g_w . g0 + c ||g0|| ||g_w||."""
    g0, gw = grads.mean(0), w @ grads
    return float(gw @ g0 + c * g0.norm() * gw.norm())


def ternary(f, low=0.0, high=1.0, steps=200):
    """Minimiser of a convex function on [low, high]."""
    for _ in range(steps):
        a, b = low + (high - low) / 3, high - (high - low) / 3
        low, high = (low, b) if f(a) <= f(b) else (a, high)
    return (low + high) / 2


def cagrad_by_search(grads, c):
    """d = (g0 + c ||g0|| / ||g_w|| g_w) / (1 + c^2) with w found by (nested) ternary search over the simplex."""
    if len(grads) == 2:
        gamma = ternary(lambda a: cagrad_dual(grads, torch.tensor([a, 1 - a], dtype=DTYPE), c))
        w = torch.tensor([gamma, 1 - gamma], dtype=DTYPE)
    else:
        def inner(a):
            b = ternary(lambda b: cagrad_dual(grads, torch.tensor([a, (1 - a) * b, (1 - a) * (1 - b)], dtype=DTYPE), c))
            return torch.tensor([a, (1 - a) * b, (1 - a) * (1 - b)], dtype=DTYPE)
        w = inner(ternary(lambda a: cagrad_dual(grads, inner(a), c), steps=60))
    g0, gw = grads.mean(0), w @ grads
    return (g0 + c * g0.norm() / gw.norm() * gw) / (1 + c**2)


def test_cagrad_two_symmetric_conflicting_tasks():
    # unit gradients 120 degrees apart: w = (1/2, 1/2) by symmetry, g_w = g0, ||g0|| = 1/2: d = (1 + c) g0 / (1 + c^2)
    c = 0.4
    beta, step = update("cagrad", rows([1.0, 0.0], [-0.5, SQRT3 / 2]), c=c)
    close(beta, [(1 + c) / (2 * (1 + c**2))] * 2)
    close(step, [(1 + c) / (1 + c**2) * 0.25, (1 + c) / (1 + c**2) * SQRT3 / 4])


def test_cagrad_three_orthogonal_tasks():
    c = 0.4
    beta, _ = update("cagrad", torch.eye(3, dtype=DTYPE), c=c)
    close(beta, [(1 + c) / (3 * (1 + c**2))] * 3)


@pytest.mark.parametrize("num_tasks", [2, 3])
def test_cagrad_c_zero_is_gradient_descent_on_the_mean(num_tasks):
    grads = rows([1.0, 0.0, 2.0], [-3.0, 1.0, 0.0], [0.5, -1.0, -1.0])[:num_tasks]
    beta, step = update("cagrad", grads, c=0.0)
    close(beta, [1.0 / num_tasks] * num_tasks)


@pytest.mark.parametrize("grads", [rows([2.0, 0.0], [-1.0, 0.5]),
                                   rows([1.0, 0.0, 1.0], [-2.0, 1.0, 0.0], [0.0, -1.0, 0.3])])
def test_cagrad_conflicting_tasks_match_a_direct_search(grads):
    for c in (0.4, 2.0):
        _, step = update("cagrad", grads, c=c)
        close(step, cagrad_by_search(grads, c), tol=1e-6)


# ---------------------------------------------------------------- IMTL-G (Liu et al. 2021, Sec. 3.2)


def test_imtl_two_tasks():
    # orthogonal g1 = (2, 0), g2 = (0, 1): alpha_2 = g1.(u1 - u2) / ((g1 - g2).(u1 - u2)) = 2 / 3
    beta, step = update("imtl", rows([2.0, 0.0], [0.0, 1.0]))
    close(beta, [1 / 3, 2 / 3])
    close(step, [2 / 3, 2 / 3])
    # conflicting g1 = (1, 0), g2 = (-1, 1): alpha_2 = (1 + 1/sqrt2) / (2 + 3/sqrt2) = sqrt2 - 1
    beta, step = update("imtl", rows([1.0, 0.0], [-1.0, 1.0]))
    close(beta, [2 - SQRT2, SQRT2 - 1])
    close(step, [3 - 2 * SQRT2, SQRT2 - 1])  # equal projections 3 - 2 sqrt2 on u1 and u2


def test_imtl_three_tasks():
    # orthogonal gradients of norms 1, 2, 4: alpha_t ||g_t|| equal, sum 1 -> (4/7, 2/7, 1/7)
    beta, _ = update("imtl", rows([1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 4.0]))
    close(beta, [4 / 7, 2 / 7, 1 / 7])
    grads = rows([1.0, 0.0, 0.5], [-2.0, 1.0, 0.0], [0.3, -1.0, -1.0])  # every pair conflicts
    beta, step = update("imtl", grads)
    projections = step @ (grads / grads.norm(dim=1, keepdim=True)).T
    close(projections, [projections[0].item()] * 3)
    assert beta.sum().item() == pytest.approx(1.0) and projections[0] > 0


def test_imtl_task_without_gradient_gets_zero():
    beta, _ = update("imtl", rows([2.0, 0.0], [0.0, 0.0], [0.0, 1.0]))
    close(beta, [1 / 3, 0.0, 2 / 3])


# ---------------------------------------------------------------- Nash-MTL (Navon et al. 2022, Sec. 3.1)


def test_nash_mtl_two_tasks():
    beta, step = update("nash_mtl", rows([2.0, 0.0], [0.0, 1.0]), max_norm=0.0)
    close(beta, [0.5, 1.0], tol=1e-8)  # alpha_t^2 ||g_t||^2 = 1
    # g1 = (1, 0), g2 = (-1/2, 1): alpha_1 (alpha_1 - alpha_2 / 2) = 1, alpha_2 (5/4 alpha_2 - alpha_1 / 2) = 1,
    # subtracting: alpha_1^2 = 5/4 alpha_2^2, so alpha_2 = 2 / sqrt(5 - sqrt5), alpha_1 = sqrt5 / 2 alpha_2
    alpha2 = 2 / math.sqrt(5 - SQRT5)
    beta, step = update("nash_mtl", rows([1.0, 0.0], [-0.5, 1.0]), max_norm=0.0)
    close(beta, [SQRT5 / 2 * alpha2, alpha2], tol=1e-8)
    assert step.norm().item() == pytest.approx(SQRT2)  # ||sum alpha_t g_t||^2 = T


def test_nash_mtl_three_tasks_and_clipping():
    grads = rows([1.0, 0.0, 0.0], [-0.5, 1.0, 0.0], [0.0, 0.0, 2.0])  # g3 orthogonal: alpha_3 = 1 / ||g3||
    alpha2 = 2 / math.sqrt(5 - SQRT5)
    alpha = [SQRT5 / 2 * alpha2, alpha2, 0.5]
    beta, step = update("nash_mtl", grads, max_norm=0.0)
    close(beta, alpha, tol=1e-8)
    beta, step = update("nash_mtl", grads, max_norm=1.0)  # ||update|| = sqrt3, clipped to 1
    close(beta, [a / SQRT3 for a in alpha], tol=1e-8)
    assert step.norm().item() == pytest.approx(1.0)
    grads = rows([1.0, 0.2, 0.0], [-0.4, 1.0, 0.3], [0.3, -0.8, 1.0])
    beta, _ = update("nash_mtl", grads, max_norm=0.0)
    close(beta * (grads @ grads.T @ beta), [1.0, 1.0, 1.0], tol=1e-8)  # G G^T alpha = 1 / alpha


def test_nash_mtl_update_every_and_heads():
    weighting = build_weighting("nash_mtl", 2, {"update_weights_every": 2, "max_norm": 1.0})
    first = weighting.coefficients(rows([2.0, 0.0], [0.0, 1.0]))
    close(first, [0.5 / SQRT2, 1.0 / SQRT2], tol=1e-8)
    close(weighting.head_coefficients(first), [0.5, 1.0], tol=1e-8)  # the heads are not clipped
    second = weighting.coefficients(rows([1.0, 0.0], [0.0, 1.0]))  # alpha kept: (1/2, 1); ||update|| = sqrt(5)/2
    close(second, [0.5 / (SQRT5 / 2), 1.0 / (SQRT5 / 2)], tol=1e-8)
    third = weighting.coefficients(rows([1.0, 0.0], [0.0, 1.0]))  # recomputed: (1, 1), clipped by sqrt2
    close(third, [1 / SQRT2, 1 / SQRT2], tol=1e-8)


# ---------------------------------------------------------------- Aligned-MTL (Senushkin et al. 2023, Alg. 1)


def test_aligned_mtl_two_tasks():
    beta, step = update("aligned_mtl", rows([2.0, 0.0], [0.0, 1.0]))  # sigma_min = 1: B = diag(1/2, 1)
    close(beta, [0.5, 1.0])
    close(step, [1.0, 1.0])
    # G G^T = [[5, -2], [-2, 2]]: eigenvalues 1 (v = (1, 2)/sqrt5) and 6 (v = (2, -1)/sqrt5), sigma_min = 1:
    # B 1 = (v1 v1^T + v2 v2^T / sqrt6) 1 = (3, 6)/5 + (2, -1)/(5 sqrt6)
    beta, step = update("aligned_mtl", rows([SQRT5, 0.0], [-2 / SQRT5, math.sqrt(6 / 5)]))
    close(beta, [0.6 + 0.4 / SQRT6, 1.2 - 0.2 / SQRT6])


def test_aligned_mtl_three_tasks():
    grads = rows([SQRT5, 0.0, 0.0], [-2 / SQRT5, math.sqrt(6 / 5), 0.0], [0.0, 0.0, 2.0])  # eigenvalues 1, 6, 4
    beta, step = update("aligned_mtl", grads)
    close(beta, [0.6 + 0.4 / SQRT6, 1.2 - 0.2 / SQRT6, 0.5])
    grads = rows([1.0, 0.2, 0.0, 1.0], [-0.4, 1.0, 0.3, 0.0], [0.3, -0.8, 1.0, -0.5])
    weighting = build_weighting("aligned_mtl", 3, {})
    beta = weighting.coefficients(grads)
    # the aligned gradients: orthogonal, all of norm sigma_min; the update is their sum, beta @ G
    singular_min = torch.linalg.svdvals(grads).min()
    eigenvalues, basis = torch.linalg.eigh(grads @ grads.T)
    aligned = singular_min * basis @ torch.diag(eigenvalues**-0.5) @ basis.T @ grads
    close(aligned @ aligned.T, torch.eye(3, dtype=DTYPE) * singular_min**2, tol=1e-9)
    close(beta @ grads, aligned.sum(0))


# ---------------------------------------------------------------- DWA (Liu et al. 2019, Sec. 3.3)


def run_epochs(weighting, epoch_losses):
    """Feeds each epoch's per-step losses to ``combine``, then ``after_epoch``; returns the weights used per epoch."""
    used = []
    for steps in epoch_losses:
        used.append(weighting.weights().clone())
        for losses in steps:
            weighting.combine(torch.tensor(losses))
        weighting.after_epoch()
    return used + [weighting.weights()]


def test_dwa_weights_from_loss_histories():
    # epoch means: (1, 2, 4) then (0.5, 2, 2): w = (0.5, 1, 0.5); lambda = 3 exp(w / 2) / sum exp(w / 2)
    dwa = build_weighting("dwa", 3, {})
    used = run_epochs(dwa, [[[1.5, 2.0, 3.0], [0.5, 2.0, 5.0]], [[0.5, 1.0, 2.0], [0.5, 3.0, 2.0]]])
    close(used[0].double(), [1.0] * 3)
    close(used[1].double(), [1.0] * 3)  # lambda = 1 during the first two epochs
    e1, e2 = math.exp(0.25), math.exp(0.5)
    close(used[2].double(), [3 * e1 / (2 * e1 + e2), 3 * e2 / (2 * e1 + e2), 3 * e1 / (2 * e1 + e2)], tol=1e-6)
    assert float(dwa.combine(torch.tensor([1.0, 0.0, 0.0]))) == pytest.approx(3 * e1 / (2 * e1 + e2), rel=1e-6)


def test_dwa_two_tasks_and_temperature():
    # epoch means (2, 1), (1, 1), (1, 2), T = 1: after epoch 2, w = (1/2, 1) and lambda = 2 (e^0.5, e) / (e^0.5 + e);
    # after epoch 3, w = (1, 2) and lambda = 2 (e, e^2) / (e + e^2)
    dwa = build_weighting("dwa", 2, {"temperature": 1.0})
    used = run_epochs(dwa, [[[2.0, 1.0]], [[1.0, 1.0]], [[1.0, 2.0]]])
    close(used[2].double(), [2 / (1 + math.exp(0.5)), 2 * math.exp(0.5) / (1 + math.exp(0.5))], tol=1e-6)
    e, e2 = math.e, math.e**2
    close(used[3].double(), [2 * e / (e + e2), 2 * e2 / (e + e2)], tol=1e-6)
    assert "epoch_losses" in dwa.state_dict()


# ---------------------------------------------------------------- RLW (Lin et al. 2022)


@pytest.mark.parametrize("num_tasks", [2, 3])
def test_rlw_weights_are_a_softmax_of_normal_draws(num_tasks):
    rlw = build_weighting("rlw", num_tasks, {})
    losses = torch.arange(1.0, num_tasks + 1)
    torch.manual_seed(3)
    loss = rlw.combine(losses)
    torch.manual_seed(3)
    expected = torch.softmax(torch.randn(num_tasks), dim=0)
    close(rlw.weights().double(), expected.double())
    assert rlw.weights().sum().item() == pytest.approx(1.0)
    assert loss.item() == pytest.approx(float(expected @ losses))
    rlw.combine(losses)
    assert not torch.allclose(rlw.weights(), expected)  # a fresh draw at every step


# ---------------------------------------------------------------- FAMO (Liu et al. 2023, Alg. 1)


def test_famo_one_logit_update_by_hand():
    famo = build_weighting("famo", 2, {"lr": 0.025, "gamma": 1e-5})
    # z = (1/2, 1/2); delta = log L(before) - log L(after) = (log 2, log(2 / 1.8));
    # d = z * (delta - z . delta) = (delta_1 - delta_2) / 4 x (1, -1); Adam's first step is lr x sign(d)
    delta = torch.tensor([math.log(1.0 / 0.5), math.log(2.0 / 1.8)])
    famo.update_logits(delta)
    close(famo.logits.double(), [-0.025, 0.025], tol=1e-7)
    assert famo.weights()[0] < 0.5  # the task that improved faster loses weight


def test_famo_three_tasks_step_against_torch_adam():
    famo = build_weighting("famo", 3, {"lr": 0.1, "gamma": 0.01})
    logits = torch.zeros(3, requires_grad=True)
    adam = torch.optim.Adam([logits], lr=0.1, weight_decay=0.01)
    for delta in ([0.3, -0.1, 0.0], [0.1, 0.2, -0.3], [0.0, 0.5, 0.1]):
        famo.update_logits(torch.tensor(delta))
        adam.zero_grad()
        logits.grad = torch.autograd.grad(torch.softmax(logits, 0), logits, grad_outputs=torch.tensor(delta))[0]
        adam.step()
        close(famo.logits.double(), logits.detach().double(), tol=1e-6)


def test_famo_model_gradient_and_logit_step():
    model, images, labels = make_problem(2, seed=4, batch=16)
    labels[::3, 0] = 1  # both tasks have valid labels everywhere but differ
    famo = build_weighting("famo", 2, {}).to(DTYPE)
    losses = famo.backward(model, images, labels)
    weights = (0.5 / (losses + 1e-8)) / (0.5 / (losses + 1e-8)).sum()  # z / (c (L + 1e-8)), z = (1/2, 1/2)
    assert_grads_close(param_grads(model), grads_of(model, lambda m: (weights * loop_losses(m, images, labels)).sum()))
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    after = loop_losses(model, images, labels).detach()
    famo.after_step()
    delta = torch.log(losses + 1e-8) - torch.log(after + 1e-8)
    d = (delta[0] - delta[1]).item() / 4  # d = (d, -d); Adam's first step: lr d / (|d| + 1e-8)
    close(famo.logits.double(), [-0.025 * d / (abs(d) + 1e-8), 0.025 * d / (abs(d) + 1e-8)], tol=1e-7)


# ---------------------------------------------------------------- one step on the tiny model


def task_grads(model, images, labels, wrt):
    losses = loop_losses(model, images, labels)
    return torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(loss, wrt, retain_graph=True)])
                        for loss in losses]), losses


@pytest.mark.parametrize("name", ["pcgrad", "cagrad", "nash_mtl", "aligned_mtl"])
def test_parameter_space_step(name):
    """Shared parameters (fc) get beta @ G of the autograd task gradients; the heads their tasks' gradients
    (Nash-MTL: alpha-weighted, as its reference)."""
    model, images, labels = make_problem(3, seed=2, batch=16)
    weighting = build_weighting(name, 3, {}).to(DTYPE)
    torch.manual_seed(0)
    weighting.backward(model, images, labels)
    shared = list(model.fc.parameters())
    grads, _ = task_grads(model, images, labels, shared)
    torch.manual_seed(0)
    beta = build_weighting(name, 3, {}).coefficients(grads)
    close(weighting.beta.double(), beta, tol=1e-7)
    close(torch.cat([p.grad.flatten() for p in shared]), beta @ grads, tol=1e-9)
    heads = weighting.head_coefficients(beta)
    expected = grads_of(model, lambda m: (heads * loop_losses(m, images, labels)).sum())
    assert_grads_close(param_grads(model)[2:], expected[2:])


def test_representation_space_step():
    """IMTL-G on z = trunk(x): alpha from the gradients w.r.t. z; the trunk gets d(sum_t alpha_t L_t), the heads
    d(sum_t L_t)."""
    model, images, labels = make_problem(3, seed=3, batch=16)
    weighting = build_weighting("imtl", 3, {}).to(DTYPE)
    weighting.backward(model, images, labels)
    z = model.trunk(images).detach().requires_grad_()
    losses = torch.stack([torch.nn.functional.cross_entropy(model.heads(z)[:, t], labels[:, t], ignore_index=-1)
                          for t in range(3)])
    grads = torch.stack([torch.autograd.grad(loss, z, retain_graph=True)[0].flatten() for loss in losses])
    alpha = build_weighting("imtl", 3, {}).coefficients(grads)
    close(weighting.weights().double(), alpha, tol=1e-6)
    trunk = grads_of(model, lambda m: (alpha * loop_losses(m, images, labels)).sum())
    heads = grads_of(model, lambda m: loop_losses(m, images, labels).sum())
    assert_grads_close(param_grads(model), trunk[:2] + heads[2:])


# ---------------------------------------------------------------- registry and param files


def test_registry_and_options():
    assert {"dwa", "rlw", "pcgrad", "cagrad", "imtl", "nash_mtl", "aligned_mtl", "famo"} <= set(WEIGHTINGS)
    with pytest.raises(ValueError, match="unknown cagrad rescale 3; valid: 0, 1, 2"):
        build_weighting("cagrad", 2, {"rescale": 3})
    with pytest.raises(ValueError, match="unknown aligned_mtl scale 'max'; valid: min, median, rmse"):
        build_weighting("aligned_mtl", 2, {"scale": "max"})
    with pytest.raises(ValueError, match="valid: update_weights_every, max_norm"):
        build_weighting("nash_mtl", 2, {"max_iter": 3})
    with pytest.raises(ValueError, match="dwa temperature must be > 0"):
        build_weighting("dwa", 2, {"temperature": 0.0})


@pytest.mark.parametrize("name", ["pcgrad", "famo"])
def test_localisation_loss_is_refused_in_one_line(name):
    raw = {"exp_id": "x", "method": name, "dataset": "clevr_like", "setting": "clevr_40", "spatial_loss_weight": 1.0}
    expected = f"weighting '{name}' combines the classification losses only; with a localisation loss use one of: " \
               "uniform, sum, kendall, dwa, rlw"
    with pytest.raises(config.ParamError, match=expected):
        config.validate(raw, "p.json")
