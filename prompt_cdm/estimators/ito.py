"""`ito`: training-free posterior weights by the Itô density estimator (SuperDiff, Skreta et al. 2024).

Each source's log-density log q_i(x_t) is tracked along the sampling trajectory from that source's
own prediction eps_i; then w = softmax(T * ll + log lambda) (CDM Prop. 3.1 with p_i = q_i).

Derivation (VE / Euler view, DESIGN.md section 2). With abar the scheduler's alpha_cumprod,
    x~ = x / sqrt(abar),   sigma = sqrt((1 - abar) / abar),   x~ = x_0 + sigma * noise,
the marginal q_i(x~, sigma) of source i solves the heat equation in sigma^2, so
    d log q_i / d(sigma^2) = 1/2 (Lap log q_i + |grad log q_i|^2),   grad log q_i = -eps_i / sigma.
A stochastic sampler steps sigma -> sigma_next < sigma with some drift and fresh Gaussian noise of
variance v per coordinate. Itô's formula on log q_i(x~, sigma) along that step, to first order:
    d log q_i = -1/2 (sigma^2 - sigma_next^2) (Lap log q_i + |grad log q_i|^2)   (time)
                + <grad log q_i, dx~>                                            (the step taken)
                + 1/2 v Lap log q_i                                              (Itô correction)
For the reverse SDE (Euler-Maruyama) v = sigma^2 - sigma_next^2: the Laplacians cancel exactly and,
with sigma^2 - sigma_next^2 ~ 2 sigma |d sigma|,
    ll_i += sum_pixels( -|d sigma| / sigma * eps_i^2  -  dx~ * eps_i / sigma ).
The drift never enters, so the trajectory may follow the mixed (and guided) prediction; only the
step dx~ actually taken matters. Terms equal for all sources (and the common starting value at
sigma_max) cancel in the softmax. Ancestral samplers (DDPM, Euler-ancestral; the two coincide in the
VE view) inject v = sigma_next^2 / sigma^2 * (sigma^2 - sigma_next^2) instead: the Laplacian residual
-1/2 (sigma^2 - sigma_next^2 - v) Lap log q_i is then not zero, but it is the same for sources whose
noisy marginals have the same Laplacian (e.g. equal spread), and it vanishes as steps get finer.
A deterministic sampler (DDIM eta=0, Euler, DPM-Solver, ...) has v = 0: the Laplacian would have to
be estimated (Hutchinson, one JVP per source per step), which this module refuses to guess.

Which tensors belong to which step. Step k of the sampler:
    set_state(k, n_steps, t_k, sigma_k, sigma_{k+1})
    weights(x_k, eps_rows_k)          -> softmax(T * ll + log lambda), ll = sum of steps 0..k-1
    the sampler steps x_k -> x_{k+1} using the mixed prediction
    observe(x_k, x_{k+1}, eps_rows_k) -> ll += increment, eps_rows_k evaluated at x_k (sigma_k)
so the weights used at step k estimate p(i | x_k). Shapes: x [N x C x H x W], eps_rows
[n x N x C x H x W], ll and weights [N x n].

`space` says what x is: "vp" (default) the latents the denoiser sees -- a DDPM sample, or an Euler
scheduler's `scale_model_input` output -- so x~ = x * sqrt(1 + sigma^2); "ve": x is x~ already
(k-diffusion samples, an Euler scheduler's `sample`). Imports only torch and the standard library.
"""
from __future__ import annotations

import torch

from .base import WeightEstimator

# Scheduler class names (diffusers) by whether their step injects fresh noise. Anything else must
# be declared with `stochastic=` explicitly.
STOCHASTIC_SCHEDULERS = frozenset({"DDPMScheduler", "EulerAncestralDiscreteScheduler"})
DETERMINISTIC_SCHEDULERS = frozenset({
    "DDIMScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
    "PNDMScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler", "DEISMultistepScheduler", "KDPM2DiscreteScheduler",
})
_FIX = ("use a stochastic sampler (DDPMScheduler, EulerAncestralDiscreteScheduler, or an "
        "Euler-Maruyama SDE sampler), or another estimator ('classifier', 'ratio')")


