"""The composition pipeline: a `ComposeRequest` in, images + attribution traces + credit out.

    from prompt_cdm import CDMPipeline, ComposeRequest, Registry, load_backbone
    pipe = CDMPipeline(load_backbone("tiny"), registry=Registry("runs/registry"))
    out = pipe(ComposeRequest(prompts=["a red star"], estimator="ito"))
    out.images[0], out.credit

Every caller -- the CLI, the server's worker, the evaluation modules, the demo and the benchmarks --
builds a request and makes this one call; what the request means for this backbone and these
sources (the estimator object and what it reads, the unconditional row, the mixing and caption
priors, sparse routing) is decided here and nowhere else. `CDMPipeline.__call__` reads as numbered
steps, the way `StableDiffusionPipeline.__call__` does; the image loop (`compose_images`) is the one
text-to-image loop of the code: plain generation with the frozen backbone is its n = 1 case
(`text_to_image`).

The pipeline sits below the registry in the package DAG, so it reads a registry through the methods
it calls (duck typing): `backbone`, `sources`, `resolve(sources, policy)`, `adapter_dir(name)`,
`heads(estimator, names)` and `caption_prior(names, prompts, tokenizer, strength)` -- what
`registry.Registry` provides.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..estimators import ESTIMATORS, WeightEstimator, get_estimator
from .denoiser import PLAIN, ComposedDenoiser, ComposedSource, as_sources
from .request import ComposeError, ComposeRequest, ProviderError, lambdas_for
from .rows import RowBudgetError, check_max_rows


# ---------------------------------------------------------------- the pieces a request needs


def build_estimator(name: str, names: Sequence[str], lambdas: Sequence[float] | None = None, *, scheduler=None,
                    heads: Callable | None = None, temperature: float = 1.0) -> tuple[WeightEstimator, bool]:
    """The weight estimator `name` for sources `names` -> (estimator, whether it reads the caption context).

    What the estimator needs it declares (`needs_lambdas`, `needs_heads`, `needs_scheduler`,
    `takes_temperature` on its class): the mixing prior as the mixture itself; trained heads from
    `heads(name, names) -> (score_fn, kwargs)` (a registry's `heads`); the sampler's scheduler class.
    Bad combinations raise ComposeError; the heads provider's own errors pass through."""
    if name not in ESTIMATORS:
        raise ComposeError(f"unknown router {name!r}; valid: {', '.join(sorted(ESTIMATORS))}")
    cls = ESTIMATORS[name]
    if cls.needs_lambdas and lambdas is None:
        raise ComposeError(f"router {name!r} needs weights: one non-negative number per composed source "
                           "(e.g. a=2,b=1); use router 'uniform' for equal weights")
    kw: dict = {} if lambdas is None else {"lambdas": list(lambdas)}
    if cls.takes_temperature and temperature != 1.0:
        kw["temperature"] = temperature
    if cls.needs_scheduler:  # trajectory estimators: the sampler must be stochastic
        kw["scheduler"] = type(scheduler).__name__ if scheduler is not None else None
    if cls.needs_heads:
        if heads is None:
            raise ComposeError(f"router {name!r} needs trained heads: compose from a registry (--registry) "
                               "that holds them (`prompt-cdm router train`)")
        score_fn, extra = heads(name, list(names))
        kw.update(score_fn=score_fn, **extra)
    try:
        return get_estimator(name, **kw), cls.needs_heads
    except ValueError as e:  # the estimators' own refusals (ito + deterministic sampler, lambdas, ...)
        raise ComposeError(str(e)) from None


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
        with torch.device("cpu"):  # the schedule's tables start on the CPU; diffusers moves them to the samples
            return compatible[name].from_config(pipe.scheduler.config)
    except ImportError as e:  # diffusers' placeholders for schedulers with extra dependencies
        raise ComposeError(f"scheduler {name!r} needs an extra package: {str(e).splitlines()[0]}") from None


def load_sources(pipe, adapter_dirs: Sequence | None = None, registry=None,
                 names: Sequence[str] | None = None) -> tuple[list[ComposedSource], list]:
    """Apply the composed adapters to `pipe` -> ([ComposedSource], [LoadedAdapter]): the folders `adapter_dirs`, or the
    registry's sources `names` (each LoRA under its registry name). All or nothing: on a refusal
    the ones already applied are removed again."""
    from ..adapters import load_adapter

    if registry is not None:
        registry.check_backbone(pipe)
        todo = [(registry.adapter_dir(n), n) for n in (names or registry.sources)]
    else:
        todo = [(d, None) for d in adapter_dirs or []]
    if not todo:
        raise ComposeError("no adapter to compose")
    loaded = []
    try:
        for folder, name in todo:
            loaded.append(load_adapter(folder, pipe, name=name))
    except BaseException:
        for h in reversed(loaded):
            h.remove()
        raise
    sources = [ComposedSource.from_adapter(h) for h in loaded]
    if registry is not None:  # trace names are registry names (a source id may differ)
        sources = [ComposedSource(n, s.kind, s.handle, s.text_lora) for s, (_, n) in zip(sources, todo)]
    return sources, loaded


# ---------------------------------------------------------------- the image loop


@dataclass
class ComposeResult:
    images: object                    # list of PIL images, [N x H x W x 3] float array, or latents
    traces: list                      # one attribution.TraceRecorder per batch of prompts
    rows_per_step: list[list[int]]    # UNet batch size of each step, per batch of prompts
    sources: list[str] = field(default_factory=list)  # the composed sources, in the traces' order
    uncond: str | None = None         # the unconditional row the guidance used

    def trace_json(self, sources: Sequence[str] | None = None, index: int = 0) -> dict:
        """Image `index`'s trace as `attribution.trace_to_json` data (sources: its names, default the
        composed sources)."""
        b, off = 0, index
        while off >= self.traces[b].weights.shape[1]:
            off -= self.traces[b].weights.shape[1]
            b += 1
        return self.traces[b].to_json(list(sources) if sources is not None else self.sources, index=off)

    @property
    def n_images(self) -> int:
        return sum(int(t.weights.shape[1]) for t in self.traces)

    def traces_json(self) -> list[dict]:
        return [self.trace_json(None, k) for k in range(self.n_images)]

    @property
    def credit(self) -> dict[str, float]:
        """Each source's credit averaged over the images (a trace's credit: its weights' mean over steps)."""
        traces = self.traces_json()
        return {n: sum(t["credit"][n] for t in traces) / len(traces) for n in self.sources}


def initial_noise(shape: Sequence[int], generator: torch.Generator, device=None, dtype=None) -> torch.Tensor:
    """Unit Gaussian latents drawn from a CPU `generator` and then moved to the model's device and dtype
    (diffusers' `randn_tensor` with a CPU generator): the same seed gives the same image on any device."""
    # diffusers' randn_tensor: drawn on the generator's device in the model's dtype, then moved
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device or gen_device)


