"""Pure math of guidance, mixing, normalisation and sparse routing (imports only torch).

Classifier-free guidance (Ho & Salimans 2022) in the form diffusers uses:
    eps = eps_u + g * (eps_c - eps_u)

CDM mixing (Golatkar et al. 2023, arXiv 2308.01937, Proposition 3.1): the score of the model trained
on the union of n sources is the posterior-weighted sum of the per-source scores,
    eps = sum_i w_i(x_t, t) eps_i(x_t, t),   w_i = lambda_i p_i(x_t) / sum_j lambda_j p_j(x_t).
With guidance and ONE shared unconditional row (DESIGN.md section 2):
    eps = eps_u + g * (sum_i w_i eps_i(c) - eps_u).

Shapes: n sources, N images in the batch, any trailing image shape (C x H x W for latents).
    eps_rows  [n x N x C x H x W]   one conditional prediction per source
    weights   [N x n]               per image, rows sum to 1
    mask      [N x n] or [n] bool   which sources an image may use
"""
from __future__ import annotations

import math
from typing import Sequence

import torch



def as_tensor(v) -> torch.Tensor:
    """A tensor stays where it is; a Python number or list becomes a CPU tensor (named, not the default
    device: the composition's device test runs with the default device set to `meta`)."""
    return v if isinstance(v, torch.Tensor) else torch.as_tensor(v, device="cpu")


def guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """[N x C x H x W] unconditional and conditional predictions -> guided prediction."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def guided_rows(eps_uncond: torch.Tensor | None, eps_rows: torch.Tensor, scale: float) -> torch.Tensor:
    """Each source's own guided prediction [n x N x ...]: its conditional row guided by its unconditional
    row (per-source, [n x N x ...]) or by the shared one ([N x ...]); the rows themselves without guidance.
    Mixing these with weights w equals guiding the mixed rows (guidance is affine and w sums to 1)."""
    if eps_uncond is None:
        return eps_rows
    return guidance(eps_uncond if eps_uncond.dim() == eps_rows.dim() else eps_uncond.unsqueeze(0), eps_rows, scale)


def _check_rows(eps_rows: torch.Tensor, weights: torch.Tensor) -> None:
    if weights.dim() != 2:
        raise ValueError(f"weights must be [N x n], got shape {tuple(weights.shape)}")
    if eps_rows.dim() < 2 or tuple(eps_rows.shape[:2]) != (weights.shape[1], weights.shape[0]):
        raise ValueError(
            f"eps_rows must be [n x N x ...] matching weights [N x n] = {tuple(weights.shape)}, "
            f"got shape {tuple(eps_rows.shape)}"
        )


def mix(eps_rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Posterior-weighted sum (Prop. 3.1): eps_rows [n x N x ...], weights [N x n] -> [N x ...]."""
    _check_rows(eps_rows, weights)
    w = weights.t().to(eps_rows.dtype)  # [n x N]
    w = w.reshape(*w.shape, *([1] * (eps_rows.dim() - 2)))
    return (w * eps_rows).sum(dim=0)


def guided_mix(eps_uncond: torch.Tensor, eps_rows: torch.Tensor, weights: torch.Tensor,
               scale: float) -> torch.Tensor:
    """eps_u + g (sum_i w_i eps_i - eps_u): eps_uncond [N x ...], eps_rows [n x N x ...] -> [N x ...].

    eps_uncond is the one unconditional row shared by all sources (the frozen backbone, no adapter).
    """
    return guidance(eps_uncond, mix(eps_rows, weights), scale)


