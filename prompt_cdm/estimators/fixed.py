"""`fixed`: w_i = lambda_i / sum_j lambda_j, constant (CDM Fig. 4's fixed mixtures, e.g. (0.5, 0.5)).

Imports only torch and the standard library.
"""
from __future__ import annotations

import torch

from .base import WeightEstimator


class FixedEstimator(WeightEstimator):
    """The user's lambdas [n] (or [N x n] per image), normalised, at every step."""

    name = "fixed"
    needs_lambdas = True
    takes_temperature = False

    def __init__(self, lambdas=None):
        if lambdas is None:
            raise ValueError("fixed needs lambdas (one non-negative number per source); use "
                             "'uniform' for equal weights")
        super().__init__(lambdas)

    def weights(self, x, eps_rows=None, **extra) -> torch.Tensor:
        self._check_ready()
        return torch.softmax(self.log_prior, dim=-1).to(x.device)
