"""GradNorm of Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018 (their Algorithm 1)."""
import torch
import torch.nn as nn

from losses import per_task_cross_entropy

from .base import Weighting

_MIN_WEIGHT = 1e-8  # w_i is clamped to stay positive (dav-ell/gradnorm)
_EPS = 1e-12


class GradNorm(Weighting):
    """GradNorm on W = model.last_shared_layer.weight, L1 gradient loss, detached targets, w init 1, sum w = T."""

    combines_losses, needs_trunk, stackable = False, True, True

    def __init__(self, num_tasks, alpha=1.5):
        super().__init__(num_tasks)
        self.alpha = alpha
        self.task_weights = nn.Parameter(torch.ones(num_tasks))
        # L_i(0): the loss of task i at the first step (at its first step with a valid label; 0 = not seen yet)
        self.register_buffer("initial_losses", torch.zeros(num_tasks))

    def backward(self, model, images, labels, num_valid=None):
        """Network grads from sum_i w_i L_i (w constant); w.grad from L_grad = sum_i |G_i - target_i| only; G and the
        targets from the global batch's grad_W L_i and L_i (``reduce``)."""
        losses = per_task_cross_entropy(model(images), labels, num_valid)  # [T]
        W = model.last_shared_layer.weight
        # grad_W L_i of the global batch, constants: L_grad must not reach the network
        grads = self.reduce(torch.stack([torch.autograd.grad(loss, W, retain_graph=True)[0] for loss in losses]))
        G = self.task_weights * grads.flatten(1).norm(dim=1)  # G_i = ||grad_W (w_i L_i)||, linear in w_i (w_i > 0)

        with torch.no_grad():
            global_losses = self.reduce(losses)
            self.initial_losses.copy_(torch.where(self.initial_losses > 0, self.initial_losses, global_losses))
            loss_ratios = global_losses / self.initial_losses.clamp(min=_EPS)  # L~_i(t) = L_i(t) / L_i(0)
            inverse_rates = loss_ratios / loss_ratios.mean().clamp(min=_EPS)  # r_i(t)
            targets = G.mean() * inverse_rates**self.alpha  # G_bar * r_i^alpha, a constant

        grad_loss = (G - targets).abs().sum()
        ((self.task_weights.detach() * losses).sum() + grad_loss).backward()
        return losses.detach()

    def after_step(self):
        """Clamp w_i > 0, then renormalise to sum_i w_i = T."""
        with torch.no_grad():
            self.task_weights.clamp_(min=_MIN_WEIGHT)
            self.task_weights.mul_(self.num_tasks / self.task_weights.sum(dim=-1, keepdim=True))

    def weights(self):
        return self.task_weights.detach().clone()
