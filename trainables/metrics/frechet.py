"""Gaussian statistics of features and the Fréchet distance between two Gaussians.

Pure numpy functions, shared by the fd_digits surrogate (torch-fidelity computes FID with its own copy):
features -> `gaussian_statistics` -> (mu, sigma) -> `frechet_distance` -> float.
"""

from __future__ import annotations

import numpy as np


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D), both float64, of features (N, D) with N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features: expected an (N, D) array with N >= 2, got shape {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError("features: contains NaN or Inf")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    d² = |mu1 - mu2|² + tr(sigma1) + tr(sigma2) - 2 tr((sigma1^½ sigma2 sigma1^½)^½), in feature units squared
    The trace term goes through symmetric eigendecompositions (eigh) rather than sqrtm(sigma1 sigma2): the
    matrix under the root is symmetric PSD, so there is no imaginary part to discard, and rank-deficient
    covariances (fewer samples than dimensions) stay exact; rounding-level negative eigenvalues are clipped.
    mu: (D,); sigma: (D, D) symmetric PSD.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(
            f"mu1, mu2: expected two (D,) vectors of equal length, got {mu1.shape} and {mu2.shape}"
        )
    dim = mu1.shape[0]
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (dim, dim):
            raise ValueError(f"{name}: expected shape ({dim}, {dim}) to match mu, got {sigma.shape}")
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(value).all():
            raise ValueError(f"{name}: contains NaN or Inf")
    # Symmetrise: np.cov is symmetric only up to rounding, and eigh reads one triangle.
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    eigvals1, eigvecs1 = np.linalg.eigh(sigma1)
    root1 = (eigvecs1 * np.sqrt(np.clip(eigvals1, 0, None))) @ eigvecs1.T
    inner = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean
    return float(max(distance, 0.0))  # >= 0 in exact arithmetic; clip the rounding of identical inputs
