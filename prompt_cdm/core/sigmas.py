"""VE noise levels of a diffusers scheduler's steps, for the trajectory estimators (DESIGN.md section 2).

sigma = sqrt((1 - abar) / abar) is the noise level of x~ = x / sqrt(abar), the variance-exploding view in
which the Ito and path estimators integrate the sampler's steps.
"""
from __future__ import annotations

import math


def step_sigmas(scheduler, step: int) -> tuple[float | None, float | None]:
    """VE noise levels (sigma, sigma_next) of scheduler step `step`: sigma = sqrt((1 - abar) / abar).

    Euler-family schedulers carry them (`scheduler.sigmas`, one more than the timesteps); DDPM-like
    ones are read from `alphas_cumprod` at this and the previous timestep (0 after the last step)."""
    ts = scheduler.timesteps
    sig = getattr(scheduler, "sigmas", None)
    if sig is not None and len(sig) == len(ts) + 1:
        return float(sig[step]), float(sig[step + 1])
    abar = getattr(scheduler, "alphas_cumprod", None)
    if abar is None:
        return None, None

    def ve(t) -> float:
        a = float(abar[int(t)])
        return math.sqrt((1.0 - a) / a)

    t = ts[step]
    if hasattr(scheduler, "previous_timestep"):
        prev = int(scheduler.previous_timestep(t))
    else:
        prev = int(ts[step + 1]) if step + 1 < len(ts) else -1
    return ve(t), (ve(prev) if prev >= 0 else 0.0)