@torch.no_grad()
def compose_images(pipe, sources: Sequence, prompts: Sequence[str], estimator: WeightEstimator, *,
                   steps: int = 25, guidance_scale: float = 5.0, seed: int = 0, batch_size: int = 16,
                   scheduler=None, uncond: str = "shared", allowed=None, prompt_prior=None,
                   sparse_eps: float = 0.0, warmup_frac: float = 0.0, router_context: bool = False,
                   output_type: str = "pil", progress: bool = False, size: int | None = None,
                   max_rows: int | None = None) -> ComposeResult:
    """Generate one image per prompt from the composition, with diffusers' seeding semantics.

    Each batch of prompts draws its noise and then the sampler's noise from one
    `torch.Generator(seed + first index)`, so one source at weight 1 with uncond="per-source" equals
    `StableDiffusionPipeline` with that adapter loaded, and `ComposedSource.plain()` alone equals it on the
    backbone as it stands. `scheduler`: a diffusers scheduler (default: the pipeline's); it is copied per batch.
    allowed / prompt_prior: per image [N x n] (or [n]) over all the prompts. The estimator is reset for
    every batch; the sampler hands each step's x_{k+1} to the denoiser (`ComposedDenoiser.on_step`).
    size: image size in pixels (default: the backbone's). max_rows: UNet rows per pass (compose/rows.py)."""
    from tqdm.auto import tqdm

    from ..core.attribution import TraceRecorder
    from ..core.sampling import sample
    from .text import decode, decode_float

    if output_type not in ("pil", "np", "latent"):
        raise ComposeError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
    prompts = list(prompts)
    sources = as_sources(sources)

    def rows(v, s, e):
        if v is None:
            return None
        v = torch.as_tensor(v, device=unet.device)
        return v[s:e] if v.dim() == 2 else v

    if allowed is not None and torch.as_tensor(allowed, device="cpu").dim() == 2 and len(allowed) != len(prompts):
        raise ComposeError(f"allowed has {len(allowed)} rows for {len(prompts)} prompts")
    unet = pipe.unet
    c = unet.config.in_channels
    latent = unet.config.sample_size if size is None else latent_size(pipe, size)
    base = scheduler if scheduler is not None else pipe.scheduler
    images, traces, rows_per_step = [], [], []
    for s in tqdm(range(0, len(prompts), batch_size), desc="compose", disable=not progress):
        chunk = prompts[s: s + batch_size]
        gen = torch.Generator().manual_seed(seed + s)
        noise = initial_noise((len(chunk), c, latent, latent), gen, unet.device, unet.dtype)
        sched = copy.deepcopy(base)
        rec = TraceRecorder()
        denoise = ComposedDenoiser(pipe, sources, chunk, estimator, sched, guidance_scale=guidance_scale,
                                   uncond=uncond, allowed=rows(allowed, s, s + len(chunk)),
                                   prompt_prior=rows(prompt_prior, s, s + len(chunk)), sparse_eps=sparse_eps,
                                   warmup_frac=warmup_frac, callback=rec, router_context=router_context,
                                   max_rows=max_rows)
        latents = sample(denoise, sched, noise, steps, generator=gen, callback=denoise.on_step)
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
    return ComposeResult(images, traces, rows_per_step, [s.name for s in sources], uncond)


