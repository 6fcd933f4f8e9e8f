"""PCGrad (projecting conflicting gradients) of Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for
Multi-Task Learning", NeurIPS 2020, Algorithm 1, on the gradients of the shared parameters (the paper's default)."""
import torch

from .task_gradients import GradientWeighting


class PCGrad(GradientWeighting):
    """For each task i, g_i^PC = g_i, then for every other task j in a random order: if g_i^PC . g_j < 0,
    g_i^PC <- g_i^PC - (g_i^PC . g_j) / ||g_j||^2 g_j (Alg. 1, Eq. 1); the shared update is sum_i g_i^PC (a sum, as
    Alg. 1, not the mean of uniform scaling). Each g_i^PC stays a combination of the g_j, so everything runs on the
    Gram matrix. The orders come from torch's global generator, which the training script seeds per epoch alike on
    every rank (DDP: the same step as one process). No hyper-parameter."""

    def coefficients(self, grads):
        gram = grads @ grads.T
        num_tasks = len(gram)
        combos = torch.eye(num_tasks, dtype=gram.dtype)  # row i: g_i^PC = combos[i] @ grads
        for i in range(num_tasks):
            for j in torch.randperm(num_tasks).tolist():
                if j == i or gram[j, j] <= 0:
                    continue
                dot = combos[i] @ gram[:, j]  # g_i^PC . g_j
                if dot < 0:
                    combos[i, j] -= dot / gram[j, j]
        return combos.sum(0)
