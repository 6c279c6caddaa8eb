"""Gaussian statistics of features and the Fréchet distance between two Gaussians.

features -> `gaussian_statistics` (numpy) -> (mu, sigma) -> `FrechetReference(mu, sigma).distance(...)`:
the distance to one fixed reference Gaussian, in torch on any device, with the reference's matrix square root
computed once; FID at every evaluation (trainables.metrics) and the fd_digits surrogate go through it.
"""

from __future__ import annotations

import numpy as np
import torch


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D), both float64, of features (N, D) with N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features: expected an (N, D) array with N >= 2, got shape {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError("features: contains NaN or Inf")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


class FrechetReference:
    """Squared Fréchet (2-Wasserstein) distances to one reference Gaussian N(mu, sigma), float64, on `device`.

    d² = |mu' - mu|² + tr(sigma') + tr(sigma) - 2 tr((sigma^½ sigma' sigma^½)^½), in feature units squared.
    sigma^½ (a symmetric eigendecomposition) is computed once here, so each distance costs one symmetric
    eigenvalue problem: the matrix under the root is symmetric PSD, so there is no imaginary part to discard
    (as with sqrtm(sigma' sigma) or torch-fidelity's eigvals of the product), and rank-deficient covariances
    (fewer samples than dimensions) stay exact; rounding-level negative eigenvalues are clipped.
    mu: (D,); sigma: (D, D) symmetric PSD, finite (arrays or tensors).
    """

    def __init__(self, mu: np.ndarray | torch.Tensor, sigma: np.ndarray | torch.Tensor,
                 device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.mu, self.sigma = _as_gaussian(mu, sigma, ("mu", "sigma"), self.device)
        eigenvalues, eigenvectors = torch.linalg.eigh(self.sigma)
        self.root = (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.mT
        self.trace = torch.trace(self.sigma)

    def distance(self, mu: np.ndarray | torch.Tensor, sigma: np.ndarray | torch.Tensor) -> float:
        """d² between N(mu, sigma) and the reference."""
        mu, sigma = _as_gaussian(mu, sigma, ("mu1", "sigma1"), self.device, self.mu.shape[0])
        inner = self.root @ sigma @ self.root
        tr_covmean = torch.linalg.eigvalsh((inner + inner.mT) / 2).clamp_min(0).sqrt().sum()
        diff = mu - self.mu
        distance = diff @ diff + torch.trace(sigma) + self.trace - 2 * tr_covmean
        return max(float(distance), 0.0)  # >= 0 in exact arithmetic; clip the rounding of identical inputs

    def distance_to_features(self, features: torch.Tensor) -> float:
        """d² between the Gaussian of features (N, D) (mean, unbiased covariance; float64) and the reference.

        The statistics are computed where the features are, moved to this reference's device first."""
        features = features.to(self.device, torch.float64)
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError("features: expected an (N, D) tensor with N >= 2, got shape "
                             f"{tuple(features.shape)}")
        mu = features.mean(dim=0)
        centred = features - mu
        return self.distance(mu, centred.mT @ centred / (features.shape[0] - 1))


def _as_gaussian(mu, sigma, names: tuple[str, str], device: torch.device,
                 dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """mu, sigma as float64 tensors on device, sigma symmetrised; ValueError naming a bad argument.

    dim: the dimension mu must have (None: any)."""
    mu = torch.as_tensor(mu, dtype=torch.float64).to(device)
    sigma = torch.as_tensor(sigma, dtype=torch.float64).to(device)
    if mu.ndim != 1 or (dim is not None and mu.shape[0] != dim):
        expected = "D" if dim is None else dim
        raise ValueError(f"{names[0]}: expected a ({expected},) vector, got {tuple(mu.shape)}")
    dim = mu.shape[0]
    if sigma.shape != (dim, dim):
        raise ValueError(f"{names[1]}: expected shape ({dim}, {dim}) to match mu, got {tuple(sigma.shape)}")
    for name, value in zip(names, (mu, sigma), strict=True):
        if not torch.isfinite(value).all():
            raise ValueError(f"{name}: contains NaN or Inf")
    return mu, (sigma + sigma.mT) / 2  # np.cov is symmetric only up to rounding; eigh reads one triangle
