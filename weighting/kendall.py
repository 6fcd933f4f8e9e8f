"""Uncertainty weighting of Kendall, Gal & Cipolla, CVPR 2018, with s_t = log sigma_t^2: the form of Gal's reference
code (yaringal/multi-task-learning-example, the default) or the paper's classification or regression form."""
import torch
import torch.nn as nn

from .base import Weighting

# variant -> (c, d, s_init) of L = sum_t [c exp(-s_t) L_t + d s_t]
VARIANTS = {
    "gal": (1.0, 1.0, 0.0),  # Gal's reference notebook
    "classification": (1.0, 0.5, 0.0),  # paper's softmax form, (1 / sigma^2) L + log sigma
    "regression": (0.5, 0.5, -0.5),  # paper's regression form / LibMTL UW
}


class Kendall(Weighting):
    """Kendall uncertainty weighting, default variant 'gal': L = sum_t [exp(-s_t) L_t + s_t], s_t init 0
    (s [T]; stacked, s [R, T] and losses [R, T])."""

    stackable = True

    def __init__(self, num_tasks, variant="gal"):
        super().__init__(num_tasks)
        if variant not in VARIANTS:
            raise ValueError(f"unknown kendall variant {variant!r}; valid: {', '.join(VARIANTS)}")
        self.variant = variant
        self.loss_scale, self.log_var_scale, log_var_init = VARIANTS[variant]
        self.log_vars = nn.Parameter(torch.full((num_tasks,), log_var_init))

    def combine(self, losses):
        return (self.loss_scale * torch.exp(-self.log_vars) * losses + self.log_var_scale * self.log_vars).sum()

    def weights(self):
        return (self.loss_scale * torch.exp(-self.log_vars)).detach()
