"""IMTL-G of Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning", ICLR 2021,
Sec. 3.2 and Algorithm 1 (the gradient balance), on the gradients of the shared feature z, as the paper does (like
MGDA-UB). IMTL-L (the learned loss scales e^{s_t}, Sec. 3.1) and the hybrid IMTL are not implemented."""
import torch

from .task_gradients import GradientWeighting


class IMTL(GradientWeighting):
    """alpha such that the update g = sum_t alpha_t g_t has equal projections on every unit gradient u_t = g_t / ||g_t||,
    with sum_t alpha_t = 1: with D = [g_1 - g_2, ..., g_1 - g_T] and U = [u_1 - u_2, ..., u_1 - u_T] (rows),
    alpha_{2:T} = g_1 U^T (D U^T)^{-1} and alpha_1 = 1 - sum_{t>1} alpha_t (Sec. 3.2, closed form of Alg. 1).
    (D U^T)^{-1} is a pseudo-inverse here (singular when two unit gradients coincide). A task whose gradient is 0 (no
    valid label in the batch) gets alpha 0 and the others are balanced among themselves. No hyper-parameter."""

    space = "representation"

    def coefficients(self, grads):
        alpha = torch.zeros(len(grads), dtype=grads.dtype, device=grads.device)
        norms = grads.norm(dim=1)
        active = torch.nonzero(norms > 0).flatten()
        if len(active) == 0:
            return torch.full_like(alpha, 1.0 / len(alpha))
        g = grads[active]
        units = g / norms[active, None]
        differences, unit_differences = g[:1] - g[1:], units[:1] - units[1:]
        rest = g[0] @ unit_differences.T @ torch.linalg.pinv(differences @ unit_differences.T)
        alpha[active] = torch.cat([1.0 - rest.sum(dim=0, keepdim=True), rest])
        return alpha
