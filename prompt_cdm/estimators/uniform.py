"""`uniform`: w_i = 1/n, constant -- the CDM paper's naive-averaging baseline (Fig. 1 left, Fig. 2).

Imports only torch and the standard library.
"""
from __future__ import annotations

import torch

from .base import WeightEstimator


class UniformEstimator(WeightEstimator):
    """Equal weights for every source at every step: weights(x, eps_rows) -> [N x n] of 1/n."""

    name = "uniform"
    takes_temperature = False

    def __init__(self, lambdas=None):
        if lambdas is not None:
            raise ValueError("uniform takes no lambdas (its weights are 1/n); use 'fixed' for a "
                             "constant non-uniform mixture, or a posterior estimator "
                             "('classifier', 'ratio', 'ito') to use lambdas as a prior")
        super().__init__(None)

    def weights(self, x, eps_rows=None, **extra) -> torch.Tensor:
        self._check_ready()
        return torch.softmax(self.log_prior, dim=-1).to(x.device)
