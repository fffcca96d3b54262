"""A composition request: everything one call of `CDMPipeline` needs to know, validated on construction.

The request is data (it round-trips through JSON and the CLI's flags); what it *means* for a given
backbone and set of sources -- which estimator object, which unconditional row, which prior -- is
decided by the pipeline (pipeline.py), in one place. The defaults that every caller used to repeat
live here: sparse routing's constants and the unconditional-row rule (`default_uncond`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from ..core.mixing import prior_logits

UNCOND_MODES = ("shared", "per-source")
# sparse routing's starting point (DESIGN.md section 2; to be measured, not trusted): drop a source
# whose weight is < 5% once the first 20% of the steps are done
SPARSE_EPS, SPARSE_WARMUP = 0.05, 0.2
# bounds of a request: past them the numbers are typos or attacks (a seed must leave room for seed + index
# in torch's 64-bit generator; guidance past 100 only saturates the image)
MAX_STEPS, MAX_GUIDANCE, MAX_SEED = 10_000, 100.0, 2**62


class ComposeError(ValueError):
    """A composition cannot be built or run; the message says the fix."""


class ProviderError(ComposeError):
    """The registry could not supply what a request needs: `need` is "heads" (an estimator's trained
    heads) or "caption_prior" (the sources' caption statistics); the message is the registry's."""

    def __init__(self, need: str, message: str):
        super().__init__(message)
        self.need = need


def default_uncond(n_sources: int) -> str:
    """The guidance's unconditional row when a request leaves it open: one source uses its own adapter's
    unconditional row (2 rows per image: exactly what diffusers gives with that adapter loaded); several
    share the frozen backbone's one unconditional row (n + 1 rows per image, DESIGN.md section 2)."""
    return "per-source" if n_sources == 1 else "shared"


def parse_lambdas(text: str | None) -> dict[str, float] | None:
    """"a=0.5,b=0.5" -> {"a": 0.5, "b": 0.5} (the CLI's spelling of a mixing prior). None -> None."""
    if text is None:
        return None
    out: dict[str, float] = {}
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        key, eq, val = part.partition("=")
        key = key.strip()
        if not eq:
            raise ComposeError(f"weights: {part!r} is not NAME=NUMBER (e.g. --weights a=0.5,b=0.5)")
        if key in out:
            raise ComposeError(f"weights: source {key!r} given twice")
        try:
            out[key] = float(val)
        except ValueError:
            raise ComposeError(f"weights: {val.strip()!r} for {key!r} is not a number") from None
    return out


def lambdas_for(lambdas: Mapping[str, float] | None, names: Sequence[str]) -> list[float] | None:
    """The mixing prior in the order of the composed `names`: every composed source named once,
    non-negative numbers with a positive sum. None -> None."""
    if lambdas is None:
        return None
    unknown = [k for k in lambdas if k not in names]
    if unknown:
        raise ComposeError(f"weights: unknown source {unknown[0]!r}; composed sources: {', '.join(names)}")
    missing = [n for n in names if n not in lambdas]
    if missing:
        raise ComposeError(f"weights: give one for every composed source; missing {', '.join(missing)}")
    lam = [float(lambdas[n]) for n in names]
    try:
        prior_logits(lam)
    except ValueError as e:
        raise ComposeError(f"weights: {e}") from None
    return lam


@dataclass
class ComposeRequest:
    """One composed generation: one image per prompt.

    sources / policy select registry sources (neither: every source the pipeline holds); with adapter
    folders the folders are the sources. The estimator names a weight estimator (`estimators.ESTIMATORS`);
    what it needs (trained heads, a stochastic scheduler, the caption context) the pipeline supplies.
    """

    prompts: list[str] = field(metadata={"help": "one image per prompt"})
    sources: list[str] | None = field(default=None, metadata={
        "help": "registry sources to compose (default: all the policy allows)"})
    policy: str | None = field(default=None, metadata={"help": "registry access policy (the sources a caller may use)"})
    estimator: str = field(default="uniform", metadata={
        "help": "weight estimator: uniform, fixed, classifier, ratio, ito, path (trajectory likelihood)"})
    lambdas: dict[str, float] | None = field(default=None, metadata={
        "help": "mixing prior lambda per source (the mixture itself for the fixed estimator)"})
    # lambda_i(c) ∝ lambda_i p_i(c)^S, each source's caption model (registry caches, `router cache`); None = off.
    # S < 1 tempers the unigram model's overconfidence.
    caption_prior: float | None = field(default=None, metadata={
        "help": "strength S of the caption prior p_i(prompt)^S (None: off)"})
    sparse: bool = field(default=False, metadata={"help": "sparse routing: drop low-weight sources after warm-up"})
    sparse_eps: float = field(default=SPARSE_EPS, metadata={"help": "sparse routing drops a source below this weight"})
    # 0 is safe when the weights are decided from the start (e.g. with the caption prior)
    sparse_warmup: float = field(default=SPARSE_WARMUP, metadata={
        "help": "fraction of the steps that keep every source before sparse routing may drop one"})
    uncond: str | None = field(default=None, metadata={
        "help": "shared (frozen backbone, n+1 rows) or per-source (2n rows); default: per-source for one source "
                "(= plain diffusers with that adapter), else shared"})
    steps: int = field(default=25, metadata={"help": "sampling steps"})
    guidance: float = field(default=5.0, metadata={"help": "classifier-free guidance scale"})
    seed: int = field(default=0, metadata={"help": "sampling seed (diffusers' generator semantics)"})
    # each batch draws its noise from Generator(seed + first index): the batch size is part of the seed
    batch_size: int = field(default=16, metadata={"help": "prompts per UNet batch"})
    scheduler: str | None = field(default=None, metadata={"help": "diffusers scheduler class (default: the backbone's)"})
    temperature: float = field(default=1.0, metadata={"help": "estimator temperature (learned / trajectory estimators)"})
    size: int | None = field(default=None, metadata={"help": "image size in pixels (default: the backbone's)"})
    # the rows of one step split into passes of at most this many (compose/rows.py); changes memory, not images
    max_rows: int | None = field(default=None, metadata={
        "help": "UNet rows per pass (default: automatic -- unlimited on the CPU, what free GPU memory holds)"})

    def __post_init__(self):
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        self.prompts = list(self.prompts)
        if not self.prompts or not all(isinstance(p, str) for p in self.prompts):
            raise ComposeError("give at least one prompt (a list of strings)")
        if not all(p.strip() for p in self.prompts):
            raise ComposeError("a prompt is empty; give text to generate from (an empty prompt is the "
                               "unconditional row, not a request)")
        if self.sources is not None:
            self.sources = list(dict.fromkeys(self.sources))
            if not self.sources:
                raise ComposeError("sources: name at least one source, or leave it out for all")
        from ..estimators import ESTIMATORS

        if self.estimator not in ESTIMATORS:
            raise ComposeError(f"unknown router {self.estimator!r}; valid: {', '.join(sorted(ESTIMATORS))}")
        if self.uncond is not None and self.uncond not in UNCOND_MODES:
            raise ComposeError(f"--uncond must be one of {', '.join(UNCOND_MODES)}, got {self.uncond!r}")
        if self.caption_prior is not None and not (self.caption_prior >= 0):
            raise ComposeError(f"--caption-prior-strength must be >= 0, got {self.caption_prior}")
        if not 0.0 <= self.sparse_warmup <= 1.0:
            raise ComposeError(f"--sparse-warmup must be in [0, 1], got {self.sparse_warmup}")
        if self.sparse_eps < 0:
            raise ComposeError(f"sparse_eps must be >= 0, got {self.sparse_eps}")
        if self.lambdas is not None:
            self.lambdas = {str(k): float(v) for k, v in dict(self.lambdas).items()}
            if not all(math.isfinite(v) for v in self.lambdas.values()):
                raise ComposeError("weights: every lambda must be a finite number")
        if self.batch_size < 1:
            raise ComposeError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_rows is not None and self.max_rows < 1:
            raise ComposeError(f"--max-rows must be >= 1, got {self.max_rows}")
        if not 1 <= self.steps <= MAX_STEPS:
            raise ComposeError(f"--steps must be in 1..{MAX_STEPS}, got {self.steps}")
        if not (math.isfinite(self.guidance) and 0 <= self.guidance <= MAX_GUIDANCE):
            raise ComposeError(f"--guidance must be a number in 0..{MAX_GUIDANCE:g} (1 = no guidance), got "
                               f"{self.guidance}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ComposeError(f"--seed must be in 0..{MAX_SEED} (2**62), got {self.seed}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ComposeError(f"--temperature must be a number > 0, got {self.temperature}")
        if self.size is not None and not (8 <= self.size <= 4096 and self.size % 8 == 0):
            raise ComposeError(f"--size must be a multiple of 8 in 8..4096, got {self.size}")
        if not math.isfinite(self.sparse_eps) or (self.caption_prior is not None
                                                  and not math.isfinite(self.caption_prior)):
            raise ComposeError("sparse_eps and the caption prior's strength must be finite numbers")

    def uncond_for(self, n_sources: int) -> str:
        return self.uncond or default_uncond(n_sources)

    @property
    def sparse_settings(self) -> tuple[float, float]:
        """(eps, warm-up fraction) of sparse routing; (0, 0) when it is off."""
        return (self.sparse_eps, self.sparse_warmup) if self.sparse else (0.0, 0.0)
