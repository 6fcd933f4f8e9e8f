"""Uniform scaling: every task loss weighted 1/T (Sener & Koltun's isl-org/MultiObjectiveOptimization@bf5bbb3
``params['scales']``)."""
import torch

from .base import Weighting


class Uniform(Weighting):
    """Uniform scaling: L = sum_t L_t / T (c_t = 1/T as SK's `scales`, not LibMTL EW's c_t = 1)."""

    stackable = True

    def combine(self, losses):
        return losses.mean(dim=-1).sum()

    def weights(self):
        return torch.full((self.num_tasks,), 1.0 / self.num_tasks)
