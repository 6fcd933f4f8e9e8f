"""Uniform scaling (spec §1.2)."""
import torch

from .base import Weighting


class Uniform(Weighting):
    """Uniform scaling: L = sum_t L_t / T (c_t = 1/T as SK's `scales`, not LibMTL EW's c_t = 1)."""

    def combine(self, losses):
        return losses.mean()

    def weights(self):
        return torch.full((self.num_tasks,), 1.0 / self.num_tasks)