def latent_size(pipe, size: int) -> int:
    """The latent side of a `size`-pixel image (a multiple of the VAE's scale factor)."""
    f = int(getattr(pipe, "vae_scale_factor", 8))
    if size < f or size % f:
        raise ComposeError(f"size must be a positive multiple of {f} pixels (the VAE's scale factor), got {size}")
    return size // f


@torch.no_grad()
def text_to_image(pipe, prompts: list[str], steps: int = 25, guidance_scale: float = 5.0, seed: int = 0,
                  batch_size: int = 64, progress: bool = False, output_type: str = "pil"):
    """Plain text-to-image with the backbone as it stands (an adapter active on it applies): the n = 1
    composition of `ComposedSource.plain()`, `StableDiffusionPipeline(prompts, generator=...)` image for
    image. `output_type`: "pil" (list of uint8 PIL images), "np" ([N x H x W x 3] float32 in [0, 1],
    diffusers' "np") or "latent" ([N x C x h x w] x_0 latents)."""
    if output_type not in ("pil", "np", "latent"):
        raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
    return compose_images(pipe, [ComposedSource.plain()], prompts, get_estimator("uniform"), steps=steps,
                          guidance_scale=guidance_scale, seed=seed, batch_size=batch_size, uncond="per-source",
                          output_type=output_type, progress=progress).images


# ---------------------------------------------------------------- the pipeline