def ito_terms(xt_prev: torch.Tensor, xt_next: torch.Tensor, eps_rows: torch.Tensor, sigma: float,
              sigma_next: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The two per-step terms of the Itô log-density increment, each [N x n] (float64).

    xt_prev, xt_next [N x ...]: the VE samples x~ before and after the step (sigma -> sigma_next);
    eps_rows [n x N x ...]: each source's prediction at xt_prev. Returns
    (quadratic = -|d sigma| / sigma * sum eps_i^2,  linear = -sum dx~ * eps_i / sigma).
    """
    dt = torch.promote_types(eps_rows.dtype, torch.float32)  # never square half-precision eps
    eps = eps_rows.to(dt)
    dx = (xt_next.to(dt) - xt_prev.to(dt)).unsqueeze(0)
    dsig = abs(sigma_next - sigma)
    quad = -(dsig / sigma) * eps.pow(2).flatten(2).sum(-1).double()
    lin = -(dx * eps).flatten(2).sum(-1).double() / sigma
    return quad.t(), lin.t()


class ItoEstimator(WeightEstimator):
    """Training-free CDM weights from each source's own eps_i along a stochastic trajectory.

    Say which sampler drives the trajectory: `stochastic=True/False`, or `scheduler` = a diffusers
    scheduler class name (known ones are classified; others need `stochastic`). A deterministic
    sampler is refused with a ValueError.
    """

    name = "ito"
    needs_scheduler = True
    needs_noise = ("the Itô density estimator needs a stochastic sampler (a deterministic step has no noise to "
                   "cancel the Laplacian term)")

    def __init__(self, lambdas=None, temperature: float = 1.0, stochastic: bool | None = None,
                 scheduler: str | None = None, space: str = "vp"):
        super().__init__(lambdas, temperature)
        if scheduler is not None:
            if scheduler in STOCHASTIC_SCHEDULERS:
                known = True
            elif scheduler in DETERMINISTIC_SCHEDULERS:
                known = False
            elif stochastic is None:
                raise ValueError(f"{self.name}: unknown scheduler {scheduler!r}; pass stochastic=True only "
                                 "if each step adds fresh Gaussian noise (ancestral / SDE sampler)")
            else:
                known = stochastic
            if stochastic is not None and stochastic != known:
                raise ValueError(f"{self.name}: scheduler {scheduler!r} contradicts stochastic={stochastic}")
            stochastic = known
        if stochastic is None:
            raise ValueError(f"{self.name}: say which sampler drives the trajectory: stochastic=True (DDPM, "
                             "Euler-ancestral, Euler-Maruyama) or scheduler='<diffusers class name>'")
        if not stochastic:
            raise ValueError(f"{self.name}: {self.needs_noise}; {_FIX}")
        if space not in ("vp", "ve"):
            raise ValueError(f"{self.name}: space must be 'vp' or 've', got {space!r}")
        self.space = space
        self.ll: torch.Tensor | None = None  # [N x n] float64, log q_i up to a common constant

    def reset(self, n_sources: int, batch: int, device=None) -> None:
        super().reset(n_sources, batch, device)
        self.ll = torch.zeros(batch, n_sources, dtype=torch.float64, device=self.device)

    def to_ve(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """x in this estimator's space -> x~ = x / sqrt(abar) at noise level sigma."""
        return x * (1.0 + sigma * sigma) ** 0.5 if self.space == "vp" else x

    def increment(self, xt_prev, xt_next, eps_rows) -> torch.Tensor:
        """The Itô log-density increment of this step [N x n] (see the module docstring)."""
        quad, lin = ito_terms(xt_prev, xt_next, eps_rows, self.sigma, self.sigma_next)
        return quad + lin

    def observe(self, x_prev, x_next, eps_rows, active=None) -> None:
        self._check_ready()
        if self.sigma is None or self.sigma_next is None:
            raise RuntimeError(f"{self.name}: call set_state(step, n_steps, t, sigma, sigma_next) with the "
                               "VE sigmas of the step before observe()")
        if not self.sigma_next < self.sigma:
            raise ValueError(f"{self.name}: a reverse step needs sigma_next < sigma, got "
                             f"{self.sigma_next} >= {self.sigma}")
        if eps_rows.shape[:2] != (self.n_sources, self.batch):
            raise ValueError(f"{self.name}: eps_rows must be [n x N x ...] = ({self.n_sources}, "
                             f"{self.batch}, ...), got {tuple(eps_rows.shape)}")
        inc = self.increment(self.to_ve(x_prev, self.sigma), self.to_ve(x_next, self.sigma_next),
                             eps_rows)
        if active is not None:  # a dropped source's row is not computed any more: freeze its ll
            active = torch.as_tensor(active, device=inc.device)
            inc = torch.where(active, inc, torch.zeros_like(inc))
        self.ll = self.ll.to(inc.device) + inc

    def weights(self, x, eps_rows=None, **extra) -> torch.Tensor:
        self._check_ready()
        z = self.temperature * self.ll + self.log_prior.to(self.ll.device, torch.float64)
        return torch.softmax(z, dim=-1).float().to(x.device)
