"""The composed denoiser: n per-source adapters on one frozen UNet, ONE UNet pass per step.

CDM (Golatkar et al. 2023, arXiv 2308.01937, Prop. 3.1) mixes per-source predictions with the
posterior weights w_i(x_t, t, c) = lambda_i p_i(x_t | c) / sum_j lambda_j p_j(x_t | c); with
classifier-free guidance scale g and ONE shared unconditional row (DESIGN.md section 2):
    eps = eps_u + g (sum_i w_i eps_i(c) - eps_u).
Each step stacks the rows of every image into one batch and calls the UNet once:

    rows = [eps_u(x_j)  for each image j]                      (uncond="shared": frozen backbone)
         + [eps_i(x_j | c_j)  for each source i, image j still active]
    uncond="per-source": one unconditional row per active (image, source), with the source's
    adapter applied (2 rows per pair; what a diffusers user with one adapter loaded gets).

A LoRA source's rows go through its own peft adapter and every other row through none, by peft's
mixed-adapter batch (`LoraLayer._mixed_batch_forward`, routed by `adapter_names`, see `route_rows`);
a soft-prompt source differs only in its rows' text embedding (its placeholder prefixes the
caption). LoRA and soft-prompt sources mix in one batch. Sparse routing (`sparse_eps > 0`) drops a
source's rows once its weight falls below eps after the warm-up, so rows per step fall from
N (n + 1) towards 2N. Per-step weights leave through `callback(step, t, MixOutput)` (e.g. an
`attribution.TraceRecorder`). The weights come from any estimator (`estimators.get_estimator`).

Shapes: x [N x C x H x W] the latents the sampler hands the denoiser; eps_rows [n x N x C x H x W];
weights / active [N x n]; text embeddings [N x L x D].
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..adapters.lora import BASE, lora_layers
from ..adapters.lora import route_rows as _route_rows
from ..estimators import MixOutput, WeightEstimator, mix_step
from ..core.mixing import guided_rows, normalize, prior_logits
from ..core.sigmas import step_sigmas

UNCOND_MODES = ("shared", "per-source")
# sparse routing's starting point (DESIGN.md section 2; to be measured, not trusted): drop a source
# whose weight is < 5% once the first 20% of the steps are done
SPARSE_EPS, SPARSE_WARMUP = 0.05, 0.2
KINDS = ("lora", "soft-prompt")


class ComposeError(ValueError):
    """A composition cannot be built or run; the message says the fix."""


@dataclass(frozen=True)
class Source:
    """One composed source: its id, adapter kind and its handle on the pipeline.

    handle: the peft adapter name of a LoRA, the placeholder of a soft prompt.
    text_lora: the LoRA also adapts the text encoder (its rows' prompts are encoded through it).
    """

    name: str
    kind: str
    handle: str
    text_lora: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ComposeError(f"source {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")

    @classmethod
    def from_adapter(cls, loaded) -> "Source":
        """From a `store.LoadedAdapter` (what `load_adapter` returns)."""
        text = loaded.kind == "lora" and bool(loaded.config.params.get("text_encoder", False))
        return cls(loaded.config.source_id, loaded.kind, loaded.name, text)

    def prompt(self, caption: str) -> str:
        """The conditional prompt: a soft prompt's placeholder prefixes the caption; a LoRA keeps it."""
        return f"{self.handle} {caption}" if self.kind == "soft-prompt" else caption

    @property
    def unet_adapter(self) -> str:
        return self.handle if self.kind == "lora" else BASE

    @property
    def text_adapter(self) -> str:
        return self.handle if self.text_lora else BASE


def as_sources(sources: Sequence) -> list[Source]:
    """Sources or LoadedAdapters -> [Source]; names must be unique."""
    out = [s if isinstance(s, Source) else Source.from_adapter(s) for s in sources]
    if not out:
        raise ComposeError("compose at least one source")
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ComposeError(f"source names must be unique, got {names}")
    return out


def route_rows(model, adapter_names: Sequence[str]):
    """`adapters.lora.route_rows` raising ComposeError (a bad composition request)."""
    return _route_rows(model, adapter_names, error=ComposeError)


@torch.no_grad()
def encode_rows(pipe, prompts: Sequence[str], text_adapters: Sequence[str]) -> torch.Tensor:
    """[M x L x D] text embeddings, prompt k encoded through text-encoder LoRA text_adapters[k]
    ("__base__" = the frozen encoder), all in one text-encoder call."""
    from .text import encode_prompts

    if any(n != BASE for n in text_adapters) or lora_layers(pipe.text_encoder):
        with route_rows(pipe.text_encoder, text_adapters):
            return encode_prompts(pipe, list(prompts))
    return encode_prompts(pipe, list(prompts))


# ---------------------------------------------------------------- the composed denoiser


@dataclass
class StepRecord:
    """What one composed step computed (kept for parity tests, the ito estimator and benchmarks)."""

    x: torch.Tensor                       # [N x C x H x W] the denoiser's input
    eps_uncond: torch.Tensor | None       # [N x ...] shared, [n x N x ...] per-source, None if g == 1
    eps_rows: torch.Tensor                # [n x N x ...]; zeros where a source's row was not computed
    computed: torch.Tensor                # [N x n] bool, the (image, source) rows this step computed
    out: MixOutput                        # eps, weights [N x n], active [N x n] for the next step
    rows: int                             # UNet batch size of this step


@dataclass(eq=False)
class ComposedDenoiser:
    """`denoise(x, t) -> eps` for `sampling.sample`, composing `sources` with `estimator`'s weights.

    prompts: the N captions (soft-prompt sources prefix their placeholder). scheduler: the scheduler
    instance the sampling loop steps (its timesteps give the step index and the sigmas the
    estimators need). allowed: access policy, bool [n] or [N x n] (None = all). prompt_prior:
    lambda(c) [N x n] (or [n]) multiplied into the estimator's prior lambda (0 = never). sparse_eps > 0
    turns on sparse routing after `warmup_frac` of the steps. router_context: pass the frozen
    encoder's caption embedding to the estimator's router as `context=[N x L x D]` (the c of
    classifier/ratio heads). Call `reset()` before reusing it for a new trajectory.
    """

    pipe: object = field(repr=False)
    sources: Sequence
    prompts: Sequence[str]
    estimator: WeightEstimator
    scheduler: object = field(repr=False)
    guidance_scale: float = 5.0
    uncond: str = "shared"
    allowed: torch.Tensor | Sequence[bool] | None = None
    prompt_prior: torch.Tensor | Sequence[float] | None = None
    sparse_eps: float = 0.0
    warmup_frac: float = 0.0
    callback: Callable[[int, torch.Tensor, MixOutput], None] | None = None
    negative_prompt: str = ""
    router_context: bool = False
    last: StepRecord | None = field(default=None, init=False, repr=False)
    rows_per_step: list[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        self.sources = as_sources(self.sources)
        self.prompts = list(self.prompts)
        if not self.prompts:
            raise ComposeError("compose needs at least one prompt")
        if self.uncond not in UNCOND_MODES:
            raise ComposeError(f"uncond must be one of {UNCOND_MODES}, got {self.uncond!r}")
        if not isinstance(self.estimator, WeightEstimator):
            raise ComposeError(f"estimator must be a WeightEstimator, got {type(self.estimator).__name__}")
        if self.sparse_eps < 0 or not 0.0 <= self.warmup_frac <= 1.0:
            raise ComposeError(f"need sparse_eps >= 0 and warmup_frac in [0, 1], got {self.sparse_eps}, "
                               f"{self.warmup_frac}")
        n, N = len(self.sources), len(self.prompts)
        try:
            allowed = torch.ones(n, dtype=torch.bool) if self.allowed is None else self.allowed
            self._allowed = normalize(torch.ones(N, n), allowed) > 0  # validates shape and non-empty rows
            self._prior = None
            if self.prompt_prior is not None:
                self._prior = torch.broadcast_to(prior_logits(self.prompt_prior), (N, n)).clone()
        except ValueError as e:
            raise ComposeError(str(e)) from None
        self._encode()
        self.reset()

    @property
    def n(self) -> int:
        return len(self.sources)

    @property
    def batch(self) -> int:
        return len(self.prompts)

    def _encode(self) -> None:
        """Text embeddings once per composition: [N x L x D] per source, shared and per-source uncond."""
        S, N = self.sources, self.batch
        prompts = [s.prompt(c) for s in S for c in self.prompts]
        names = [s.text_adapter for s in S for _ in self.prompts]
        # the unconditional prompt of every distinct text encoder (frozen + each text LoRA)
        text_names = list(dict.fromkeys([BASE] + [s.text_adapter for s in S]))
        ctx = list(self.prompts) if self.router_context else []
        emb = encode_rows(self.pipe, prompts + [self.negative_prompt] * len(text_names) + ctx,
                          names + text_names + [BASE] * len(ctx))
        self._cond = emb[: len(prompts)].reshape(len(S), N, *emb.shape[1:])          # [n x N x L x D]
        unc = dict(zip(text_names, emb[len(prompts): len(prompts) + len(text_names)]))
        self._uncond_shared = unc[BASE]                                             # [L x D]
        self._uncond_source = torch.stack([unc[s.text_adapter] for s in S])         # [n x L x D]
        self._context = emb[len(prompts) + len(text_names):] if ctx else None      # [N x L x D]

    def reset(self) -> None:
        """Start a new trajectory (same prompts and sources)."""
        self.estimator.reset(self.n, self.batch)
        if self._prior is not None:  # lambda_i(c) ∝ lambda_i p_i(c): add the logs, renormalise
            lp = self.estimator.log_prior.to(self._prior.dtype) + self._prior
            if not bool(torch.isfinite(lp.max(dim=-1).values).all()):
                raise ComposeError("the prompt prior and the mixing prior leave an image with no source")
            self.estimator.log_prior = torch.log_softmax(lp, dim=-1)
        self._step = 0
        self._active = self._allowed.clone()
        self.last = None
        self.rows_per_step = []

    # -- one step ---------------------------------------------------------------------------------

    def _rows(self, x: torch.Tensor, active: torch.Tensor, guided: bool):
        """Stack the batch: (latents [R x ...], embeddings [R x L x D], adapter names [R]) and where
        each block of rows goes back."""
        N = self.batch
        pairs = active.t().nonzero().tolist()  # [(source i, image j)], grouped by source
        idx_i = torch.tensor([p[0] for p in pairs], dtype=torch.long)
        idx_j = torch.tensor([p[1] for p in pairs], dtype=torch.long)
        xs, embs, names = [], [], []
        if guided and self.uncond == "shared":
            xs.append(x)
            embs.append(self._uncond_shared.expand(N, -1, -1))
            names += [BASE] * N
        elif guided:
            xs.append(x[idx_j])
            embs.append(self._uncond_source[idx_i])
            names += [self.sources[i].unet_adapter for i, _ in pairs]
        xs.append(x[idx_j])
        embs.append(self._cond[idx_i, idx_j])
        names += [self.sources[i].unet_adapter for i, _ in pairs]
        return torch.cat(xs), torch.cat(embs).to(x.dtype), names, idx_i, idx_j

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        if x.shape[0] != self.batch:
            raise ComposeError(f"x has {x.shape[0]} images for {self.batch} prompts")
        step, n_steps = self._step, len(self.scheduler.timesteps)
        if step >= n_steps:
            raise ComposeError(f"step {step} past the scheduler's {n_steps} timesteps; call reset() "
                               "before a new trajectory")
        est = self.estimator
        if self.last is not None:
            # the sampler stepped last.x -> x (both in the denoiser's input space): the trajectory
            # estimators (ito) integrate it, with the sigmas of that step still set
            rows = self.last.eps_rows
            if getattr(est, "observes_guided", False):  # the kernel each source's own sampler would step with
                rows = guided_rows(self.last.eps_uncond, rows, self.guidance_scale)
            est.observe(self.last.x, x, rows, active=self.last.computed)
        sigma, sigma_next = step_sigmas(self.scheduler, step)
        est.set_state(step, n_steps, t, sigma, sigma_next)

        guided = self.guidance_scale != 1.0  # as generate.guided_denoiser: g == 1 needs no uncond rows
        active = self._active.to(x.device)
        xs, embs, names, idx_i, idx_j = self._rows(x, active, guided)
        unet = self.pipe.unet
        if any(nm != BASE for nm in names) or lora_layers(unet):
            with route_rows(unet, names):
                out = unet(xs, t, encoder_hidden_states=embs).sample
        else:
            out = unet(xs, t, encoder_hidden_states=embs).sample

        n, N, m = self.n, self.batch, len(idx_i)
        eps_rows = x.new_zeros((n, N, *x.shape[1:]))
        eps_rows[idx_i, idx_j] = out[-m:]
        eps_u = None
        if guided and self.uncond == "shared":
            eps_u = out[:N]
        elif guided:
            eps_u = x.new_zeros((n, N, *x.shape[1:]))
            eps_u[idx_i, idx_j] = out[:m]
        extra = {"context": self._context} if self.router_context else {}
        mixed = mix_step(est, x, eps_u, eps_rows, self.guidance_scale, active,
                         sparse_eps=self.sparse_eps, warmup_frac=self.warmup_frac, **extra)
        self.last = StepRecord(x, eps_u, eps_rows, active, mixed, len(names))
        self.rows_per_step.append(len(names))
        self._active = mixed.active
        self._step += 1
        if self.callback is not None:
            self.callback(step, t, mixed)
        return mixed.eps


# ---------------------------------------------------------------- text to image


@dataclass
class ComposeResult:
    images: object                    # list of PIL images, [N x H x W x 3] float array, or latents
    traces: list                      # one attribution.TraceRecorder per batch of prompts
    rows_per_step: list[list[int]]    # UNet batch size of each step, per batch of prompts

    def trace_json(self, sources: Sequence[str], index: int) -> dict:
        """Image `index`'s trace as `attribution.trace_to_json` data."""
        b, off = 0, index
        while off >= self.traces[b].weights.shape[1]:
            off -= self.traces[b].weights.shape[1]
            b += 1
        return self.traces[b].to_json(sources, index=off)


@torch.no_grad()
def compose_images(pipe, sources: Sequence, prompts: Sequence[str], estimator: WeightEstimator, *,
                   steps: int = 25, guidance_scale: float = 5.0, seed: int = 0, batch_size: int = 16,
                   scheduler=None, uncond: str = "shared", allowed=None, prompt_prior=None,
                   sparse_eps: float = 0.0, warmup_frac: float = 0.0, router_context: bool = False,
                   output_type: str = "pil", progress: bool = False) -> ComposeResult:
    """Generate one image per prompt from the composition, with diffusers' seeding semantics.

    As `generate.text_to_image`: each batch of prompts draws its noise and then the sampler's noise
    from one `torch.Generator(seed + first index)`, so one source at weight 1 with
    uncond="per-source" equals `StableDiffusionPipeline` with that adapter loaded. `scheduler`: a
    diffusers scheduler (default: the pipeline's); it is copied per batch. allowed / prompt_prior:
    per image [N x n] (or [n]) over all the prompts. The estimator is reset for every batch.
    """
    from tqdm.auto import tqdm

    from ..core.attribution import TraceRecorder
    from .text import decode, decode_float
    from ..core.sampling import sample

    if output_type not in ("pil", "np", "latent"):
        raise ComposeError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
    prompts = list(prompts)
    sources = as_sources(sources)

    def rows(v, s, e):
        if v is None:
            return None
        v = torch.as_tensor(v)
        return v[s:e] if v.dim() == 2 else v

    if allowed is not None and torch.as_tensor(allowed).dim() == 2 and len(allowed) != len(prompts):
        raise ComposeError(f"allowed has {len(allowed)} rows for {len(prompts)} prompts")
    c, size = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    base = scheduler if scheduler is not None else pipe.scheduler
    images, traces, rows_per_step = [], [], []
    for s in tqdm(range(0, len(prompts), batch_size), desc="compose", disable=not progress):
        chunk = prompts[s: s + batch_size]
        gen = torch.Generator().manual_seed(seed + s)
        noise = torch.randn(len(chunk), c, size, size, generator=gen)
        sched = copy.deepcopy(base)
        rec = TraceRecorder()
        denoise = ComposedDenoiser(pipe, sources, chunk, estimator, sched, guidance_scale=guidance_scale,
                                   uncond=uncond, allowed=rows(allowed, s, s + len(chunk)),
                                   prompt_prior=rows(prompt_prior, s, s + len(chunk)), sparse_eps=sparse_eps,
                                   warmup_frac=warmup_frac, callback=rec, router_context=router_context)
        latents = sample(denoise, sched, noise, steps, generator=gen)
        traces.append(rec)
        rows_per_step.append(list(denoise.rows_per_step))
        if output_type == "pil":
            images += decode(pipe, latents)
        else:
            images.append(latents if output_type == "latent" else decode_float(pipe, latents))
    if output_type == "latent":
        images = torch.cat(images)
    elif output_type == "np":
        import numpy as np

        images = np.concatenate(images)
    return ComposeResult(images, traces, rows_per_step)


# ---------------------------------------------------------------- building a request


def parse_weights(text: str | None, names: Sequence[str]) -> list[float] | None:
    """"a=0.5,b=0.5" -> [0.5, 0.5] in the order of `names` (every composed source named once;
    non-negative numbers with a positive sum). None -> None."""
    if text is None:
        return None
    out: dict[str, float] = {}
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        key, eq, val = part.partition("=")
        key = key.strip()
        if not eq:
            raise ComposeError(f"weights: {part!r} is not NAME=NUMBER (e.g. --weights a=0.5,b=0.5)")
        if key not in names:
            raise ComposeError(f"weights: unknown source {key!r}; composed sources: {', '.join(names)}")
        if key in out:
            raise ComposeError(f"weights: source {key!r} given twice")
        try:
            out[key] = float(val)
        except ValueError:
            raise ComposeError(f"weights: {val.strip()!r} for {key!r} is not a number") from None
    missing = [n for n in names if n not in out]
    if missing:
        raise ComposeError(f"weights: give one for every composed source; missing {', '.join(missing)}")
    lam = [out[n] for n in names]
    try:
        prior_logits(lam)
    except ValueError as e:
        raise ComposeError(f"weights: {e}") from None
    return lam


def make_scheduler(pipe, name: str | None = None):
    """A fresh copy of the pipeline's scheduler, or the diffusers scheduler class `name` built from
    its config (it must be one of the pipeline's compatible schedulers)."""
    if name is None:
        return copy.deepcopy(pipe.scheduler)
    compatible = {c.__name__: c for c in getattr(pipe.scheduler, "compatibles", [])}
    compatible[type(pipe.scheduler).__name__] = type(pipe.scheduler)
    if name not in compatible:
        raise ComposeError(f"unknown scheduler {name!r}; valid: {', '.join(sorted(compatible))}")
    try:
        return compatible[name].from_config(pipe.scheduler.config)
    except ImportError as e:  # diffusers' placeholders for schedulers with extra dependencies
        raise ComposeError(f"scheduler {name!r} needs an extra package: {str(e).splitlines()[0]}") from None
