"""Dynamic Weight Average of Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019,
Sec. 3.3: task weights from the rate of change of each task's average training loss over the last two epochs."""
import torch

from .base import Weighting


class DWA(Weighting):
    """L = sum_k lambda_k L_k with lambda_k(t) = K exp(w_k(t-1) / T) / sum_i exp(w_i(t-1) / T) and
    w_k(t-1) = L_k(t-1) / L_k(t-2), L_k(t) the mean of task k's training loss over epoch t, temperature T = 2 (the
    paper's), lambda_k = 1 in the first two epochs (sum_k lambda_k = K, the paper's normalisation: K times uniform
    scaling's 1/K). A task with no loss in epoch t-2 (no valid label) gets w = 1.

    Works on the losses only, so the localisation loss is supported (added to L_k before weighting). The epoch means
    are the global batches' (``reduce`` at the epoch's end), the same lambda in every process that shares them."""

    def __init__(self, num_tasks, temperature=2.0):
        super().__init__(num_tasks)
        if temperature <= 0:
            raise ValueError(f"dwa temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.register_buffer("lambdas", torch.ones(num_tasks))
        self.register_buffer("epoch_losses", torch.zeros(2, num_tasks))  # L(t-1), L(t-2)
        self.register_buffer("epochs", torch.zeros((), dtype=torch.int64))  # epochs seen
        self.register_buffer("loss_sum", torch.zeros(num_tasks))  # this epoch's so far
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def combine(self, losses):
        self.loss_sum += losses.detach().to(self.loss_sum)
        self.steps += 1
        return (self.lambdas.to(losses) * losses).sum()

    def after_epoch(self):
        if int(self.steps) == 0:
            return
        mean = self.reduce(self.loss_sum / self.steps)
        self.epoch_losses.copy_(torch.stack([mean, self.epoch_losses[0]]))
        self.epochs += 1
        self.loss_sum.zero_()
        self.steps.zero_()
        if int(self.epochs) >= 2:
            last, before = self.epoch_losses
            rates = torch.where(before > 0, last / before.clamp(min=1e-30), torch.ones_like(last))
            self.lambdas.copy_(self.num_tasks * torch.softmax(rates / self.temperature, dim=0))

    def weights(self):
        return self.lambdas.clone()
