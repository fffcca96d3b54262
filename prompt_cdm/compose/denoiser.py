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
a deep-prompt source's rows attend to its tokens in every cross-attention layer and every other row to
none (`deep_prompt.route_rows`); a soft-prompt source differs only in its rows' text embedding (its
placeholder prefixes the caption). Each kind on the UNet routes the rows of a pass (`AdapterKind.route`),
so LoRA, deep-prompt and soft-prompt sources mix in one batch. Sparse routing (`sparse_eps > 0`) drops a
source's rows once its weight falls below eps after the warm-up, so rows per step fall from
N (n + 1) towards 2N. Per-step weights leave through `callback(step, t, MixOutput)` (e.g. an
`attribution.TraceRecorder`). The weights come from any estimator (`estimators.get_estimator`).

Shapes: x [N x C x H x W] the latents the sampler hands the denoiser; eps_rows [n x N x C x H x W];
weights / active [N x n]; text embeddings [N x L x D].
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..adapters.kinds import KINDS as ADAPTER_KINDS
from ..adapters.kinds import get_kind
from ..adapters.lora import BASE, lora_layers
from ..adapters.lora import route_rows as _route_rows
from ..estimators import MixOutput, WeightEstimator, mix_step
from ..core.mixing import guided_rows, normalize, prior_logits
from ..core.sigmas import step_sigmas
from .request import UNCOND_MODES, ComposeError
from .rows import RowBudgetError, auto_max_rows, check_max_rows

# "plain": the backbone as it stands, nothing routed (an adapter merged into it or active on it applies to
# every row) -- composed alone it is plain text-to-image, the n = 1 case of the one loop
KINDS = (*ADAPTER_KINDS, "plain")
PLAIN = "backbone"  # the trace name of the plain backbone as a source


@dataclass(frozen=True)
class ComposedSource:
    """One composed source: its id, adapter kind and its handle on the pipeline.

    handle: the peft adapter name of a LoRA, the placeholder of a soft prompt, the bank name of a deep prompt.
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
    def plain(cls) -> "ComposedSource":
        """The backbone as it stands: composing it alone is plain text-to-image."""
        return cls(PLAIN, "plain", BASE)

    @classmethod
    def from_adapter(cls, loaded) -> "ComposedSource":
        """From a `store.LoadedAdapter` (what `load_adapter` returns)."""
        text = get_kind(loaded.kind).text_adapter(loaded.name, loaded.config.params) != BASE
        return cls(loaded.config.source_id, loaded.kind, loaded.name, text)

    def prompt(self, caption: str) -> str:
        """The conditional prompt: a soft prompt's placeholder prefixes the caption; a LoRA keeps it."""
        return caption if self.kind == "plain" else get_kind(self.kind).row_prompt(self.handle, caption)

    @property
    def unet_adapter(self) -> str:
        return BASE if self.kind == "plain" else get_kind(self.kind).unet_adapter(self.handle)

    @property
    def text_adapter(self) -> str:
        return self.handle if self.text_lora else BASE


def as_sources(sources: Sequence) -> list[ComposedSource]:
    """Sources or LoadedAdapters -> [ComposedSource]; names must be unique."""
    out = [s if isinstance(s, ComposedSource) else ComposedSource.from_adapter(s) for s in sources]
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


