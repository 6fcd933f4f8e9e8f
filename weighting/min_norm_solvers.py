"""Min-norm point in the convex hull of task gradients: the MGDA solver of Sener & Koltun,
"Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018 (SK), Sec. 3.1-3.3.

Problem (SK Eq. 3, and the MGDA-UB sub-problem Eq. 6):

    min_alpha || sum_t alpha_t g_t ||^2   s.t.  alpha_t >= 0,  sum_t alpha_t = 1.

Everything is solved on the Gram matrix M = G G^T (M_ij = <g_i, g_j>), whose cost is alpha^T M alpha.
SK's ``MinNormSolver.find_min_norm_element`` (isl-org/MultiObjectiveOptimization@bf5bbb3,
``multi_task/min_norm_solvers.py``): best pair as the initial point, then
projected-gradient steps with an exact line search, stopped when ||alpha_new - alpha||_1 < 1e-5. Differences:

- each iteration ends with a subspace minimisation on the current support (`_minimize_on_support`), which
  makes the result the exact minimum (SK's iterations alone stop up to ~1e-4 x max_t ||g_t||^2 above it);
- the pair solver returns the exact minimiser, gamma = 1 or 0 at the boundary (SK returns 0.999 / 0.001,
  which is not the minimum and makes the iterations move away from an optimal vertex);
- the iteration count is capped (``max_iter``; SK never increments its counter, SK issue #39);
- M is computed in float64 and divided by its largest diagonal entry, so the step threshold is scale-free
  (alpha does not depend on the scale of M); all-zero gradients give uniform alpha (every alpha is optimal).

For R problems at once on the device (R stacked runs, weighting/batched.py) ``batched_min_norm_element`` is an exact
solver with a fixed amount of work (every face of the simplex) and no host synchronisation, equal to
``find_min_norm_element`` within ``MIN_NORM_TOLERANCE``.
"""
import functools
import itertools

import numpy as np
import torch

STOP_CRIT = 1e-5  # stop when ||alpha_new - alpha||_1 falls below this (SK)
_MIN_STEP = 1e-7  # boundary-hit steps at or below this are ignored (SK `_next_point`)
NORMALIZATIONS = ("none", "l2", "loss", "loss+")
MAX_BATCHED_TASKS = 12  # the batched solver enumerates the 2^T - 1 faces of the simplex (4,095 at 12 tasks)
MIN_NORM_TOLERANCE = 1e-6  # max |alpha - alpha_ref| of the two solvers on float64 problems with a unique minimiser
_FEASIBLE = -1e-9  # a face's alpha counts as >= 0 down to this


def _min_norm_element_from2(v1v1, v1v2, v2v2):
    """min_{gamma in [0, 1]} ||gamma v1 + (1 - gamma) v2||^2 from the inner products (SK Alg. 1).

    Returns ``(gamma, cost)``; gamma is exactly 1 (resp. 0) when the minimum is at v1 (resp. v2).
    """
    if v1v2 >= v1v1:
        return 1.0, v1v1
    if v1v2 >= v2v2:
        return 0.0, v2v2
    gamma = (v2v2 - v1v2) / ((v1v1 - v1v2) + (v2v2 - v1v2))  # denominator = ||v1 - v2||^2 > 0 here
    return gamma, v2v2 + gamma * (v1v2 - v2v2)


def _min_norm_2d(M):
    """Best pair: the min-norm point over every segment [g_i, g_j] (SK `_min_norm_2d`), as ``(alpha, cost)``."""
    T = M.shape[0]
    best_alpha, best_cost = None, np.inf
    for i in range(T):
        for j in range(i + 1, T):
            gamma, cost = _min_norm_element_from2(M[i, i], M[i, j], M[j, j])
            if cost < best_cost:
                best_alpha, best_cost = np.zeros(T), cost
                best_alpha[i], best_alpha[j] = gamma, 1.0 - gamma
    return best_alpha, best_cost


def projection2simplex(y):
    """Euclidean projection onto {x >= 0, sum x = 1} (sort-based: x = max(y - theta, 0))."""
    u = np.sort(y)[::-1]
    excess = np.cumsum(u) - 1.0
    rho = np.nonzero(u * np.arange(1, len(y) + 1) > excess)[0][-1]
    return np.maximum(y - excess[rho] / (rho + 1), 0.0)