def _as_mask(mask: torch.Tensor | Sequence[bool] | None, like: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones_like(like, dtype=torch.bool)
    m = torch.as_tensor(mask, device=like.device)
    if m.dtype != torch.bool:
        raise ValueError(f"a source mask must be boolean, got dtype {m.dtype}")
    try:
        return torch.broadcast_to(m, like.shape)
    except RuntimeError:
        raise ValueError(f"mask of shape {tuple(m.shape)} does not fit weights of shape "
                         f"{tuple(like.shape)} (expected [n] or [N x n])") from None


def normalize(weights: torch.Tensor, allowed: torch.Tensor | Sequence[bool] | None = None, *,
              logits: bool = False) -> torch.Tensor:
    """Renormalise weights [n] or [N x n] over the allowed sources (an access policy); others get 0.

    With `logits=True` the input is log-weights (any real numbers, -inf allowed) and the result is
    their softmax over the allowed subset. Raises ValueError when a row allows no source, when
    weights are negative or NaN, or when the allowed weights of a row do not sum to a positive number.
    """
    w = as_tensor(weights)
    if not torch.is_floating_point(w):
        w = w.to(torch.get_default_dtype())
    if w.dim() not in (1, 2) or w.shape[-1] == 0:
        raise ValueError(f"weights must be [n] or [N x n] with n >= 1, got shape {tuple(w.shape)}")
    m = _as_mask(allowed, w)
    if not bool(m.any(dim=-1).all()):
        raise ValueError("no source is allowed for at least one image: the access policy leaves "
                         "nothing to compose (allow at least one source)")
    if logits:
        if torch.isnan(w).any():
            raise ValueError("logits contain NaN")
        z = w.masked_fill(~m, -math.inf)
        if not bool(torch.isfinite(z.max(dim=-1).values).all()):
            raise ValueError("every allowed source has logit -inf (zero weight) for at least one "
                             "image: the allowed weights do not sum to a positive number")
        return torch.softmax(z, dim=-1)
    if torch.isnan(w).any() or bool((w < 0).any()):
        raise ValueError(f"weights must be non-negative numbers, got {w.tolist()}")
    w = torch.where(m, w, torch.zeros_like(w))
    total = w.sum(dim=-1, keepdim=True)
    if not bool((total > 0).all()) or not bool(torch.isfinite(total).all()):
        raise ValueError("the allowed sources' weights do not sum to a positive finite number for "
                         f"at least one image (sums: {total.squeeze(-1).tolist()})")
    return w / total


def prior_logits(lambdas: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """User mixing prior lambda [n] (or [N x n] per image) -> log(lambda / sum lambda); 0 -> -inf.

    Raises ValueError unless every lambda is a non-negative finite number and each row sums to > 0.
    """
    lam = as_tensor(lambdas)
    if not torch.is_floating_point(lam):
        lam = lam.to(torch.get_default_dtype())
    if lam.dim() not in (1, 2) or lam.shape[-1] == 0:
        raise ValueError(f"lambdas must be [n] or [N x n] with n >= 1, got shape {tuple(lam.shape)}")
    if not bool(torch.isfinite(lam).all()) or bool((lam < 0).any()):
        raise ValueError(f"lambdas must be non-negative finite numbers, got {lam.tolist()}")
    total = lam.sum(dim=-1, keepdim=True)
    if not bool((total > 0).all()):
        raise ValueError(f"lambdas must have a positive sum (at least one source with lambda > 0), "
                         f"got {lam.tolist()}")
    return torch.log(lam / total)  # log(0) = -inf: that source can never be chosen


def sparsify(weights: torch.Tensor, active: torch.Tensor, eps: float, step: int, n_steps: int,
             warmup_frac: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse routing (DESIGN.md section 2): drop low-weight sources for the rest of the trajectory.

    weights [N x n] (rows need not be normalised), active [N x n] bool (the sources still in use for
    each image; start from the access mask). During the warm-up (step < warmup_frac * n_steps) no
    source is dropped; afterwards every active source whose renormalised weight is < eps is dropped,
    except the largest one, so each image keeps at least one. A dropped source is never revived
    (the caller passes the returned mask back in the next step). Returns (weights renormalised over
    the new active set [N x n], new active mask [N x n]).
    """
    if not 0.0 <= warmup_frac <= 1.0:
        raise ValueError(f"warmup_frac must be in [0, 1], got {warmup_frac}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if weights.dim() != 2:
        raise ValueError(f"weights must be [N x n], got shape {tuple(weights.shape)}")
    active = _as_mask(active, weights)
    w = normalize(weights, active)
    if step < warmup_frac * n_steps:
        return w, active.clone()
    keep = active & (w >= eps)
    top = w.argmax(dim=-1, keepdim=True)  # inactive entries are 0, so the argmax is active
    keep = keep.scatter(-1, top, True)
    return normalize(w, keep), keep
