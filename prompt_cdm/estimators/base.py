"""The interface every weight estimator shares, its named output, and one composed mixing step.

Shaped like a diffusers guider (src/diffusers/guiders): configured at construction, per-step state
through `set_state`, a named output. An estimator answers one question for the CDM mixture
(Golatkar et al. 2023, Prop. 3.1): the posterior weights w_i(x_t, t) = lambda_i p_i(x_t) / sum_j ...
Lifecycle, once per trajectory and once per step:

    est = get_estimator("ito", lambdas=[0.7, 0.3], stochastic=True)
    est.reset(n_sources, batch, device)     # the state lives on the model's device
    for step, t in enumerate(timesteps):
        est.set_state(step, n_steps, t, sigma, sigma_next)
        out = mix_step(est, x, eps_u, eps_rows, scale)   # -> MixOutput(eps, weights, active)
        ... the sampler takes its step x -> x_next ...
        est.observe(x, x_next, eps_rows, active=out.active)   # estimators that track a trajectory

Shapes: x [N x C x H x W]; eps_rows [n x N x C x H x W] (one conditional row per source);
weights [N x n] (rows sum to 1); sigma is the VE noise level sqrt((1 - abar_t) / abar_t).
Pure: imports only torch and the standard library.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..core.mixing import guidance, mix, prior_logits, sparsify


@dataclass
class MixOutput:
    """One composed step: the mixed (guided) prediction and the routing that made it."""

    eps: torch.Tensor      # [N x C x H x W] the prediction the sampler steps with
    weights: torch.Tensor  # [N x n] the weights used (after access mask and sparsification)
    active: torch.Tensor   # [N x n] bool, sources still in use; pass back in at the next step


class WeightEstimator:
    """Base class: holds the prior lambda and the per-step state; subclasses implement `weights`."""

    name = "base"
    # What a composition must supply to build this estimator (the pipeline reads these flags instead of
    # branching on names): the mixing prior as the mixture itself; trained heads from the registry (a
    # `score_fn` plus their construction arguments) and the frozen encoder's caption embedding as the
    # heads' context; the sampler's scheduler class (trajectory estimators must know it is stochastic);
    # a temperature on the evidence.
    needs_lambdas = False
    needs_heads = False
    needs_scheduler = False
    takes_temperature = True

    def __init__(self, lambdas: Sequence[float] | torch.Tensor | None = None,
                 temperature: float = 1.0):
        if lambdas is not None:
            prior_logits(lambdas)  # validate now: clear error at construction, not mid-sampling
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.lambdas = lambdas
        self.temperature = float(temperature)
        self.n_sources: int | None = None
        self.device = torch.device("cpu")  # where reset() puts the state
        self.batch: int | None = None
        self.log_prior: torch.Tensor | None = None  # [N x n]
        self.step = 0
        self.n_steps = 1
        self.t = None
        self.sigma: float | None = None
        self.sigma_next: float | None = None

    def reset(self, n_sources: int, batch: int, device: torch.device | str | None = None) -> None:
        """Start a new trajectory for `batch` images composing `n_sources` sources; the estimator's state
        (prior, accumulated evidence) lives on `device` (the model's; default CPU), in float32 or wider."""
        if n_sources < 1 or batch < 1:
            raise ValueError(f"need n_sources >= 1 and batch >= 1, got {n_sources}, {batch}")
        self.device = torch.device(device or "cpu")
        if self.lambdas is None:
            log_prior = torch.full((n_sources,), -math.log(n_sources), device=self.device)
        else:
            log_prior = prior_logits(self.lambdas).to(self.device)
            if log_prior.shape[-1] != n_sources:
                raise ValueError(f"{self.name}: got {log_prior.shape[-1]} lambdas for "
                                 f"{n_sources} sources")
            if log_prior.dim() == 2 and log_prior.shape[0] != batch:
                raise ValueError(f"{self.name}: per-image lambdas have {log_prior.shape[0]} rows "
                                 f"for a batch of {batch}")
        self.n_sources, self.batch = n_sources, batch
        self.log_prior = torch.broadcast_to(log_prior, (batch, n_sources)).clone()
        self.step, self.n_steps, self.t, self.sigma, self.sigma_next = 0, 1, None, None, None

    def set_state(self, step: int, n_steps: int, t=None, sigma: float | None = None,
                  sigma_next: float | None = None) -> None:
        """Per-step state: step index, number of steps, scheduler timestep t, VE sigmas of this
        step's input and of the sample the step produces (sigma_next < sigma)."""
        self.step, self.n_steps, self.t = int(step), int(n_steps), t
        self.sigma = None if sigma is None else float(sigma)
        self.sigma_next = None if sigma_next is None else float(sigma_next)

    def _check_ready(self) -> None:
        if self.log_prior is None:
            raise RuntimeError(f"{self.name}: call reset(n_sources, batch) before weights()")

    def weights(self, x: torch.Tensor, eps_rows: torch.Tensor | None = None,
                **extra) -> torch.Tensor:
        """Posterior weights [N x n] (rows sum to 1) for the samples x [N x C x H x W]."""
        raise NotImplementedError

    def observe(self, x_prev: torch.Tensor, x_next: torch.Tensor, eps_rows: torch.Tensor,
                active: torch.Tensor | None = None) -> None:
        """The sampler stepped x_prev -> x_next using eps_rows [n x N x ...] evaluated at x_prev.
        Estimators with no trajectory state ignore it."""


class LogitEstimator(WeightEstimator):
    """w = softmax(T * score_fn(x, t) + log lambda) for a learned router `score_fn(x, t) -> [N x n]`."""

    def __init__(self, score_fn, lambdas=None, temperature: float = 1.0):
        if not callable(score_fn):
            raise TypeError(f"{self.name}: score_fn must be a callable (x, t, **extra) -> logits "
                            f"[N x n], got {type(score_fn).__name__}")
        super().__init__(lambdas, temperature)
        self.score_fn = score_fn

    def logits(self, x: torch.Tensor, **extra) -> torch.Tensor:
        """The router's output [N x n], before the prior."""
        out = self.score_fn(x, self.t, **extra)
        if tuple(out.shape) != (self.batch, self.n_sources):
            raise ValueError(f"{self.name}: score_fn returned shape {tuple(out.shape)}, expected "
                             f"[N x n] = ({self.batch}, {self.n_sources})")
        return out

    def weights(self, x, eps_rows=None, **extra):
        self._check_ready()
        z = self.temperature * self.logits(x, **extra).float()
        return torch.softmax(z + self.log_prior.to(z.device), dim=-1)


def mix_step(estimator: WeightEstimator, x: torch.Tensor, eps_uncond: torch.Tensor | None,
             eps_rows: torch.Tensor, scale: float = 1.0, active: torch.Tensor | None = None, *,
             sparse_eps: float = 0.0, warmup_frac: float = 1.0, **extra) -> MixOutput:
    """One composed step: estimator weights -> access mask / sparse routing -> guided mix.

    x [N x C x H x W]; eps_uncond [N x C x H x W] (the shared unconditional row), [n x N x ...]
    (per-source unconditional rows: each source is guided by its own), or None (no guidance);
    eps_rows [n x N x ...]; active [N x n] bool from the previous step (or the access mask; None =
    all). sparse_eps = 0 never drops a source (dense mixing). The estimator's step and n_steps come
    from its `set_state`.
    """
    w = estimator.weights(x, eps_rows, **extra)
    if active is None:
        active = torch.ones_like(w, dtype=torch.bool)
    w, active = sparsify(w, active, sparse_eps, estimator.step, estimator.n_steps, warmup_frac)
    eps_c = mix(eps_rows, w)
    if eps_uncond is None:
        eps = eps_c
    elif eps_uncond.dim() == eps_rows.dim():
        eps = guidance(mix(eps_uncond, w), eps_c, scale)
    else:
        eps = guidance(eps_uncond, eps_c, scale)
    return MixOutput(eps=eps, weights=w, active=active)


__all__ = ["MixOutput", "WeightEstimator", "LogitEstimator", "mix_step"]
