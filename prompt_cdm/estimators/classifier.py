"""`classifier`: the CDM paper's router -- one n-way noise-aware classifier on (x_t, t, c).

Trained with cross-entropy on noised latents of all sources, its logits estimate
log p(i | x_t) = log p_i(x_t) + log pi_i + const, where pi is the class frequency it was trained
with. So w = softmax(logits - log pi + log lambda) is the CDM posterior (Golatkar et al. 2023,
Prop. 3.1); with balanced training (pi uniform) this is DESIGN.md's softmax(logits + log lambda).
The classifier has seen every source: forgetting one means retraining it on the rest.

The network itself lives elsewhere: this module takes `score_fn(x, t, **extra) -> logits [N x n]`
and holds only the math. Imports only torch and the standard library.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..core.mixing import prior_logits
from .base import LogitEstimator


class ClassifierEstimator(LogitEstimator):
    """w = softmax(T * (logits - log train_prior) + log lambda); logits from score_fn [N x n].

    train_prior: the class frequencies the classifier was trained with, if not balanced (None =
    balanced, nothing subtracted).
    """

    name = "classifier"
    needs_heads = True

    def __init__(self, score_fn, lambdas=None, temperature: float = 1.0,
                 train_prior: Sequence[float] | torch.Tensor | None = None):
        super().__init__(score_fn, lambdas, temperature)
        self.log_train_prior = None if train_prior is None else prior_logits(train_prior)
        if self.log_train_prior is not None and not torch.isfinite(self.log_train_prior).all():
            raise ValueError("train_prior must be positive for every class the classifier knows")

    def logits(self, x, **extra):
        out = super().logits(x, **extra)
        if self.log_train_prior is not None:
            if self.log_train_prior.shape[-1] != self.n_sources:
                raise ValueError(f"classifier: train_prior has {self.log_train_prior.shape[-1]} "
                                 f"classes for {self.n_sources} sources")
            out = out - self.log_train_prior.to(out.device, out.dtype)
        return out


def classifier_loss(logits: torch.Tensor, labels: torch.Tensor,
                    class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the n-way noise-aware classifier: logits [B x n], labels [B] (source index).

    Its minimiser is logits = log p(i | x_t) + const, i.e. log p_i(x_t) + log pi_i with pi the
    (class_weights-reweighted) label frequency of the training batches.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"need logits [B x n] and labels [B], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    return F.cross_entropy(logits, labels.long(), weight=class_weights)
