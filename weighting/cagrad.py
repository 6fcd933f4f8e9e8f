"""CAGrad (conflict-averse gradient descent) of Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for
Multi-task Learning", NeurIPS 2021, Sec. 3 and Algorithm 1, on the gradients of the shared parameters (the paper's
default). Defaults c = 0.4 (the paper's NYUv2 / Cityscapes value) and the reference's rescaling by 1 / (1 + c^2)
(Cranial-XIX/CAGrad, ``cagrad(grads, alpha, rescale=1)``; also LibMTL's default)."""
import numpy as np
import torch

from .min_norm_solvers import projection2simplex

from .task_gradients import GradientWeighting

RESCALES = (0, 1, 2)  # d, d / (1 + c^2), d / (1 + c) (the reference's ``rescale``)
_TOLERANCE = 1e-12
_MAX_ITER = 2000


class CAGrad(GradientWeighting):
    """d = g0 + (sqrt(phi) / ||g_w||) g_w with g0 = mean_i g_i, phi = c^2 ||g0||^2, g_w = sum_i w_i g_i and w the
    minimiser over the simplex of the dual objective F(w) = g_w . g0 + sqrt(phi) ||g_w|| (Sec. 3.1, the dual of
    max_d min_i <g_i, d> s.t. ||d - g0|| <= c ||g0||). So beta = 1/T + (sqrt(phi) / ||g_w||) w, over the rescaling.

    The reference minimises F with scipy's SLSQP from w = 1/T; here projected gradient descent with a backtracking
    line search on the Gram matrix (normalised by its largest diagonal entry; the minimiser does not depend on the
    scale) runs until w moves by less than 1e-12 (at most 2000 steps). c = 0 is plain gradient descent on the mean."""

    def __init__(self, num_tasks, c=0.4, rescale=1):
        super().__init__(num_tasks)
        if rescale not in RESCALES:
            raise ValueError(f"unknown cagrad rescale {rescale!r}; valid: {', '.join(map(str, RESCALES))}")
        if c < 0:
            raise ValueError(f"cagrad c must be >= 0, got {c}")
        self.c, self.rescale = c, rescale

    def coefficients(self, grads):
        gram = (grads @ grads.T).cpu().numpy()
        num_tasks = len(gram)
        uniform = np.full(num_tasks, 1.0 / num_tasks)
        scale = gram.diagonal().max()
        beta = uniform.copy()
        if scale > 0 and self.c > 0:
            gram = gram / scale
            radius = self.c * np.sqrt(max(uniform @ gram @ uniform, 0.0))  # sqrt(phi) = c ||g0||
            w = minimize_dual(gram, radius)
            norm_w = np.sqrt(max(w @ gram @ w, 0.0))
            if norm_w > 0:
                beta = uniform + radius / norm_w * w
        beta = beta / {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]
        return torch.as_tensor(beta, dtype=grads.dtype, device=grads.device)


def minimize_dual(gram, radius):
    """argmin over the simplex of F(w) = w^T gram 1/T + radius sqrt(w^T gram w): projected gradient descent with
    an Armijo backtracking line search, from w = 1/T."""
    num_tasks = len(gram)
    mean_column = gram.mean(axis=1)

    def objective(w):
        return w @ mean_column + radius * np.sqrt(max(w @ gram @ w, 0.0))

    def gradient(w):
        norm = np.sqrt(max(w @ gram @ w, 1e-30))
        return mean_column + radius * (gram @ w) / norm

    w, step = np.full(num_tasks, 1.0 / num_tasks), 1.0
    value = objective(w)
    for _ in range(_MAX_ITER):
        grad = gradient(w)
        step *= 2.0
        while True:
            candidate = projection2simplex(w - step * grad)
            new_value = objective(candidate)
            if new_value <= value + grad @ (candidate - w) + np.sum((candidate - w) ** 2) / (2 * step) or step < 1e-20:
                break
            step /= 2.0
        change = np.abs(candidate - w).sum()
        w, value = candidate, new_value
        if change < _TOLERANCE:
            break
    return w
