"""Fréchet distance between two feature sets (Heusel et al. 2017), in float64 torch.

FID = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2). The feature extractor is
pluggable: the judge's features in the embedded world, Inception's on real data.
"""
from __future__ import annotations

import torch


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """[N x D] and [M x D] features -> Fréchet distance of their Gaussian fits."""
    a, b = feats_a.double(), feats_b.double()
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("FID needs at least 2 samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    ra = _sqrtm_psd(s_a)
    cross = _sqrtm_psd(ra @ s_b @ ra)
    return float((mu_a - mu_b).square().sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * torch.trace(cross))
