"""`path`: training-free posterior weights from each source's likelihood of the trajectory taken.

A stochastic sampler turns source i's (guided) prediction eps_i into a Gaussian transition kernel
    p_i(x~' | x~) = N(x~'; x~ - b eps_i(x~), v I)
in the VE view (x~ = x / sqrt(abar), sigma = sqrt((1 - abar) / abar); ito.py has the conventions). The
mixture of the sources' samplers is a mixture of path measures, sum_i lambda_i p_i(x_T, ..., x_k), and its
posterior over sources given the steps taken so far is
    w_i ∝ lambda_i prod_{j < k} p_i(x~_{j+1} | x~_j),
exact in discrete time: no Laplacian, no step-size expansion (cf. the Itô estimator, ito.py, which targets
p(i | x_t) and carries a Laplacian residual under ancestral samplers). Its per-step increment, dropping terms
equal for all sources, with dx~ = x~' - x~:
    ll_i += -(b / v) <dx~, eps_i> - b^2 / (2 v) |eps_i|^2.
Drawing x~' from the kernel mixture with these weights samples the mixture exactly; the composed denoiser
mixes the means instead (one sampler step with sum_i w_i eps_i), as the CDM mixture does for every estimator.
As an attribution this answers "whose sampler made this trajectory" -- the question at generation time,
when the trajectory is known.

Samplers (b, v per step from sigma -> sigma' < sigma, s = sigma^2):
    "ancestral"       DDPM on strided timesteps and Euler-ancestral (the same step in the VE view):
                      v = s' (s - s') / s, sigma_down = s' / sigma, b = sigma - sigma_down
    "euler-maruyama"  the reverse VE SDE: v = s - s', b = (s - s') / sigma
A step without noise (v = 0, e.g. the last one onto clean data) carries no evidence and adds nothing.

The sampler steps with the guided prediction, so the kernel of source i is its guided prediction too:
`observes_guided` asks the composed denoiser to hand `observe` the per-source guided rows (each source's
conditional row guided by its unconditional row, or by the shared one). Imports only torch.
"""
from __future__ import annotations

import torch

from .ito import STOCHASTIC_SCHEDULERS, ItoEstimator

SAMPLERS = ("ancestral", "euler-maruyama")


def kernel_coefficients(sigma: float, sigma_next: float, sampler: str = "ancestral") -> tuple[float, float]:
    """(b, v) of the VE step sigma -> sigma_next: mean x~ - b eps, per-coordinate noise variance v."""
    s, sn = sigma * sigma, sigma_next * sigma_next
    if sampler == "ancestral":
        return sigma - sn / sigma, sn * (s - sn) / s
    if sampler == "euler-maruyama":
        return (s - sn) / sigma, s - sn
    raise ValueError(f"path: sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")


def path_increment(xt_prev: torch.Tensor, xt_next: torch.Tensor, eps_rows: torch.Tensor, b: float,
                   v: float) -> torch.Tensor:
    """log p_i(x~' | x~) up to a term equal for all sources, [N x n] float64 (zeros when v = 0).

    xt_prev, xt_next [N x ...] VE samples; eps_rows [n x N x ...] each source's prediction at xt_prev."""
    n, N = eps_rows.shape[:2]
    if v <= 0.0:
        return torch.zeros(N, n, dtype=torch.float64, device=eps_rows.device)
    dt = torch.promote_types(eps_rows.dtype, torch.float32)
    eps = eps_rows.to(dt)
    dx = (xt_next.to(dt) - xt_prev.to(dt)).unsqueeze(0)
    lin = -(b / v) * (dx * eps).flatten(2).sum(-1).double()
    quad = -(b * b / (2.0 * v)) * eps.pow(2).flatten(2).sum(-1).double()
    return (lin + quad).t()


class PathEstimator(ItoEstimator):
    """CDM weights from each source's likelihood of the trajectory under its own sampler kernel.

    Same construction as `ito` (a stochastic sampler is required: `scheduler` = a diffusers class name, or
    `stochastic=True`) plus `sampler`, the kernel family (default "ancestral": DDPMScheduler and
    EulerAncestralDiscreteScheduler).
    """

    name = "path"
    observes_guided = True
    needs_noise = ("the path likelihood needs a stochastic sampler (a deterministic step's kernel is a point "
                   "mass: there is no likelihood to compare)")

    def __init__(self, lambdas=None, temperature: float = 1.0, stochastic: bool | None = None,
                 scheduler: str | None = None, space: str = "vp", sampler: str | None = None):
        super().__init__(lambdas, temperature, stochastic, scheduler, space)
        if sampler is None:
            sampler = "ancestral" if scheduler is None or scheduler in STOCHASTIC_SCHEDULERS else None
        if sampler is None:
            raise ValueError(f"path: say which kernel scheduler {scheduler!r} steps with: sampler="
                             f"{' or '.join(repr(s) for s in SAMPLERS)}")
        kernel_coefficients(1.0, 0.5, sampler)  # validate the name now
        self.sampler = sampler

    def increment(self, xt_prev, xt_next, eps_rows) -> torch.Tensor:
        b, v = kernel_coefficients(self.sigma, self.sigma_next, self.sampler)
        return path_increment(xt_prev, xt_next, eps_rows, b, v)


__all__ = ["PathEstimator", "kernel_coefficients", "path_increment", "SAMPLERS"]
