"""FAMO (fast adaptive multitask optimisation) of Liu, Liu, Jin, Stone & Liu, "FAMO: Fast Adaptive Multitask
Optimization", NeurIPS 2023, Sec. 3 and Algorithm 1: task weights from the losses alone (no task gradients), acting
on every parameter through the weighted loss. Defaults as the reference (Cranial-XIX/FAMO ``FAMO`` class, also
LibMTL's): logits' learning rate 0.025, weight decay gamma = 1e-5, minimum losses 0."""
import torch

from losses import per_task_cross_entropy

from .base import Weighting

_EPS = 1e-8  # added to L_t - L_t* before the log (the reference's)
_BETAS, _ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, which the reference's logit optimiser uses


class FAMO(Weighting):
    """Model step on sum_t (z_t / c) log(L_t) (Sec. 3, Alg. 1), z = softmax(xi), c = sum_t z_t / L_t: the shared
    update is sum_t z_t / (c L_t) grad L_t, which decreases every log-loss at the same rate. After the optimiser step
    the same batch is evaluated again and the logits xi take one Adam step (lr ``lr``, L2 weight decay ``gamma``, as
    the reference's torch.optim.Adam) on the gradient d = J_softmax(xi)^T delta of the log-loss decreases
    delta_t = log L_t(before) - log L_t(after) (Alg. 1). xi and the Adam moments are buffers (part of the
    checkpoint), not parameters of the model's optimiser.

    The losses of the weights and of delta are the global batch's (``reduce``), so that every process that shares
    the batch has the same weights and logits. A task without a valid label
    in the batch (loss 0) gets weight 0 and delta 0. The localisation loss is refused (the second evaluation would
    need it too)."""

    combines_losses = False

    def __init__(self, num_tasks, lr=0.025, gamma=1e-5):
        super().__init__(num_tasks)
        if lr <= 0 or gamma < 0:
            raise ValueError(f"famo needs lr > 0 and gamma >= 0, got lr={lr}, gamma={gamma}")
        self.lr, self.gamma = lr, gamma
        self.register_buffer("logits", torch.zeros(num_tasks))  # xi
        self.register_buffer("exp_avg", torch.zeros(num_tasks))
        self.register_buffer("exp_avg_sq", torch.zeros(num_tasks))
        self.register_buffer("adam_steps", torch.zeros((), dtype=torch.int64))
        self._pending = None  # (model, images, labels, num_valid, global losses) of the step in progress

    def backward(self, model, images, labels, num_valid=None):
        losses = per_task_cross_entropy(model(images), labels, num_valid)
        before = self.reduce(losses.detach())
        z = torch.softmax(self.logits, dim=0).to(before)
        present = before > 0
        inverse = torch.where(present, z / (before + _EPS), torch.zeros_like(z))  # z_t / L_t
        task_weights = inverse / inverse.sum()  # z_t / (c L_t)
        (task_weights * losses).sum().backward()
        self._pending = model, images, labels, num_valid, before
        return losses.detach()

    def after_step(self):
        """Logits update from the same batch's losses after the model step (Alg. 1)."""
        model, images, labels, num_valid, before = self._pending
        self._pending = None
        with torch.no_grad():
            after = self.reduce(per_task_cross_entropy(model(images), labels, num_valid))
        present = (before > 0) & (after > 0)
        delta = torch.where(present, torch.log(before + _EPS) - torch.log(after + _EPS), torch.zeros_like(before))
        self.update_logits(delta.to(self.logits))

    def update_logits(self, delta):
        """One Adam step of xi on d = J_softmax(xi)^T delta = z * (delta - z . delta)."""
        z = torch.softmax(self.logits, dim=0)
        grad = z * (delta - z @ delta) + self.gamma * self.logits
        self.adam_steps += 1
        step = int(self.adam_steps)
        self.exp_avg.mul_(_BETAS[0]).add_(grad, alpha=1 - _BETAS[0])
        self.exp_avg_sq.mul_(_BETAS[1]).addcmul_(grad, grad, value=1 - _BETAS[1])
        denominator = (self.exp_avg_sq / (1 - _BETAS[1] ** step)).sqrt() + _ADAM_EPS
        self.logits.sub_(self.lr / (1 - _BETAS[0] ** step) * self.exp_avg / denominator)

    def weights(self):
        return torch.softmax(self.logits, dim=0)
