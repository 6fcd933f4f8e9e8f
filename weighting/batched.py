"""The paper's loss weightings (Table 2) for R stacked runs (issue 19; training/stacked.py), on the device and
without host synchronisation: replica r's weighting is its separate run's (``sum``, ``uniform``, ``kendall``,
``gradnorm``, ``mgda``) with its state sliced at r. The model is a stacked model: ``model(images [R, B, ...])``
-> logits [R, B, T, C]; ``trunk`` / ``heads`` (MGDA) and ``last_shared_layer.weight`` [R, out, in] (GradNorm) as
the separate weightings use them. ``backward`` returns the per-task losses [R, T]. The losses of the replicas are
summed before the backward pass, so each replica's parameters get their own run's gradient.

MGDA's min-norm problem is solved for every replica at once by ``batched_min_norm_element``: an exact solver with
a fixed amount of work (every face of the simplex), equal to ``min_norm_solvers.find_min_norm_element`` within
``MIN_NORM_TOLERANCE``.
"""
import functools
import itertools

import torch
import torch.nn as nn
from torch.func import vmap

from losses import per_task_cross_entropy

from .gradnorm import _EPS, _MIN_WEIGHT, GradNorm
from .kendall import Kendall
from .mgda import MGDA
from .min_norm_solvers import gradient_normalizers
from .sum import Sum
from .uniform import Uniform

STACKED_WEIGHTINGS = ("sum", "uniform", "kendall", "gradnorm", "mgda")  # the names of the ``BATCHED`` forms
MAX_MGDA_TASKS = 12  # the solver enumerates the 2^T - 1 faces of the simplex (4,095 at 12 tasks)
MIN_NORM_TOLERANCE = 1e-6  # max |alpha - alpha_ref| on float64 problems with a unique minimiser (tests)
_FEASIBLE = -1e-9  # a face's alpha counts as >= 0 down to this


def task_losses(model, images, labels, num_valid):
    """Per-task cross-entropy of every replica [R, T] (``losses.per_task_cross_entropy`` per replica)."""
    return vmap(per_task_cross_entropy)(model(images), labels, num_valid)


class BatchedWeighting(nn.Module):
    """R replicas of one separate weighting: every parameter and buffer carries the replica dimension first."""

    def __init__(self, num_replicas, num_tasks):
        super().__init__()
        self.num_replicas, self.num_tasks = num_replicas, num_tasks

    def combine(self, losses):
        """The summed training loss of the replicas from their per-task losses [R, T]."""
        raise NotImplementedError

    def backward(self, model, images, labels, num_valid):
        losses = task_losses(model, images, labels, num_valid)
        self.combine(losses).backward()
        return losses.detach()

    def after_step(self):
        """Called after the optimiser step (default: nothing)."""

    def after_epoch(self):
        """Called after each training epoch (nothing for the paper's weightings)."""

    def weights(self):
        """Task weights [R, T], for logging."""
        raise NotImplementedError

    def replica_state_dict(self, r):
        """Replica r's ``state_dict()``: the keys and values of its separate run's weighting."""
        return {key: value[r].detach().clone() for key, value in self.state_dict().items()}

    def load_replica_state_dict(self, r, state):
        mine = self.state_dict()
        if set(state) != set(mine):
            raise RuntimeError(f"weighting state does not fit: keys {sorted(set(state) ^ set(mine))}")
        with torch.no_grad():
            for key, value in mine.items():
                value[r].copy_(state[key])


class BatchedSum(BatchedWeighting):
    """``weighting.sum.Sum`` per replica: L = sum_t L_t."""

    def combine(self, losses):
        return losses.sum()

    def weights(self):
        return torch.ones(self.num_replicas, self.num_tasks)


class BatchedUniform(BatchedWeighting):
    """``weighting.uniform.Uniform`` per replica: L = sum_t L_t / T."""

    def combine(self, losses):
        return losses.mean(dim=1).sum()

    def weights(self):
        return torch.full((self.num_replicas, self.num_tasks), 1.0 / self.num_tasks)


class BatchedKendall(BatchedWeighting):
    """``weighting.kendall.Kendall`` per replica: L = sum_t [c exp(-s_t) L_t + d s_t], s [R, T]."""

    def __init__(self, num_replicas, num_tasks, prototype):
        super().__init__(num_replicas, num_tasks)
        self.loss_scale, self.log_var_scale = prototype.loss_scale, prototype.log_var_scale
        self.log_vars = nn.Parameter(prototype.log_vars.detach().repeat(num_replicas, 1))

    def combine(self, losses):
        return (self.loss_scale * torch.exp(-self.log_vars) * losses + self.log_var_scale * self.log_vars).sum()

    def weights(self):
        return (self.loss_scale * torch.exp(-self.log_vars)).detach()


