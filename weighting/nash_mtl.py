"""Nash-MTL of Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task Learning as a Bargaining
Game", ICML 2022, Sec. 3, on the gradients of the shared parameters (the paper's default). Defaults as the reference
(AvivNavon/nash-mtl, methods/weight_methods.py ``NashMTL``): update_weights_every = 1, max_norm = 1.0."""
import numpy as np
import torch

from .task_gradients import GradientWeighting

_MAX_ITER = 100
_TOLERANCE = 1e-14  # on the squared Newton decrement of the normalised problem (then one last full step)


class NashMTL(GradientWeighting):
    """The Nash bargaining solution alpha > 0 of G G^T alpha = 1 / alpha (elementwise; Sec. 3.1, Claim 3.1), update
    sum_t alpha_t g_t, whose squared norm is then sum_t alpha_t (G G^T alpha)_t = T; the shared parameters' gradient
    is clipped to norm ``max_norm`` (0 = no clipping) and, as the reference (weighted loss sum_t alpha_t L_t), the
    heads get alpha_t grad L_t. alpha is recomputed every ``update_weights_every`` steps and kept in between.

    Solver: G G^T alpha = 1 / alpha is the stationarity condition of the strictly convex
    f(alpha) = 1/2 alpha^T G G^T alpha - sum_t log alpha_t on alpha > 0, minimised by damped Newton steps (backtracking
    that keeps alpha > 0) on the Gram matrix divided by its Frobenius norm n (the reference's normalisation; the
    solution for G G^T is that for G G^T / n divided by sqrt(n)), from the previous alpha, to a squared Newton
    decrement below 1e-14 and one last full step (at most 100 steps). The reference instead runs up to 20 convex-concave iterations of a
    cvxpy/ECOS problem (Sec. 3.2) and stops when ||G G^T alpha - 1/alpha|| < 1e-3 on the normalised Gram matrix, so
    its alpha is that solution up to this tolerance. A task whose gradient is 0 (no valid label in the batch) has no
    bargaining point: it gets alpha 0 and the others bargain among themselves; if Newton fails (gradients with a
    non-negative null combination, e.g. g_1 = -g_2), alpha is kept from the previous step, as the reference keeps it
    when its solver fails."""

    def __init__(self, num_tasks, update_weights_every=1, max_norm=1.0):
        super().__init__(num_tasks)
        if update_weights_every < 1:
            raise ValueError(f"nash_mtl update_weights_every must be >= 1, got {update_weights_every}")
        if max_norm < 0:
            raise ValueError(f"nash_mtl max_norm must be >= 0 (0 = no clipping), got {max_norm}")
        self.update_weights_every, self.max_norm = update_weights_every, max_norm
        self.register_buffer("alpha", torch.ones(num_tasks, dtype=torch.float64))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def coefficients(self, grads):
        gram = (grads @ grads.T).cpu().numpy()
        if int(self.step) % self.update_weights_every == 0:
            self.alpha.copy_(torch.as_tensor(solve_nash(gram, self.alpha.cpu().numpy())))
        self.step += 1
        alpha = self.alpha.cpu().numpy()
        norm = np.sqrt(max(alpha @ gram @ alpha, 0.0))
        factor = min(1.0, self.max_norm / norm) if self.max_norm > 0 and norm > 0 else 1.0
        return torch.as_tensor(alpha * factor, dtype=grads.dtype, device=grads.device)

    def head_coefficients(self, beta):
        return self.alpha.to(beta)

    def weights(self):
        return self.alpha.float().clone()


def solve_nash(gram, start):
    """alpha > 0 with gram alpha = 1 / alpha on the tasks with a gradient (0 for the others); ``start`` (any
    positive scale) if Newton does not converge."""
    active = gram.diagonal() > 0
    alpha = np.zeros(len(gram))
    if not active.any():
        return start
    matrix = gram[np.ix_(active, active)]
    norm = np.linalg.norm(matrix)
    matrix = matrix / norm
    x = np.where(start[active] > 0, start[active], 1.0) * np.sqrt(norm)  # the previous alpha, normalised problem

    def objective(y):
        return 0.5 * y @ matrix @ y - np.log(y).sum()

    for _ in range(_MAX_ITER):
        gradient = matrix @ x - 1.0 / x
        direction = -np.linalg.solve(matrix + np.diag(1.0 / x**2), gradient)
        decrement = -gradient @ direction
        t = 1.0
        while np.any(x + t * direction <= 0):
            t /= 2.0
        if decrement < _TOLERANCE:  # quadratic convergence: a last full step, alpha is exact to rounding
            alpha[active] = (x + t * direction) / np.sqrt(norm)
            return alpha
        value = objective(x)
        while objective(x + t * direction) > value - 0.25 * t * decrement:
            t /= 2.0
            if t < 1e-12:
                return start
        x = x + t * direction
    return start
