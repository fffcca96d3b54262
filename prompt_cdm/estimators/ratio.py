"""`ratio` (ours): compartmentalized routing by per-source log density-ratio heads.

Each source i trains one binary head h_i(x_t, t, c) on its own noised latents against a fixed public
reference set tied to the backbone (DESIGN.md section 2); with the logistic loss below its optimum is
h_i = log p_i(x_t) / p_ref(x_t). The reference cancels in the CDM posterior (Prop. 3.1):
    w_i = lambda_i p_i / sum_j lambda_j p_j = softmax_i(h_i + log lambda_i).
Each head holds only its own source's information, so forgetting a source = deleting its head.

The heads live elsewhere: this module takes `score_fn(x, t, **extra) -> h [N x n]` (the n heads
stacked) and holds only the math. Imports only torch and the standard library.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import LogitEstimator


class RatioEstimator(LogitEstimator):
    """w = softmax(T * h + log lambda), h [N x n] from score_fn: h_i ~ log p_i(x_t) / p_ref(x_t)."""

    name = "ratio"
    needs_heads = True


def ratio_loss(h_source: torch.Tensor, h_reference: torch.Tensor) -> torch.Tensor:
    """Logistic loss of one head: h on source samples [B1] vs on reference samples [B2] -> scalar.

    E_source[softplus(-h)] + E_ref[softplus(h)]: each set is averaged on its own (balanced classes),
    so the pointwise minimiser is sigmoid(h) = p_i / (p_i + p_ref), i.e. h = log p_i / p_ref.
    """
    if h_source.numel() == 0 or h_reference.numel() == 0:
        raise ValueError("ratio_loss needs at least one source and one reference sample")
    return F.softplus(-h_source).mean() + F.softplus(h_reference).mean()