def _next_point(alpha, grad):
    """Projected-gradient candidate (SK `_next_point`): move along -grad projected on the plane
    sum(alpha) = 1 up to the first coordinate that hits 0 or 1 (step 1 if none), then project."""
    direction = grad.mean() - grad
    down, up = direction < 0, direction > 0
    steps = np.concatenate([-alpha[down] / direction[down], (1.0 - alpha[up]) / direction[up]])
    steps = steps[steps > _MIN_STEP]
    step = steps.min() if steps.size else 1.0
    return projection2simplex(alpha + step * direction)


def _minimize_on_support(alpha, M):
    """Subspace minimisation (Moré & Toraldo 1991; the inner loop of Wolfe's 1976 min-norm-point algorithm):
    move alpha towards the minimiser of alpha^T M alpha on the affine hull of its face {alpha_k = 0 off its
    support} (KKT system of the equality-constrained QP, least squares when singular) as far as alpha stays
    >= 0; if a coordinate hits 0 first, drop it from the support and repeat. Ends at a face minimiser after
    at most T solves and never increases the cost."""
    while True:
        support = np.flatnonzero(alpha > 0)
        n = len(support)
        kkt = np.ones((n + 1, n + 1))
        kkt[:n, :n], kkt[n, n] = M[np.ix_(support, support)], 0.0
        rhs = np.zeros(n + 1)
        rhs[n] = 1.0
        direction = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:n] - alpha[support]
        down = np.flatnonzero(direction < 0)
        ratios = -alpha[support][down] / direction[down]
        step = min(1.0, ratios.min()) if ratios.size else 1.0
        alpha = alpha.copy()
        alpha[support] = np.maximum(alpha[support] + step * direction, 0.0)
        if step == 1.0:
            return alpha / alpha.sum()
        alpha[support[down[ratios.argmin()]]] = 0.0
        alpha /= alpha.sum()


def _solve_gram(M, max_iter):
    """Min-norm element for a Gram matrix M (float64 numpy, max diagonal 1). Returns ``(alpha, cost)``.

    Each iteration: SK's projected-gradient candidate and exact line search, then `_minimize_on_support`.
    SK's iterations alone stall (a nearly-zero coordinate limits the step and trips the stop rule; zig-zag
    when M is ill-conditioned) and miss the minimum by up to ~1e-4 x max_t ||g_t||^2 on random problems.
    With the subspace step every iteration ends at a face minimiser with a strictly lower cost than the
    previous one, so the loop finds the exact minimum after finitely many iterations.
    """
    if M.shape[0] == 1:
        return np.ones(1), M[0, 0]
    alpha, cost = _min_norm_2d(M)
    if M.shape[0] == 2:
        return alpha, cost
    for _ in range(max_iter):
        candidate = _next_point(alpha, M @ alpha)
        gamma, _ = _min_norm_element_from2(alpha @ M @ alpha, alpha @ M @ candidate, candidate @ M @ candidate)
        new_alpha = _minimize_on_support(gamma * alpha + (1.0 - gamma) * candidate, M)
        change = np.abs(new_alpha - alpha).sum()
        alpha = new_alpha
        if change < STOP_CRIT:
            break
    return alpha, alpha @ M @ alpha


def find_min_norm_element(grads, max_iter=250):
    """Min-norm element of the convex hull of the rows of ``grads`` [T, D] (SK Eq. 3).

    Returns ``(alpha, cost)``: alpha [T] on the simplex (floating tensor on ``grads``' device) and
    cost = ||alpha @ grads||^2 as a python float.
    """
    G = grads.detach().reshape(grads.shape[0], -1).double()
    M = (G @ G.T).cpu().numpy()
    scale = M.diagonal().max()
    if scale > 0:
        alpha, cost = _solve_gram(M / scale, max_iter)
    else:
        alpha, cost = np.full(M.shape[0], 1.0 / M.shape[0]), 0.0
    dtype = grads.dtype if grads.is_floating_point() else torch.get_default_dtype()
    return torch.as_tensor(alpha, dtype=dtype, device=grads.device), float(cost * scale)


