"""What the weightings that combine task gradients share (PCGrad, CAGrad, IMTL-G, Nash-MTL, Aligned-MTL).

Each of these rules turns the task gradients g_t of the shared part into one update that is a linear combination
sum_t beta_t g_t, so a rule only computes beta [T] from the gradients (``coefficients``). The gradients are those of
the shared parameters, the trunk's (``space = "parameters"``), or of the shared representation z = trunk(x)
(``space = "representation"``, as MGDA-UB), in which case the trunk gets d(sum_t beta_t L_t)/d(trunk). The
task-specific parameters (the heads) get the gradient of sum_t h_t L_t with h_t = 1 (each head its own task's
gradient, as in Yu et al. 2020, Sec. 3, and LibMTL) unless a rule says otherwise (``head_coefficients``).

The rule sees the global batch's task gradients (``reduce``: averaged for parameters, gathered for the
representation, as MGDA), so that every process that shares the batch computes the same beta.
"""
import torch

from losses import per_task_cross_entropy

from .base import Weighting

SPACES = ("parameters", "representation")


class GradientWeighting(Weighting):
    """Base of the rules on task gradients: ``coefficients(grads) -> beta``; the last beta is kept for logging."""

    combines_losses, needs_trunk = False, True
    space = "parameters"

    def __init__(self, num_tasks):
        super().__init__(num_tasks)
        self.register_buffer("beta", torch.full((num_tasks,), 1.0 / num_tasks))
        self._shared_names = None  # (id of the model, names of its shared parameters), found at the first step

    def coefficients(self, grads):
        """beta [T] (float64) with update = beta @ grads, from the global batch's task gradients ``grads`` [T, D]
        (float64)."""
        raise NotImplementedError

    def head_coefficients(self, beta):
        """h [T]: the heads get the gradient of sum_t h_t L_t."""
        return torch.ones_like(beta)

    def backward(self, model, images, labels, num_valid=None):
        z = model.trunk(images)
        shared, specific = self._split(model, z)
        if self.space == "representation":
            rep = z.detach().requires_grad_()
            losses = per_task_cross_entropy(model.heads(rep), labels, num_valid)
            local = torch.stack([torch.autograd.grad(loss, rep, retain_graph=True)[0].flatten() for loss in losses])
            grads = self.reduce(local, per_image=True)
        else:
            losses = per_task_cross_entropy(model.heads(z), labels, num_valid)
            local = torch.stack([flatten(torch.autograd.grad(loss, shared, retain_graph=True)) for loss in losses])
            grads = self.reduce(local)
        beta = self.coefficients(grads.double())
        self.beta.copy_(beta)
        beta = beta.to(grads.dtype)
        if self.space == "representation":
            trunk_grads = torch.autograd.grad(z, shared, grad_outputs=(beta @ local).view_as(z), retain_graph=True)
        else:
            update = beta @ grads
            parts = update.split([p.numel() for p in shared])
            trunk_grads = [part.view_as(p).clone() for part, p in zip(parts, shared)]
        head_loss = (self.head_coefficients(beta.double()).to(losses.dtype) * losses).sum()
        head_grads = torch.autograd.grad(head_loss, specific, allow_unused=True)
        for p, grad in [*zip(shared, trunk_grads), *zip(specific, head_grads)]:
            if grad is not None:
                p.grad = grad if p.grad is None else p.grad + grad
        return losses.detach()

    def _split(self, net, z):
        """(shared, task-specific) parameters: those z = trunk(x) depends on (found by autograd at the first step
        with this model), and the others."""
        named = [(name, p) for name, p in net.named_parameters() if p.requires_grad]
        if self._shared_names is None or self._shared_names[0] != id(net):
            reached = torch.autograd.grad(z.sum(), [p for _, p in named], retain_graph=True, allow_unused=True)
            self._shared_names = id(net), {name for (name, _), grad in zip(named, reached) if grad is not None}
        names = self._shared_names[1]
        return [p for name, p in named if name in names], [p for name, p in named if name not in names]

    def weights(self):
        return self.beta.float().clone()


def flatten(tensors):
    return torch.cat([tensor.flatten() for tensor in tensors])

