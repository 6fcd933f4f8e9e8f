"""MGDA-UB of Sener & Koltun, NeurIPS 2018 (Sec. 3.3; isl-org/MultiObjectiveOptimization@bf5bbb3
`multi_task/train_multi_task.py`, use_approximation=true)."""
import torch

from losses import per_task_cross_entropy
from models.lenet import held_dropout_masks

from .min_norm_solvers import MAX_BATCHED_TASKS, NORMALIZATIONS, batched_min_norm_element, find_min_norm_element, \
    gradient_normalizers

from .base import Weighting


class MGDA(Weighting):
    """MGDA-UB: min-norm alpha of the task grads w.r.t. the flattened B x 50 rep z; normalization 'none' by default."""

    combines_losses, needs_trunk, stackable = False, True, True

    def __init__(self, num_tasks, normalization="none", max_iter=250):
        super().__init__(num_tasks)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown mgda normalization {normalization!r}; valid: {', '.join(NORMALIZATIONS)}")
        self.normalization = normalization
        self.max_iter = max_iter
        self.register_buffer("alpha", torch.full((num_tasks,), 1.0 / num_tasks))  # last alpha, for logging

    def backward(self, model, images, labels, num_valid=None):
        """alpha from the gradients w.r.t. z = trunk(x) (SK Eq. 6 upper bound), then backward of sum_t alpha_t L_t.
        alpha is solved for the global batch (``reduce``: its images' gradient columns and its losses)."""
        with held_dropout_masks(model):  # Sener & Koltun's dropout: the final pass reuses the masks of the others
            with torch.no_grad():
                z = model.trunk(images)
            z = z.detach().requires_grad_()  # detached leaf: the task gradients stop at the shared representation
            losses = per_task_cross_entropy(model.heads(z), labels, num_valid)  # [T]
            grads = torch.stack([torch.autograd.grad(loss, z, retain_graph=True)[0].flatten() for loss in losses])
            grads, losses = self.reduce(grads, per_image=True), self.reduce(losses)
            grads = grads / gradient_normalizers(grads, losses, self.normalization)[..., None]
            alpha = self.min_norm_element(grads)
            self.alpha.copy_(alpha)

            losses = per_task_cross_entropy(model(images), labels, num_valid)  # raw L_t: the normaliser moves alpha
            (alpha * losses).sum().backward()
            return losses.detach()

    def min_norm_element(self, grads):
        """alpha [T] of the task gradients [T, D]: Sener & Koltun's algorithm (``find_min_norm_element``, at most
        ``max_iter`` iterations), or with ``sync_free`` the exact solver that never waits for the host
        (``batched_min_norm_element``, up to ``MAX_BATCHED_TASKS`` tasks)."""
        if self.sync_free:
            return batched_min_norm_element(grads[None])[0]
        return find_min_norm_element(grads, self.max_iter)[0]

    def check_stackable(self):
        if self.num_tasks > MAX_BATCHED_TASKS:
            raise ValueError(f"stacked MGDA solves up to {MAX_BATCHED_TASKS} tasks (it visits every face of the "
                             f"simplex), got {self.num_tasks}; train these runs separately")

    def weights(self):
        return self.alpha.clone()