def gradient_normalizers(grads, losses, kind):
    """Per-task normalisers n_t for g_t / n_t (SK `multi_task/min_norm_solvers.py` gradient_normalizers).

    ``grads`` [T, ...], ``losses`` [T] (or R runs': [R, T, ...], [R, T]); kind: 'none' -> 1, 'l2' -> ||g_t||,
    'loss' -> L_t, 'loss+' -> L_t ||g_t||. A zero normaliser is replaced by 1 instead of dividing by 0 (it comes
    from a task without a valid label in the batch, whose loss and gradient are 0).
    """
    if kind not in NORMALIZATIONS:
        raise ValueError(f"unknown gradient normalization {kind!r}; valid: {', '.join(NORMALIZATIONS)}")
    grads, losses = grads.detach(), losses.detach().to(grads.dtype)
    norms = grads.reshape(*losses.shape, -1).norm(dim=-1)
    n = {"none": torch.ones_like(norms), "l2": norms, "loss": losses, "loss+": losses * norms}[kind]
    return torch.where(n > 0, n, torch.ones_like(n))


@functools.lru_cache(maxsize=None)
def _faces(num_tasks, device="cpu"):
    """[2^T - 1, T] bool on ``device``: the support of every face of the simplex, smallest first, then by task index
    (so that a tie goes to the face that ``find_min_norm_element`` ends on: e.g. the first task without a gradient).
    Cached per device: a training step captured as a CUDA graph copies nothing from the host."""
    supports = [s for size in range(1, num_tasks + 1) for s in itertools.combinations(range(num_tasks), size)]
    faces = torch.zeros(len(supports), num_tasks, dtype=torch.bool)
    for index, support in enumerate(supports):
        faces[index, list(support)] = True
    return faces.to(device)


def batched_min_norm_element(grads):
    """Min-norm element of the convex hull of each of R problems' task gradients ``grads`` [R, T, D] (SK Eq. 3), T
    at most ``MAX_BATCHED_TASKS``: alpha [R, T] on the simplex, in ``grads``' dtype and device, with no host
    synchronisation.

    The minimiser lies in the relative interior of a face whose gradients are affinely independent (Caratheodory),
    where it is the minimiser of alpha^T M alpha on the face's affine hull (M = G G^T, scaled by its largest
    diagonal entry as ``find_min_norm_element``). So every face's KKT system [[M_S, 1], [1^T, 0]] is solved at once
    (``torch.linalg.solve_ex``: no error check, no sync), the solutions with alpha >= 0 are kept and the one of
    least cost wins: exact, a fixed amount of work, no iteration count. All-zero gradients give uniform alpha."""
    replicas, tasks = grads.shape[:2]
    G = grads.detach().flatten(2).double()
    M = G @ G.transpose(1, 2)
    scale = M.diagonal(dim1=1, dim2=2).amax(dim=1)
    M = M / torch.where(scale > 0, scale, 1.0)[:, None, None]
    faces = _faces(tasks, grads.device)  # [S, T]
    inside = faces[:, :, None] & faces[:, None, :]
    eye = torch.eye(tasks, dtype=M.dtype, device=M.device)
    kkt = torch.zeros(replicas, len(faces), tasks + 1, tasks + 1, dtype=M.dtype, device=M.device)
    kkt[..., :tasks, :tasks] = torch.where(inside, M[:, None], eye * ~faces[:, :, None])  # off the face: alpha_t = 0
    kkt[..., :tasks, tasks] = faces
    kkt[..., tasks, :tasks] = faces
    rhs = torch.zeros(tasks + 1, dtype=M.dtype, device=M.device)
    rhs[tasks] = 1.0
    solution, info = torch.linalg.solve_ex(kkt, rhs.expand(replicas, len(faces), tasks + 1))
    alpha = solution[..., :tasks]
    feasible = (info == 0) & torch.isfinite(alpha).all(dim=-1) & (alpha >= _FEASIBLE).all(dim=-1)
    alpha = alpha.clamp(min=0.0).nan_to_num(0.0)
    alpha = alpha / alpha.sum(dim=-1, keepdim=True).clamp(min=1e-300)
    cost = torch.einsum("rsi,rij,rsj->rs", alpha, M, alpha).where(feasible, torch.inf)
    best = alpha.gather(1, cost.argmin(dim=1)[:, None, None].expand(-1, 1, tasks))[:, 0]
    best = torch.where((scale > 0)[:, None], best, torch.full_like(best, 1.0 / tasks))
    return best.to(grads.dtype)