def _check_finite(out: torch.Tensor, sources, idx_i: torch.Tensor, step: int) -> None:
    """ComposeError naming the sources whose UNet rows came out NaN or infinite (an adapter that blows up the
    backbone would otherwise turn the whole composition into a black image). `out` [rows x C x H x W]: its
    last len(idx_i) rows are the conditional rows of sources idx_i."""
    bad = ~torch.isfinite(out.flatten(1)).all(dim=1)
    if not bad.any():
        return
    m = len(idx_i)
    names = sorted({sources[i].name for i, b in zip(idx_i.tolist(), bad[-m:].tolist()) if b}) if m else []
    who = f"source(s) {', '.join(names)}" if names else "the unconditional row"
    raise ComposeError(f"step {step}: the UNet output of {who} is NaN or infinite; that adapter is unusable "
                       "(remove it from the composition, or forget and retrain it)")


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
    classifier/ratio heads). max_rows: UNet rows per pass (`rows.py`; None: automatic -- unlimited on
    the CPU, what free memory holds on CUDA); the rows of one step are split into passes of at most that
    many, which changes nothing but memory. Call `reset()` before reusing it for a new trajectory.
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
    max_rows: int | None = None
    last: StepRecord | None = field(default=None, init=False, repr=False)
    rows_per_step: list[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        self.sources = as_sources(self.sources)
        if any(src.kind == "plain" for src in self.sources) and len(self.sources) > 1:
            raise ComposeError("the plain backbone is composed alone (its rows are not routed)")
        self._plain = self.sources[0].kind == "plain"
        self.prompts = list(self.prompts)
        if not self.prompts:
            raise ComposeError("compose needs at least one prompt")
        if self.uncond not in UNCOND_MODES:
            raise ComposeError(f"uncond must be one of {UNCOND_MODES}, got {self.uncond!r}")
        if not isinstance(self.estimator, WeightEstimator):
            raise ComposeError(f"estimator must be a WeightEstimator, got {type(self.estimator).__name__}")
        try:
            check_max_rows(self.max_rows, len(self.sources), self.uncond, self.guidance_scale != 1.0)
        except RowBudgetError as e:
            raise ComposeError(str(e)) from None
        self._budget = self.max_rows
        if self.sparse_eps < 0 or not 0.0 <= self.warmup_frac <= 1.0:
            raise ComposeError(f"need sparse_eps >= 0 and warmup_frac in [0, 1], got {self.sparse_eps}, "
                               f"{self.warmup_frac}")
        n, N = len(self.sources), len(self.prompts)
        dev = self.device
        try:
            allowed = torch.ones(n, dtype=torch.bool, device=dev) if self.allowed is None else self.allowed
            # validates shape and non-empty rows
            self._allowed = normalize(torch.ones(N, n, device=dev), torch.as_tensor(allowed, device=dev)) > 0
            self._prior = None
            if self.prompt_prior is not None:
                prior = prior_logits(torch.as_tensor(self.prompt_prior, device=dev))
                self._prior = torch.broadcast_to(prior, (N, n)).clone()
        except ValueError as e:
            raise ComposeError(str(e)) from None
        self._encode()
        self.reset()

    @property
    def n(self) -> int:
        return len(self.sources)

    @property
    def device(self) -> torch.device:
        """The UNet's device: every tensor of the composition lives there."""
        return self.pipe.unet.device

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
        rows = prompts + [self.negative_prompt] * len(text_names) + ctx
        if self._plain:  # the text encoder as it stands, as for the UNet
            from .text import encode_prompts

            emb = encode_prompts(self.pipe, rows)
        else:
            emb = encode_rows(self.pipe, rows, names + text_names + [BASE] * len(ctx))
        self._cond = emb[: len(prompts)].reshape(len(S), N, *emb.shape[1:])          # [n x N x L x D]
        unc = dict(zip(text_names, emb[len(prompts): len(prompts) + len(text_names)]))
        self._uncond_shared = unc[BASE]                                             # [L x D]
        self._uncond_source = torch.stack([unc[s.text_adapter] for s in S])         # [n x L x D]
        self._context = emb[len(prompts) + len(text_names):] if ctx else None      # [N x L x D]

    def reset(self) -> None:
        """Start a new trajectory (same prompts and sources)."""
        self.estimator.reset(self.n, self.batch, self.device)
        if self._prior is not None:  # lambda_i(c) ∝ lambda_i p_i(c): add the logs, renormalise
            lp = self.estimator.log_prior.to(self._prior.dtype) + self._prior
            if not bool(torch.isfinite(lp.max(dim=-1).values).all()):
                raise ComposeError("the prompt prior and the mixing prior leave an image with no source")
            self.estimator.log_prior = torch.log_softmax(lp, dim=-1)
        self._step = 0
        self._active = self._allowed.clone()
        self.last = None
        self._observed = False
        self.rows_per_step = []

    # -- one step ---------------------------------------------------------------------------------

    def _rows(self, x: torch.Tensor, active: torch.Tensor, guided: bool):
        """Stack the batch: (latents [R x ...], embeddings [R x L x D], owners [R]: the source index of each
        row, -1 for the frozen backbone's shared unconditional row) and where each block of rows goes back."""
        N = self.batch
        pairs = active.t().nonzero().tolist()  # [(source i, image j)], grouped by source
        idx_i = torch.tensor([p[0] for p in pairs], dtype=torch.long, device=x.device)
        idx_j = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=x.device)
        xs, embs, owners = [], [], []
        if guided and self.uncond == "shared":
            xs.append(x)
            embs.append(self._uncond_shared.expand(N, -1, -1))
            owners += [-1] * N
        elif guided:
            xs.append(x[idx_j])
            embs.append(self._uncond_source[idx_i])
            owners += [i for i, _ in pairs]
        xs.append(x[idx_j])
        embs.append(self._cond[idx_i, idx_j])
        owners += [i for i, _ in pairs]
        return torch.cat(xs), torch.cat(embs).to(x.dtype), owners, idx_i, idx_j

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        if x.shape[0] != self.batch:
            raise ComposeError(f"x has {x.shape[0]} images for {self.batch} prompts")
        step, n_steps = self._step, len(self.scheduler.timesteps)
        if step >= n_steps:
            raise ComposeError(f"step {step} past the scheduler's {n_steps} timesteps; call reset() "
                               "before a new trajectory")
        est = self.estimator
        if self.last is not None and not self._observed:
            raise ComposeError("the sampler did not report its last step: pass the denoiser's `on_step` as the "
                               "sampling loop's callback (sampling.sample(..., callback=denoiser.on_step))")
        sigma, sigma_next = step_sigmas(self.scheduler, step)
        est.set_state(step, n_steps, t, sigma, sigma_next)

        guided = self.guidance_scale != 1.0  # g == 1 needs no unconditional rows
        active = self._active.to(x.device)
        xs, embs, owners, idx_i, idx_j = self._rows(x, active, guided)
        out = self._unet(xs, t, embs, owners)

        n, N, m = self.n, self.batch, len(idx_i)
        _check_finite(out, self.sources, idx_i, step)
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
        self.last = StepRecord(x, eps_u, eps_rows, active, mixed, len(owners))
        self._observed = False
        self.rows_per_step.append(len(owners))
        self._active = mixed.active
        self._step += 1
        if not torch.isfinite(mixed.eps).all():
            raise ComposeError(f"step {step}: the composed noise prediction is NaN or infinite (guidance "
                               f"{self.guidance_scale:g}); lower the guidance or check the sources' adapters")
        if self.callback is not None:
            self.callback(step, t, mixed)
        return mixed.eps

    def _routing(self, owners: list[int]) -> ExitStack:
        """The routing of one pass: every adapter kind on the UNet routes these rows (row k: source owners[k],
        -1 = the frozen backbone) -- LoRA rows through their peft adapter, deep-prompt rows through their
        tokens, every other row through none of that kind."""
        stack = ExitStack()
        if self._plain:
            return stack
        unet = self.pipe.unet
        for kind in ADAPTER_KINDS.values():
            handles = [self.sources[o].unet_adapter if o >= 0 and self.sources[o].kind == kind.name else BASE
                       for o in owners]
            ctx = kind.route(unet, handles, ComposeError)
            if ctx is not None:
                stack.enter_context(ctx)
        return stack

    def _unet(self, xs: torch.Tensor, t, embs: torch.Tensor, owners: list[int]) -> torch.Tensor:
        """The UNet on the stacked rows, each routed to its adapter, in passes of at most the row budget."""
        unet = self.pipe.unet
        if self._budget is None and xs.device.type == "cuda":
            self._budget = auto_max_rows(unet, xs[:1], t, embs[:1])
        step = self._budget or len(owners)
        outs = []
        for s in range(0, len(owners), step):
            x, e = xs[s: s + step], embs[s: s + step]
            with self._routing(owners[s: s + step]):  # the pass's slice of rows
                outs.append(unet(x, t, encoder_hidden_states=e).sample)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def on_step(self, step: int, t, x_next: torch.Tensor) -> None:
        """The sampling loop's callback after step `step` took the latents to `x_next`.

        The trajectory estimators (ito, path) integrate the step last.x -> x_{k+1}, both in the denoiser's
        input space (`scale_model_input` at the next timestep, what the loop hands the denoiser next),
        with the sigmas of that step still set. After the last step nothing reads it."""
        self._observed = True
        ts = self.scheduler.timesteps
        if self.last is None or step + 1 >= len(ts):
            return
        x_in = self.scheduler.scale_model_input(x_next, ts[step + 1])
        rows = self.last.eps_rows
        if getattr(self.estimator, "observes_guided", False):  # the kernel each source's own sampler steps with
            rows = guided_rows(self.last.eps_uncond, rows, self.guidance_scale)
        self.estimator.observe(self.last.x, x_in, rows, active=self.last.computed)
