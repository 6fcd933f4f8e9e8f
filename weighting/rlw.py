"""Random Loss Weighting of Lin, Ye, Xu, Shi & Zhang, "Reasonable Effectiveness of Random Weighting: A Litmus Test
for Multi-Task Learning", TMLR 2022, Sec. 3: fresh random task weights at every step."""
import torch

from .base import Weighting


class RLW(Weighting):
    """L = sum_t lambda_t L_t with lambda = softmax(lambda~), lambda~ ~ N(0, I) drawn at every step (the paper's
    normalisation: sum_t lambda_t = 1, as uniform scaling's 1/T; the standard normal, LibMTL's default among the
    paper's distributions). The draws come from torch's global generator on the CPU, which the training script seeds
    per epoch from (seed, epoch) alike on every rank: under DDP every rank draws the same lambda, and the loss is
    linear in the losses (exact with DDP's averaged gradients); a resumed run draws as the uninterrupted one.
    Works on the losses only, so the localisation loss is supported."""

    def __init__(self, num_tasks):
        super().__init__(num_tasks)
        self.register_buffer("lambdas", torch.full((num_tasks,), 1.0 / num_tasks))  # the last draw, for logging

    def combine(self, losses):
        self.lambdas.copy_(torch.softmax(torch.randn(self.num_tasks), dim=0))
        return (self.lambdas.to(losses) * losses).sum()

    def weights(self):
        return self.lambdas.clone()