class BatchedGradNorm(BatchedWeighting):
    """``weighting.gradnorm.GradNorm`` per replica (Chen et al. 2018, Algorithm 1): weights w [R, T], L_i(0)
    [R, T]; grad_W L_i of every replica from one ``autograd.grad`` per task of the replicas' summed L_i."""

    def __init__(self, num_replicas, num_tasks, prototype):
        super().__init__(num_replicas, num_tasks)
        self.alpha = prototype.alpha
        self.task_weights = nn.Parameter(prototype.task_weights.detach().repeat(num_replicas, 1))
        self.register_buffer("initial_losses", prototype.initial_losses.repeat(num_replicas, 1))

    def backward(self, model, images, labels, num_valid):
        losses = task_losses(model, images, labels, num_valid)  # [R, T]
        W = model.last_shared_layer.weight  # [R, out, in]
        grads = [torch.autograd.grad(loss, W, retain_graph=True)[0] for loss in losses.sum(dim=0)]
        grad_norms = torch.stack([grad.flatten(1).norm(dim=1) for grad in grads], dim=1)  # [R, T]
        G = self.task_weights * grad_norms
        with torch.no_grad():
            self.initial_losses.copy_(torch.where(self.initial_losses > 0, self.initial_losses, losses))
            loss_ratios = losses / self.initial_losses.clamp(min=_EPS)
            inverse_rates = loss_ratios / loss_ratios.mean(dim=1, keepdim=True).clamp(min=_EPS)
            targets = G.mean(dim=1, keepdim=True) * inverse_rates**self.alpha
        grad_loss = (G - targets).abs().sum()
        ((self.task_weights.detach() * losses).sum() + grad_loss).backward()
        return losses.detach()

    def after_step(self):
        with torch.no_grad():
            self.task_weights.clamp_(min=_MIN_WEIGHT)
            self.task_weights.mul_(self.num_tasks / self.task_weights.sum(dim=1, keepdim=True))

    def weights(self):
        return self.task_weights.detach().clone()


class BatchedMGDA(BatchedWeighting):
    """``weighting.mgda.MGDA`` per replica (MGDA-UB, Sener & Koltun 2018 Sec. 3.3): the gradients of every task
    w.r.t. every replica's representation z = trunk(x), one ``autograd.grad`` per task; alpha [R, T] from
    ``batched_min_norm_element`` (exact, in place of the separate run's iterative solver and its ``max_iter``)."""

    def __init__(self, num_replicas, num_tasks, prototype):
        super().__init__(num_replicas, num_tasks)
        if num_tasks > MAX_MGDA_TASKS:
            raise ValueError(f"stacked MGDA solves up to {MAX_MGDA_TASKS} tasks (it visits every face of the "
                             f"simplex), got {num_tasks}; train these runs separately")
        self.normalization = prototype.normalization
        self.register_buffer("alpha", prototype.alpha.repeat(num_replicas, 1))

    def backward(self, model, images, labels, num_valid):
        with model.held_dropout_masks():
            with torch.no_grad():
                z = model.trunk(images)
            z = z.detach().requires_grad_()  # [R, B, H]
            losses = vmap(per_task_cross_entropy)(model.heads(z), labels, num_valid)
            grads = torch.stack([torch.autograd.grad(loss, z, retain_graph=True)[0].flatten(1)
                                 for loss in losses.sum(dim=0)], dim=1)  # [R, T, B*H]
            normalize = functools.partial(gradient_normalizers, kind=self.normalization)
            grads = grads / vmap(normalize)(grads, losses.detach())[..., None]
            alpha = batched_min_norm_element(grads)
            self.alpha.copy_(alpha)
            losses = task_losses(model, images, labels, num_valid)
            (alpha * losses).sum().backward()
            return losses.detach()

    def weights(self):
        return self.alpha.clone()


BATCHED = {Sum: BatchedSum, Uniform: BatchedUniform, Kendall: BatchedKendall, GradNorm: BatchedGradNorm,
           MGDA: BatchedMGDA}


def stack_weightings(weightings):
    """The batched weighting of R separate ones (built with ``build_weighting`` and the same options), each
    replica holding its separate weighting's state (on its device); ValueError for a weighting without a batched
    form."""
    first = weightings[0]
    if type(first) not in BATCHED or any(type(w) is not type(first) for w in weightings):
        raise ValueError(f"no stacked form of weighting {type(first).__name__}; stacked runs support "
                         f"{', '.join(cls.__name__ for cls in BATCHED)}")
    cls, replicas = BATCHED[type(first)], len(weightings)
    batched = cls(replicas, first.num_tasks) if cls in (BatchedSum, BatchedUniform) else \
        cls(replicas, first.num_tasks, first)
    for r, weighting in enumerate(weightings):
        batched.load_replica_state_dict(r, weighting.state_dict())
    return batched


@functools.lru_cache(maxsize=None)
def _faces(num_tasks):
    """[2^T - 1, T] bool: the support of every face of the simplex, smallest first, then by task index (so that a
    tie goes to the face that ``min_norm_solvers`` ends on: e.g. the first task without a gradient)."""
    supports = [s for size in range(1, num_tasks + 1) for s in itertools.combinations(range(num_tasks), size)]
    faces = torch.zeros(len(supports), num_tasks, dtype=torch.bool)
    for index, support in enumerate(supports):
        faces[index, list(support)] = True
    return faces


def batched_min_norm_element(grads):
    """Min-norm element of the convex hull of each replica's task gradients ``grads`` [R, T, D] (Sener & Koltun
    2018, Eq. 3): alpha [R, T] on the simplex, in ``grads``' dtype and device, with no host synchronisation.

    The minimiser lies in the relative interior of a face whose gradients are affinely independent (Caratheodory),
    where it is the minimiser of alpha^T M alpha on the face's affine hull (M = G G^T, scaled by its largest
    diagonal entry as ``min_norm_solvers``). So every face's KKT system [[M_S, 1], [1^T, 0]] is solved at once
    (``torch.linalg.solve_ex``: no error check, no sync), the solutions with alpha >= 0 are kept and the one of
    least cost wins: exact, a fixed amount of work, no iteration count. All-zero gradients give uniform alpha."""
    replicas, tasks = grads.shape[:2]
    G = grads.detach().flatten(2).double()
    M = G @ G.transpose(1, 2)
    scale = M.diagonal(dim1=1, dim2=2).amax(dim=1)
    M = M / torch.where(scale > 0, scale, 1.0)[:, None, None]
    faces = _faces(tasks).to(grads.device)  # [S, T]
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
