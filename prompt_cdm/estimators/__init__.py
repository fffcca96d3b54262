"""Weight estimators for CDM mixing, one per module, selected by name (DESIGN.md section 2).

    ESTIMATORS["ito"]  or  get_estimator("ito", lambdas=[0.7, 0.3], stochastic=True)

All share the interface of `base.WeightEstimator`: reset(n_sources, batch); set_state(step,
n_steps, t, sigma, sigma_next); weights(x, eps_rows, **extra) -> [N x n]; observe(x_prev, x_next,
eps_rows, active). `mix_step` runs one step of estimator + sparse routing + guided mix and returns
a `MixOutput(eps, weights, active)`. Imports only torch and the standard library.
"""
from __future__ import annotations

from .base import LogitEstimator, MixOutput, WeightEstimator, mix_step
from .classifier import ClassifierEstimator, classifier_loss
from .fixed import FixedEstimator
from .ito import ItoEstimator, ito_terms
from .path import PathEstimator
from .ratio import RatioEstimator, ratio_loss
from .uniform import UniformEstimator
from .watch import WatchedEstimator

ESTIMATORS: dict[str, type[WeightEstimator]] = {
    "uniform": UniformEstimator,
    "fixed": FixedEstimator,
    "classifier": ClassifierEstimator,
    "ratio": RatioEstimator,
    "ito": ItoEstimator,
    "path": PathEstimator,
}


def get_estimator(name: str, **config) -> WeightEstimator:
    """Build the estimator registered as `name` with its config (lambdas, temperature, ...)."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown weight estimator {name!r}; valid names: "
                         f"{', '.join(sorted(ESTIMATORS))}")
    return ESTIMATORS[name](**config)


__all__ = [
    "ESTIMATORS", "get_estimator", "mix_step", "MixOutput", "WeightEstimator", "LogitEstimator",
    "UniformEstimator", "FixedEstimator", "ClassifierEstimator", "RatioEstimator", "ItoEstimator",
    "PathEstimator", "WatchedEstimator", "classifier_loss", "ratio_loss", "ito_terms",
]
