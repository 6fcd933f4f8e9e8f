"""MGDA-UB of Sener & Koltun, NeurIPS 2018 (spec §1.5; SK `train_multi_task.py`, use_approximation=true)."""
import torch

from losses import per_task_cross_entropy
from min_norm_solvers import NORMALIZATIONS, find_min_norm_element, gradient_normalizers

from .base import Weighting


class MGDA(Weighting):
    """MGDA-UB: min-norm alpha of the task grads w.r.t. the flattened B x 50 rep z; normalization 'none' by default."""

    def __init__(self, num_tasks, normalization="none", max_iter=250):
        super().__init__(num_tasks)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown mgda normalization {normalization!r}; valid: {', '.join(NORMALIZATIONS)}")
        self.normalization = normalization
        self.max_iter = max_iter
        self.register_buffer("alpha", torch.full((num_tasks,), 1.0 / num_tasks))  # last alpha, for logging

    def backward(self, model, images, labels):
        """alpha from the gradients w.r.t. z = trunk(x) (SK Eq. 6 upper bound), then backward of sum_t alpha_t L_t."""
        with torch.no_grad():
            z = model.trunk(images)
        z = z.detach().requires_grad_()  # detached leaf: the task gradients stop at the shared representation
        losses = per_task_cross_entropy(model.heads(z), labels)
        grads = torch.stack([torch.autograd.grad(loss, z, retain_graph=True)[0].flatten() for loss in losses])
        grads = grads / gradient_normalizers(grads, losses, self.normalization)[:, None]
        alpha, _ = find_min_norm_element(grads, self.max_iter)
        self.alpha.copy_(alpha)

        losses = per_task_cross_entropy(model(images), labels)  # raw L_t: the normalisation only changes alpha
        (alpha * losses).sum().backward()
        return losses.detach()

    def weights(self):
        return self.alpha.clone()