class CDMPipeline:
    """Composed generation on one frozen backbone: `CDMPipeline(backbone, registry=... | adapters=[...])`.

    backbone: a pipeline from `backbone.load` (any diffusers SD folder or hub id, or "tiny"). registry: a
    `registry.Registry` (sources, policies, trained router heads, caption statistics). adapters: adapter
    folders to compose instead (no registry: the estimators that need trained heads or caption
    statistics are refused; `caption_stats`, one `caption_prior.CaptionStats` per folder, gives the caption
    prior). Neither: the backbone alone (plain text-to-image). Adapters are applied to the backbone on
    first use and stay applied (`apply`, `remove`, `applied`) until removed.
    """

    def __init__(self, backbone, registry=None, adapters: Sequence | None = None, caption_stats: Sequence | None = None):
        if registry is not None and adapters:
            raise ComposeError("give --adapter DIR (repeatable) or --registry DIR, not both")
        self.backbone = backbone
        self.registry = registry
        self.adapter_dirs = list(adapters or [])
        if caption_stats is not None and len(caption_stats) != len(self.adapter_dirs):
            raise ComposeError(f"caption_stats: give one per adapter folder ({len(self.adapter_dirs)}), got "
                               f"{len(caption_stats)}")
        self.caption_stats = None if caption_stats is None else list(caption_stats)
        self._stats: dict = {}  # source name -> CaptionStats, once the folders are applied
        self._applied: dict[str, tuple[ComposedSource, object]] = {}
        if registry is not None:
            registry.check_backbone(backbone)

    # -- the applied adapters ---------------------------------------------------------------------

    @property
    def applied(self) -> list[str]:
        return list(self._applied)

    def apply(self, names: Sequence[str] | None = None) -> list[ComposedSource]:
        """Apply what is not applied yet of the registry's sources `names` (default: all), or of the
        adapter folders; all or nothing. Returns the composed sources, in order."""
        if self.registry is None and not self.adapter_dirs:
            return [ComposedSource.plain()]
        if self.registry is not None:
            names = list(names) if names is not None else list(self.registry.sources)
            todo = [n for n in names if n not in self._applied]
            if todo:
                sources, loaded = load_sources(self.backbone, None, self.registry, todo)
                self._applied.update({s.name: (s, h) for s, h in zip(sources, loaded)})
            return [self._applied[n][0] for n in names]
        if not self._applied:
            sources, loaded = load_sources(self.backbone, self.adapter_dirs)
            names = [s.name for s in sources]
            if len(set(names)) != len(names):
                for h in reversed(loaded):
                    h.remove()
                raise ComposeError(f"source names must be unique, got {names}")
            self._applied = {s.name: (s, h) for s, h in zip(sources, loaded)}
            if self.caption_stats is not None:
                self._stats = dict(zip(names, self.caption_stats))
        every = [s for s, _ in self._applied.values()]
        if names is None:
            return every
        unknown = [n for n in names if n not in self._applied]
        if unknown:
            raise ComposeError(f"unknown source {unknown[0]!r}; the adapter folders hold {', '.join(self._applied)}")
        return [self._applied[n][0] for n in names]

    def remove(self, names: Sequence[str] | None = None) -> None:
        """Take adapters off the backbone (default: every applied one)."""
        for name in list(names) if names is not None else list(self._applied)[::-1]:
            if name in self._applied:
                self._applied.pop(name)[1].remove()

    def close(self) -> None:
        self.remove()

    def __enter__(self) -> "CDMPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one call ---------------------------------------------------------------------------------

    def names(self, request: ComposeRequest) -> list[str]:
        """The sources a request composes (checked against what the pipeline holds)."""
        if self.registry is not None:
            return self.registry.resolve(request.sources, request.policy)
        if request.policy is not None or (request.sources is not None and not self.adapter_dirs):
            raise ComposeError("--sources and --policy select from a registry: pass --registry DIR")
        if not self.adapter_dirs:
            return [PLAIN]
        return [s.name for s in self.apply(request.sources)]

    def plan(self, request: ComposeRequest, *, sources: Sequence[ComposedSource] | None = None,
             estimator_hook: Callable[[WeightEstimator], WeightEstimator] | None = None) -> "ComposePlan":
        """What `request` means on this backbone and these sources, decided in order (nothing sampled yet).

        sources: already-applied sources to compose instead of resolving the request's (the server's
        worker, which keeps the applied set equal to its registry). estimator_hook: wraps the estimator the
        request names (e.g. an evaluation's watcher)."""
        if not isinstance(request, ComposeRequest):
            raise ComposeError(f"a CDMPipeline call takes a ComposeRequest, got {type(request).__name__}")
        pipe = self.backbone
        if request.caption_prior is not None and self.registry is None and self.caption_stats is None:
            raise ComposeError("--caption-prior reads each source's caption statistics from a registry: pass "
                               "--registry DIR")
        # 1. the sources: the request's selection from the registry or the adapter folders, applied
        if sources is None:
            sources = self.apply(self.names(request))
        sources = as_sources(sources)
        names = [s.name for s in sources]
        # 2. the scheduler the sampler steps (the trajectory estimators check that it is stochastic)
        scheduler = make_scheduler(pipe, request.scheduler)
        # 3. the weight estimator, with what it declares it needs (mixing prior, trained heads, scheduler)
        heads = self.registry.heads if self.registry is not None else None
        try:
            estimator, context = build_estimator(request.estimator, names, lambdas_for(request.lambdas, names),
                                                 scheduler=scheduler, heads=heads, temperature=request.temperature)
        except ComposeError:
            raise
        except ValueError as e:  # the registry's refusal (no such head, stale, unreadable)
            raise ProviderError("heads", str(e)) from e
        if estimator_hook is not None:
            estimator = estimator_hook(estimator)
        # 4. the caption prior lambda_i(c) ∝ p_i(c)^S, from the registry's caption statistics (or the folders')
        prompt_prior = None
        if request.caption_prior is not None:
            try:
                prompt_prior = self._caption_prior(names, request.prompts, request.caption_prior)
            except ComposeError:
                raise
            except ValueError as e:  # the registry's refusal (no statistics, unreadable, other vocabulary)
                raise ProviderError("caption_prior", str(e)) from e
        # 5. guidance's unconditional row: per-source for one source, the frozen backbone's for several
        uncond = request.uncond_for(len(sources))
        # 6. sparse routing after the warm-up, or dense mixing
        sparse_eps, warmup = request.sparse_settings
        # 7. the row budget must hold one image's rows (checked here: nothing has run yet)
        try:
            check_max_rows(request.max_rows, len(sources), uncond, request.guidance != 1.0)
        except RowBudgetError as e:
            raise ComposeError(str(e)) from None
        return ComposePlan(request, sources, scheduler, estimator, context, prompt_prior, uncond, sparse_eps, warmup)

    def _caption_prior(self, names: list[str], prompts: list[str], strength: float) -> torch.Tensor:
        if self.registry is not None:
            return self.registry.caption_prior(names, prompts, self.backbone.tokenizer, strength)
        from ..core.caption_prior import content_ids, prior

        missing = [n for n in names if n not in self._stats]
        if missing:
            raise ComposeError(f"caption prior: no caption statistics for {', '.join(missing)}")
        return prior([self._stats[n] for n in names], content_ids(self.backbone.tokenizer, prompts), strength=strength)

    def __call__(self, request: ComposeRequest, *, output_type: str = "pil", progress: bool = False,
                 sources: Sequence[ComposedSource] | None = None,
                 estimator_hook: Callable[[WeightEstimator], WeightEstimator] | None = None) -> ComposeResult:
        """Images, traces and credit of `request` (`plan`'s arguments), in one batched UNet pass per step."""
        return self.run(self.plan(request, sources=sources, estimator_hook=estimator_hook), output_type=output_type,
                        progress=progress)

    @torch.no_grad()
    def run(self, plan: "ComposePlan", *, output_type: str = "pil", progress: bool = False) -> ComposeResult:
        """8. The image loop of a plan: noise from CPU generators moved to the model, the sampler's steps
        (one batched UNet pass each, split by the row budget), decoding."""
        r = plan.request
        return compose_images(self.backbone, plan.sources, r.prompts, plan.estimator, steps=r.steps,
                              guidance_scale=r.guidance, seed=r.seed, batch_size=r.batch_size, scheduler=plan.scheduler,
                              uncond=plan.uncond, prompt_prior=plan.prompt_prior, sparse_eps=plan.sparse_eps,
                              warmup_frac=plan.warmup_frac, router_context=plan.router_context,
                              output_type=output_type, progress=progress, size=r.size, max_rows=r.max_rows)


@dataclass
class ComposePlan:
    """A request resolved against a pipeline: everything the image loop runs with."""

    request: ComposeRequest
    sources: list[ComposedSource]
    scheduler: object
    estimator: WeightEstimator
    router_context: bool            # the estimator's heads read the frozen encoder's caption embedding
    prompt_prior: torch.Tensor | None  # lambda(c) [N x n]
    uncond: str
    sparse_eps: float
    warmup_frac: float
