"""Learned routers for CDM weights: the n-way noise-aware classifier and per-source ratio heads.

`classifier` (the CDM paper, Golatkar et al. 2023, section 3): one network on (x_t, t, c) with n
outputs, trained with cross-entropy on noised latents of every source; w = softmax(logits + log lambda).
`ratio` (ours, DESIGN.md section 2): per source one head h_i(x_t, t, c), trained with the logistic
loss on that source's noised latents against a public reference set; h_i ~ log p_i / p_ref and
w = softmax(h + log lambda). The math (losses, estimators) is in `estimators`; this module holds the
networks, their training on cached latents, and the registry glue:

    cache_latents(registry, "stars", pipe, imagefolder)        caches/stars/latents.safetensors
    cache_latents(registry, None, pipe, reference_folder)      reference/latents.safetensors
    train_router(registry, "classifier", alphas_cumprod)       routers/classifier/
    train_router(registry, "ratio", alphas_cumprod)            routers/ratio-<source>/ (one per source)
    score_fn, extra = score_fn_from_registry(registry, "ratio", ["stars", "cars"])

Shapes: latents x_t [N x C x H x W] in the denoiser's (VP) space, t a scheduler timestep (scalar or
[N]), context [N x L x D] (the frozen text encoder's caption embedding, mean-pooled) or pooled [N x D].
Imports torch (+ safetensors through the registry); the pipeline is duck-typed (vae, tokenizer,
text_encoder), so no diffusers import here.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..estimators import classifier_loss, ratio_loss
from ..registry.registry import CACHES, REFERENCE, Registry, RegistryError

LATENTS, CONTEXT = "latents", "context"
CACHE_FILE = "latents.safetensors"
CAPTION_STATS = "caption_stats.json"  # caption_prior.CaptionStats of a source's captions, beside its latents


@dataclass
class RouterConfig:
    """A router network's shape (saved in router.json so the weights can be rebuilt)."""

    in_channels: int = field(default=4, metadata={"help": "latent channels"})
    # 32/64 wide: the tiny latents are 4 x 16 x 16; a head must stay far cheaper than a UNet row
    width: int = field(default=32, metadata={"help": "channels of the first conv; later layers use 2x"})
    time_dim: int = field(default=32, metadata={"help": "sinusoidal timestep embedding size"})
    context_dim: int = field(default=0, metadata={"help": "caption embedding size D (0 = no caption input)"})
    out_dim: int = field(default=1, metadata={"help": "n for the classifier, 1 for a ratio head"})
    num_train_timesteps: int = field(default=1000, metadata={"help": "t is divided by this"})

    def __post_init__(self):
        if min(self.in_channels, self.width, self.time_dim, self.out_dim) < 1 or self.context_dim < 0:
            raise ValueError(f"router config sizes must be positive, got {self}")


def timestep_embedding(t: torch.Tensor, dim: int, scale: float) -> torch.Tensor:
    """Sinusoidal embedding of t / scale * 1000 (as the UNet's), [N] -> [N x dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * (1000.0 / scale))[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.nn.functional.pad(emb, (0, dim - 2 * half))


class RouterNet(nn.Module):
    """(x_t [N x C x H x W], t, context) -> [N x out_dim]: a small conv net, timestep and pooled caption
    embeddings added before the head."""

    def __init__(self, config: RouterConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.convs = nn.Sequential(
            nn.Conv2d(config.in_channels, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),
        )
        self.time = nn.Sequential(nn.Linear(config.time_dim, 2 * w), nn.SiLU(), nn.Linear(2 * w, 2 * w))
        self.context = nn.Linear(config.context_dim, 2 * w) if config.context_dim else None
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(2 * w, 2 * w), nn.SiLU(), nn.Linear(2 * w, config.out_dim))

    def forward(self, x: torch.Tensor, t, context: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).reshape(-1)
        t = t.expand(x.shape[0]) if t.numel() == 1 else t
        h = self.convs(x).mean(dim=(2, 3))
        h = h + self.time(timestep_embedding(t, self.config.time_dim, self.config.num_train_timesteps))
        if self.context is not None:
            if context is None:
                raise ValueError("this router reads the caption: pass context [N x L x D] or [N x D]")
            c = context.mean(dim=1) if context.dim() == 3 else context
            h = h + self.context(c.to(h.dtype))
        return self.head(h)


# ---------------------------------------------------------------- cached latents


def _open(folder, name: str | None):
    """The data at `folder` through the one data-source reader (imagefolder with metadata.jsonl or .csv,
    or datasets:NAME), as training reads it; its refusals become RegistryErrors."""
    from ..data.sources import SourceError, open_source

    try:
        return open_source(folder, source_id=name or REFERENCE)
    except SourceError as e:
        raise RegistryError(str(e)) from None


@torch.no_grad()
def encode_imagefolder(pipe, folder, batch_size: int = 32, name: str | None = None) -> dict[str, torch.Tensor]:
    """A source's data (an imagefolder, or any spec `data.sources.open_source` reads) -> {latents
    [M x C x h x w] (scaled as the UNet sees them: the VAE posterior mean times scaling_factor), context
    [M x D] (mean-pooled caption embedding of the frozen text encoder)}, items in the reader's order."""
    import numpy as np

    from ..compose.text import encode_prompts
    from ..data.sources import SourceError

    source = _open(folder, name)
    lat, ctx = [], []
    for s in range(0, len(source), batch_size):
        idx = range(s, min(s + batch_size, len(source)))
        try:
            imgs = np.stack([np.asarray(source.image(i)) for i in idx])
        except SourceError as e:
            raise RegistryError(str(e)) from None
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        vae = pipe.vae
        lat.append((vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor).cpu())
        ctx.append(encode_prompts(pipe, [source.items[i].text for i in idx]).mean(dim=1).float().cpu())
    # latents in the backbone's dtype (half the bytes in fp16); the routers train on them in float32
    return {LATENTS: torch.cat(lat), CONTEXT: torch.cat(ctx)}


