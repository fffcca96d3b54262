"""Pure math of guidance and mixing (imports only torch).

Classifier-free guidance (Ho & Salimans 2022) in the form diffusers uses:
    eps = eps_u + g * (eps_c - eps_u)
"""
from __future__ import annotations

import torch


def guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """[N x C x H x W] unconditional and conditional predictions -> guided prediction."""
    return eps_uncond + scale * (eps_cond - eps_uncond)
