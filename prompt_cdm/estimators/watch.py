"""`WatchedEstimator`: mix with one estimator's weights while another only attributes.

Attribution asks "which source does this image come from?". Under a mixture that the estimator itself
steers, the answer and the trajectory feed each other: a sample drifts towards whichever source got
weight early, and "the caption's source" need not be the source the image ends up in. To test an
estimator's evidence on images whose source is known, drive the sampler with fixed weights (e.g. one
source alone, lambda = one-hot) and let the estimator under test watch the same trajectory: it sees the
same x_t, the same per-source predictions and the same steps, but its weights never touch the mix.

    est = WatchedEstimator(drive=FixedEstimator([0, 1, 0]), watch=get_estimator("ito", stochastic=True))
    ... compose as usual ...
    est.watched_credit()        # [N x n] mean watched weight over the steps (one row per image)

Every image row of the batch gets the watched weights of its own trajectory; a new `reset` starts a
new trajectory (kept in `est.trajectories`). Pure: imports only torch and the standard library.
"""
from __future__ import annotations

import torch

from .base import WeightEstimator


class WatchedEstimator(WeightEstimator):
    """Weights of `drive` for mixing; `watch` sees every step and its weights are recorded."""

    name = "watched"

    def __init__(self, drive: WeightEstimator, watch: WeightEstimator):
        for role, est in (("drive", drive), ("watch", watch)):
            if not isinstance(est, WeightEstimator):
                raise TypeError(f"WatchedEstimator: {role} must be a WeightEstimator, got {type(est).__name__}")
        self.drive, self.watch = drive, watch  # first: the base class sets log_prior, which is the drive's
        super().__init__(None, 1.0)
        self.trajectories: list[list[torch.Tensor]] = []  # per reset: the watched weights [N x n] per step

    def reset(self, n_sources: int, batch: int, device=None) -> None:
        super().reset(n_sources, batch, device)
        self.drive.reset(n_sources, batch, device)
        self.watch.reset(n_sources, batch, device)
        if not self.trajectories or self.trajectories[-1]:  # a reset before any step starts nothing new
            self.trajectories.append([])

    @property
    def observes_guided(self) -> bool:
        """Whether `observe` should get each source's guided rows (what the watcher asks for)."""
        return getattr(self.watch, "observes_guided", False)

    @property
    def log_prior(self):
        return self.drive.log_prior

    @log_prior.setter
    def log_prior(self, value) -> None:
        # the mixing prior (user lambdas, a prompt prior) belongs to the estimator that mixes
        self.drive.log_prior = value

    def set_state(self, step, n_steps, t=None, sigma=None, sigma_next=None) -> None:
        super().set_state(step, n_steps, t, sigma, sigma_next)
        self.drive.set_state(step, n_steps, t, sigma, sigma_next)
        self.watch.set_state(step, n_steps, t, sigma, sigma_next)

    def weights(self, x, eps_rows=None, **extra) -> torch.Tensor:
        if not self.trajectories:
            raise RuntimeError("watched: call reset(n_sources, batch) before weights()")
        self.trajectories[-1].append(self.watch.weights(x, eps_rows, **extra).detach().float().cpu())
        return self.drive.weights(x, eps_rows, **extra)

    def observe(self, x_prev, x_next, eps_rows, active=None) -> None:
        self.drive.observe(x_prev, x_next, eps_rows, active=active)
        self.watch.observe(x_prev, x_next, eps_rows, active=active)

    def watched_trace(self, trajectory: int = -1) -> torch.Tensor:
        """The watched weights of one trajectory [steps x N x n]."""
        if not self.trajectories or not self.trajectories[trajectory]:
            raise ValueError("watched: no step recorded yet")
        return torch.stack(self.trajectories[trajectory])

    def watched_credit(self) -> torch.Tensor:
        """Mean watched weight over the steps, every trajectory's images stacked [sum N x n]."""
        return torch.cat([self.watched_trace(k).mean(0) for k in range(len(self.trajectories))])


__all__ = ["WatchedEstimator"]
