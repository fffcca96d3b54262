"""The caption prior lambda_i(c) ∝ p_i(c): how likely each source is to have written the prompt.

The CDM posterior for a caption-conditioned mixture (DESIGN.md section 2, Prop. 3.1 with c) is
w_i(x_t, t, c) ∝ lambda_i p_i(c) p_i(x_t | c). The `ito` estimator measures only p_i(x_t | c) (it
reads each source's own conditional predictions), and routers trained on pooled caption embeddings
learn the caption term weakly; this module estimates p_i(c) separately, per source, so forgetting a
source still means deleting its files: a smoothed unigram language model over the tokenizer's ids
of that source's captions (naive Bayes' class-conditional model),

    log p_i(c) = sum_{tok in c} log((count_i(tok) + alpha) / (total_i + alpha * V)).

`prior(...)` turns the per-source log-likelihoods of N prompts into lambda(c) [N x n] (rows sum to
1), which `compose.ComposedDenoiser(prompt_prior=...)` multiplies into the estimator's prior.
`strength` < 1 tempers naive Bayes' overconfidence (it treats a caption's tokens as independent).

Pure: imports only torch and the standard library; the registry glue is in `routers`.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

FLOOR = 1e-30  # a source the prompt makes unlikely keeps a tiny weight (0 means "never": that is a policy's job)


@dataclass
class CaptionStats:
    """Token counts of one source's captions (special tokens excluded)."""

    vocab_size: int
    counts: dict[int, int] = field(default_factory=dict)
    n_captions: int = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_json(self) -> dict:
        return {"vocab_size": self.vocab_size, "n_captions": self.n_captions,
                "counts": {str(k): v for k, v in sorted(self.counts.items())}}

    @classmethod
    def from_json(cls, data: dict) -> "CaptionStats":
        try:
            counts = {int(k): int(v) for k, v in data["counts"].items()}
            stats = cls(int(data["vocab_size"]), counts, int(data["n_captions"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"caption statistics are malformed ({type(e).__name__}: {e})") from None
        if stats.vocab_size < 1 or any(v < 0 or not 0 <= k < stats.vocab_size for k, v in counts.items()):
            raise ValueError("caption statistics hold a negative count or a token id outside the vocabulary")
        return stats


def caption_stats(id_lists: Iterable[Sequence[int]], vocab_size: int) -> CaptionStats:
    """Count the tokens of a source's captions (each a list of content token ids)."""
    counts: Counter = Counter()
    n = 0
    for ids in id_lists:
        counts.update(int(i) for i in ids)
        n += 1
    bad = [i for i in counts if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary of {vocab_size}")
    return CaptionStats(vocab_size, dict(counts), n)


def log_likelihood(stats: CaptionStats, ids: Sequence[int], alpha: float = 0.1) -> float:
    """log p(c) of one caption's content token ids under the source's smoothed unigram model."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    denom = torch.log(torch.tensor(stats.total + alpha * stats.vocab_size, dtype=torch.float64, device="cpu"))
    num = torch.tensor([stats.counts.get(int(i), 0) + alpha for i in ids], dtype=torch.float64, device="cpu")
    return float((torch.log(num) - denom).sum())


def prior(stats: Sequence[CaptionStats], id_lists: Sequence[Sequence[int]], alpha: float = 0.1,
          strength: float = 1.0) -> torch.Tensor:
    """lambda(c) [N x n]: softmax over sources of strength * log p_i(c) for each of N prompts, floored
    at FLOOR and renormalised. All sources must share one vocabulary (one tokenizer)."""
    if not stats:
        raise ValueError("caption prior: no source statistics")
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    if len({s.vocab_size for s in stats}) != 1:
        raise ValueError("caption prior: the sources' statistics come from different vocabularies")
    ll = torch.tensor([[log_likelihood(s, ids, alpha) for s in stats] for ids in id_lists], dtype=torch.float64, device="cpu")
    p = torch.softmax(strength * ll.reshape(len(id_lists), len(stats)), dim=-1).clamp_min(FLOOR)
    return (p / p.sum(dim=-1, keepdim=True)).float()


def content_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """The tokenizer's ids of each text without BOS / EOS / padding (truncated as the encoder sees it)."""
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    ids = tokenizer(list(texts), truncation=True, max_length=tokenizer.model_max_length).input_ids
    return [[i for i in row if i not in special] for row in ids]
