"""Hilbert-Schmidt independence criterion (HSIC): kernels and the biased estimator.

HSIC(A, B) = trace(K H L H) / (n - 1)^2 with K, L the (n, n) kernel matrices of the
two samples and H = I - 11^T / n the centring matrix (Gretton et al., 2005). PwoA's
bottleneck uses a Gaussian kernel on inputs and features and a linear kernel on
one-hot labels.

`hsic` is the O(n^2) form used in training: trace(K H L H) = sum((H K H) * L) for a
symmetric L, and H K H is K with its row, column and grand means removed.
`hsic_reference` is its slow twin with the explicit centring matrix.
"""

from __future__ import annotations

import torch


def sq_distances(z: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances of the rows of z (N, D) -> (N, N); differentiable at 0."""
    sq = z.pow(2).sum(1)  # (N,)
    return (sq[:, None] + sq[None, :] - 2.0 * z @ z.T).clamp_min(0.0)


def median_sigma(z: torch.Tensor) -> torch.Tensor:
    """Median heuristic: the median distance between distinct rows (detached, at least 1e-3)."""
    d = sq_distances(z.detach())
    off = d[~torch.eye(len(z), dtype=torch.bool, device=z.device)]
    return off.median().sqrt().clamp_min(1e-3) if off.numel() else z.new_tensor(1.0)


def gaussian_kernel(z: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
    """K_ij = exp(-|z_i - z_j|^2 / (2 s^2)) on the flattened rows of z.

    sigma None: s is the median distance (median heuristic, per batch). A fixed sigma
    is scaled by sqrt(D) as in the authors' HBaR code: s^2 = sigma^2 * D.
    """
    z = z.flatten(1)  # (N, D)
    s2 = median_sigma(z) ** 2 if sigma is None else sigma * sigma * z.shape[1]
    return torch.exp(-sq_distances(z) / (2.0 * s2))


def linear_kernel(z: torch.Tensor) -> torch.Tensor:
    """K = Z Z^T (one-hot labels: K_ij = 1 when i and j share a class)."""
    z = z.flatten(1)
    z = z if z.is_floating_point() else z.float()
    return z @ z.T


def center(k: torch.Tensor) -> torch.Tensor:
    """H K H without forming H: remove the row, column and grand means."""
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Biased HSIC estimate trace(K H L H) / (n - 1)^2 of two (n, n) kernel matrices (L symmetric)."""
    n = k.shape[0]
    if k.shape != (n, n) or l.shape != (n, n):
        raise ValueError(f"hsic needs two square kernels of one size, got {tuple(k.shape)} and {tuple(l.shape)}")
    return (center(k) * l).sum() / (n - 1) ** 2


def hsic_reference(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Slow twin of `hsic`: the explicit centring matrix and trace."""
    n = k.shape[0]
    h = torch.eye(n, dtype=k.dtype, device=k.device) - 1.0 / n
    return torch.trace(k @ h @ l @ h) / (n - 1) ** 2
