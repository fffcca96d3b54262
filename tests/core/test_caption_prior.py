"""The caption prior lambda(c) ∝ p_i(c): smoothed unigram counts per source, exact formula, refusals."""
from __future__ import annotations

import math

import pytest
import torch

from prompt_cdm.core.caption_prior import FLOOR, CaptionStats, caption_stats, content_ids, log_likelihood, prior
from prompt_cdm.world.tokenizer import clip_tokenizer


def test_log_likelihood_is_the_smoothed_unigram_formula():
    s = caption_stats([[1, 2, 2], [2, 3]], vocab_size=10)
    assert s.counts == {1: 1, 2: 3, 3: 1} and s.total == 5 and s.n_captions == 2
    want = math.log((3 + 0.5) / (5 + 0.5 * 10)) + math.log((0 + 0.5) / (5 + 0.5 * 10))
    assert log_likelihood(s, [2, 7], alpha=0.5) == pytest.approx(want, rel=1e-12)
    assert CaptionStats.from_json(s.to_json()) == s


def test_prior_prefers_the_source_whose_captions_hold_the_prompts_words():
    tok = clip_tokenizer()
    stars = caption_stats(content_ids(tok, ["a red star", "a blue star at the top", "a small star"]), tok.vocab_size)
    stripes = caption_stats(content_ids(tok, ["a red circle on a striped background", "a square, striped background"]),
                            tok.vocab_size)
    p = prior([stars, stripes], content_ids(tok, ["a green star", "a circle on a striped background", "a"]))
    assert p.shape == (3, 2) and torch.allclose(p.sum(-1), torch.ones(3))
    assert p[0, 0] > 0.9 and p[1, 1] > 0.9
    assert 0.2 < p[2, 0] < 0.8  # "a" is common to both: no strong preference
    flat = prior([stars, stripes], content_ids(tok, ["a green star"]), strength=0.0)
    assert torch.allclose(flat, torch.full((1, 2), 0.5))
    tempered = prior([stars, stripes], content_ids(tok, ["a green star"]), strength=0.1)
    assert 0.5 < tempered[0, 0] < p[0, 0]
    assert (prior([stars, stripes], [[tok.convert_tokens_to_ids("star</w>")] * 200]) >= FLOOR / 2).all()


def test_refusals():
    a, b = caption_stats([[1]], 10), caption_stats([[1]], 12)
    with pytest.raises(ValueError, match="different vocabularies"):
        prior([a, b], [[1]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        caption_stats([[11]], 10)
    with pytest.raises(ValueError, match="alpha"):
        log_likelihood(a, [1], alpha=0)
    with pytest.raises(ValueError, match="malformed"):
        CaptionStats.from_json({"counts": {"x": 1}, "vocab_size": 10, "n_captions": 1})
    with pytest.raises(ValueError, match="outside the vocabulary"):
        CaptionStats.from_json({"counts": {"99": 1}, "vocab_size": 10, "n_captions": 1})