def cache_latents(registry: Registry, name: str | None, pipe, folder) -> str:
    """Encode `folder` and cache it for router training: as source `name`'s data (caches/NAME/, deleted
    when the source is forgotten) or, with name=None, as the public reference set (reference/)."""
    if getattr(pipe, "backbone_fingerprint", None) != registry.backbone["fingerprint"]:
        raise RegistryError("the pipeline is not the registry's backbone; load "
                            f"{registry.backbone['name']} to cache latents")
    from safetensors.torch import save_file

    rel = f"{CACHES}/{name}/{CACHE_FILE}" if name is not None else f"{REFERENCE}/{CACHE_FILE}"
    tensors = {k: v.contiguous() for k, v in encode_imagefolder(pipe, folder, name=name).items()}
    registry.save_derived(rel, lambda path: save_file(tensors, str(path)))
    if name is not None:
        cache_caption_stats(registry, name, pipe.tokenizer, folder)
    return rel


def folder_caption_stats(tokenizer, folder):
    """caption_prior.CaptionStats of a source's captions (an imagefolder's metadata `text`, read by
    `data.sources.open_source`)."""
    from ..core.caption_prior import caption_stats, content_ids

    captions = _open(folder, None).captions
    return caption_stats(content_ids(tokenizer, captions), tokenizer.vocab_size)


def cache_caption_stats(registry: Registry, name: str, tokenizer, folder) -> str:
    """caches/NAME/caption_stats.json: the token counts of source `name`'s captions (the caption prior's
    per-source model; deleted with the source)."""
    import json

    registry.source(name)
    text = json.dumps(folder_caption_stats(tokenizer, folder).to_json(), indent=2) + "\n"
    rel = f"{CACHES}/{name}/{CAPTION_STATS}"
    registry.save_derived(rel, lambda path: path.write_text(text))
    return rel


def caption_prior_from_registry(registry: Registry, names: Sequence[str], prompts: Sequence[str], tokenizer,
                                strength: float = 1.0) -> torch.Tensor:
    """lambda(c) [N x n] of `prompts` over sources `names` from their cached caption statistics."""
    import json

    from ..core.caption_prior import CaptionStats, content_ids, prior

    stats = []
    for n in names:
        path = registry.cache_dir(n) / CAPTION_STATS
        if not path.is_file():
            raise RegistryError(f"source {n!r} has no caption statistics for the caption prior; run `prompt-cdm "
                                f"router cache --registry {registry.folder} --source {n} --data IMAGEFOLDER`")
        try:
            stats.append(CaptionStats.from_json(json.loads(path.read_text())))
        except (ValueError, json.JSONDecodeError) as e:
            raise RegistryError(f"{path} is unreadable ({e}); rebuild it with `prompt-cdm router cache --registry "
                                f"{registry.folder} --source {n} --data IMAGEFOLDER`") from None
        if stats[-1].vocab_size != tokenizer.vocab_size:
            raise RegistryError(f"{path} counts a vocabulary of {stats[-1].vocab_size} tokens but the backbone's "
                                f"tokenizer has {tokenizer.vocab_size}; rebuild it with `prompt-cdm router cache`")
    return prior(stats, content_ids(tokenizer, prompts), strength=strength)


