"""Aligned-MTL of Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment for Multi-Task
Learning", CVPR 2023, Sec. 4 and Algorithm 1, on the gradients of the shared parameters (the paper's Aligned-MTL;
``space="representation"`` is its upper-bound variant Aligned-MTL-UB)."""
import torch

from .task_gradients import SPACES, GradientWeighting

SCALES = ("min", "median", "rmse")  # the reference's ``scale_mode`` (SamsungLabs/MTL, code/optim/aligned/solver.py)


class AlignedMTL(GradientWeighting):
    """Aligns the task gradients G (rows g_t) to an orthogonal matrix with equal singular values: with the eigen-
    decomposition G G^T = V Lambda V^T (keeping the eigenvalues above lambda_max x T x float32 eps, as the
    reference), B = sigma V Lambda^{-1/2} V^T and the aligned gradients B G are orthonormal up to sigma; the update is
    their sum, beta = B 1 (pre-defined task weights 1, as the reference). sigma = sqrt(lambda_min), the smallest
    singular value of G (``scale="min"``, the paper's default), or the median or RMS singular value."""

    def __init__(self, num_tasks, scale="min", space="parameters"):
        super().__init__(num_tasks)
        if scale not in SCALES:
            raise ValueError(f"unknown aligned_mtl scale {scale!r}; valid: {', '.join(SCALES)}")
        if space not in SPACES:
            raise ValueError(f"unknown aligned_mtl space {space!r}; valid: {', '.join(SPACES)}")
        self.scale, self.space = scale, space

    def coefficients(self, grads):
        eigenvalues, basis = torch.linalg.eigh(grads @ grads.T)
        keep = eigenvalues > eigenvalues.max() * len(grads) * torch.finfo(torch.float32).eps
        if not keep.any():
            return torch.zeros(len(grads), dtype=grads.dtype, device=grads.device)
        eigenvalues, basis = eigenvalues[keep], basis[:, keep]
        sigma = {"min": eigenvalues.min(), "median": eigenvalues.median(), "rmse": eigenvalues.mean()}[self.scale].sqrt()
        aligner = sigma * (basis / eigenvalues.sqrt()) @ basis.T
        return aligner.sum(dim=1)
