"""Plain sum of the task losses: how the 'Single task' row trains its T independent networks at once."""
import torch

from .base import Weighting


class Sum(Weighting):
    """L = sum_t L_t. With one network per task each network gets exactly its own task's gradient, so this
    is T separate trainings (one Adam state per parameter) sharing only the batch order."""

    stackable = True

    def combine(self, losses):
        return losses.sum()

    def weights(self):
        return torch.ones(self.num_tasks)