def _load_cache(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def source_cache(registry: Registry, name: str) -> dict[str, torch.Tensor]:
    path = registry.cache_dir(name) / CACHE_FILE
    if not path.is_file():
        raise RegistryError(f"no cached latents for source {name!r}; run `prompt-cdm router cache --registry "
                            f"{registry.folder} --source {name} --data IMAGEFOLDER`")
    return _load_cache(path)


def reference_cache(registry: Registry) -> dict[str, torch.Tensor]:
    path = registry.folder / REFERENCE / CACHE_FILE
    if not path.is_file():
        raise RegistryError("no reference set cached (the ratio heads' public contrast set); run "
                            f"`prompt-cdm router cache --registry {registry.folder} --reference IMAGEFOLDER`")
    return _load_cache(path)


# ---------------------------------------------------------------- training


@dataclass
class RouterTrainConfig:
    # small: the heads read 4 x 16 x 16 latents; CPU minutes, not hours
    steps: int = field(default=400, metadata={"help": "optimizer steps (per head for ratio)"})
    batch_size: int = field(default=64, metadata={"help": "noised latents per source (and reference) per step"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    use_context: bool = field(default=True, metadata={"help": "the router reads the caption embedding"})
    seed: int = field(default=0, metadata={"help": "initialisation and noise seed"})

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"router training needs steps >= 1, batch_size >= 1, lr > 0; got {self}")


def _noised(data: dict[str, torch.Tensor], abar: torch.Tensor, k: int, g: torch.Generator):
    """k random cached latents, noised at uniform random timesteps (DDPM forward process, VP space), in
    float32 on the data's device; the draws come from the CPU generator `g` (the same on every device)."""
    dev = data[LATENTS].device
    idx = torch.randint(len(data[LATENTS]), (k,), generator=g, device="cpu").to(dev)
    x0 = data[LATENTS][idx].float()
    t = torch.randint(len(abar), (k,), generator=g, device="cpu").to(dev)
    a = abar.to(dev)[t].float().view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=g, device="cpu").to(dev)
    return xt, t, data[CONTEXT][idx].float()


def _fit(net: torch.nn.Module, step_loss, cfg: RouterTrainConfig) -> dict:
    """Adam on `step_loss()` for cfg.steps steps; freezes the net; returns the training report."""
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    t0, losses = time.perf_counter(), []
    for _ in range(cfg.steps):
        loss = step_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    net.eval().requires_grad_(False)
    return {"steps": cfg.steps, "final_loss": sum(losses[-20:]) / len(losses[-20:]),
            "seconds": time.perf_counter() - t0}


def new_net(config: RouterConfig, device=None) -> RouterNet:
    """A router initialised on the CPU (the same weights whatever the device; torch's global seed), then moved."""
    with torch.device("cpu"):
        return RouterNet(config).to(device or "cpu")


def _on(data: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in data.items()}


def train_classifier(data: Sequence[dict[str, torch.Tensor]], alphas_cumprod: torch.Tensor,
                     cfg: RouterTrainConfig = RouterTrainConfig(), device=None) -> tuple[RouterNet, dict]:
    """The n-way noise-aware classifier on every source's cached latents (balanced batches, so its
    logits need no train-prior correction), trained on `device` (default CPU; the weights are initialised
    and the batches drawn on the CPU, so the run does not depend on it). Returns (net, report)."""
    device = torch.device(device or "cpu")
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    data = [_on(d, device) for d in data]
    first = data[0]
    net = new_net(RouterConfig(in_channels=first[LATENTS].shape[1], out_dim=len(data),
                               context_dim=first[CONTEXT].shape[1] if cfg.use_context else 0,
                               num_train_timesteps=len(alphas_cumprod)), device)

    def step_loss() -> torch.Tensor:
        xs, ts, cs, ys = zip(*[(*_noised(d, alphas_cumprod, cfg.batch_size, g),
                                torch.full((cfg.batch_size,), i, device=device)) for i, d in enumerate(data)])
        logits = net(torch.cat(xs), torch.cat(ts), torch.cat(cs) if cfg.use_context else None)
        return classifier_loss(logits, torch.cat(ys))

    return net, _fit(net, step_loss, cfg)


def train_ratio_head(source: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                     alphas_cumprod: torch.Tensor, cfg: RouterTrainConfig = RouterTrainConfig(),
                     device=None) -> tuple[RouterNet, dict]:
    """One source's head h(x_t, t, c) ~ log p_source / p_ref, from its latents and the reference set only
    (trained on `device`, as `train_classifier`)."""
    device = torch.device(device or "cpu")
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    source, reference = _on(source, device), _on(reference, device)
    net = new_net(RouterConfig(in_channels=source[LATENTS].shape[1], out_dim=1,
                               context_dim=source[CONTEXT].shape[1] if cfg.use_context else 0,
                               num_train_timesteps=len(alphas_cumprod)), device)

    def step_loss() -> torch.Tensor:
        xs, ts, cs = _noised(source, alphas_cumprod, cfg.batch_size, g)
        xr, tr, cr = _noised(reference, alphas_cumprod, cfg.batch_size, g)
        h = net(torch.cat([xs, xr]), torch.cat([ts, tr]), torch.cat([cs, cr]) if cfg.use_context else None)[:, 0]
        return ratio_loss(h[: cfg.batch_size], h[cfg.batch_size:])

    return net, _fit(net, step_loss, cfg)


def train_router(registry: Registry, kind: str, alphas_cumprod: torch.Tensor, cfg: RouterTrainConfig = RouterTrainConfig(),
                 sources: Sequence[str] | None = None, device=None) -> dict[str, dict]:
    """Train and store routers from the registry's cached latents -> {artifact: report}, on `device`
    (default CPU; the stored weights are float32 CPU tensors either way).

    classifier: one artifact `classifier` that has seen every source in `sources` (default: all).
    ratio: one artifact `ratio-NAME` per source, each having seen only that source (+ the reference)."""
    names = registry.resolve(sources)
    out = {}
    if kind == "classifier":
        if len(names) < 2:
            raise RegistryError("a classifier router needs at least two sources")
        net, rep = train_classifier([source_cache(registry, n) for n in names], alphas_cumprod, cfg, device)
        registry.add_router("classifier", "classifier", _cpu_state(net), names,
                            {"net": asdict(net.config), "train": asdict(cfg), "report": rep})
        out["classifier"] = rep
    elif kind == "ratio":
        ref = reference_cache(registry)
        for n in names:
            net, rep = train_ratio_head(source_cache(registry, n), ref, alphas_cumprod, cfg, device)
            registry.add_router(f"ratio-{n}", "ratio", _cpu_state(net), [n],
                                {"net": asdict(net.config), "train": asdict(cfg), "report": rep})
            out[f"ratio-{n}"] = rep
    else:
        raise RegistryError(f"router kind must be 'classifier' or 'ratio', got {kind!r}")
    return out


def _cpu_state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu() for k, v in net.state_dict().items()}


# ---------------------------------------------------------------- inference


def load_net(registry: Registry, artifact: str) -> tuple[RouterNet, dict]:
    meta, tensors = registry.load_router(artifact)
    net = new_net(RouterConfig(**meta["config"]["net"]))
    net.load_state_dict(tensors)
    return net.eval().requires_grad_(False), meta


def score_fn_from_registry(registry: Registry, kind: str, names: Sequence[str]):
    """The trained router for sources `names` as `score_fn(x, t, context=None) -> [N x n]` (+ extra
    estimator kwargs). The classifier's logits are restricted to `names` (a softmax over a subset is
    the posterior given that subset); ratio heads are stacked."""
    names = list(names)
    if kind == "classifier":
        net, meta = load_net(registry, "classifier")
        seen = meta["sources_seen"]
        missing = [n for n in names if n not in seen]
        if missing:
            raise RegistryError(f"the classifier router has not seen {', '.join(missing)}; retrain it with "
                                "`prompt-cdm router train --kind classifier`")
        cols = [seen.index(n) for n in names]

        def score(x, t, context=None, **_):  # the router follows the latents to their device, in float32
            return net.to(x.device)(x.float(), t, context)[:, cols]

        return score, {}
    if kind == "ratio":
        heads = [load_net(registry, f"ratio-{n}")[0] for n in names]

        def score(x, t, context=None, **_):
            return torch.cat([h.to(x.device)(x.float(), t, context) for h in heads], dim=1)

        return score, {}
    raise RegistryError(f"router kind must be 'classifier' or 'ratio', got {kind!r}")
