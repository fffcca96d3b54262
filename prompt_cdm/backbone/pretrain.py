"""Pretraining recipe of the tiny backbone on the shapes world (its base domain by default).

Stage 1 trains the autoencoder on renders of *every* domain (it is the frozen image codec, like
SD's VAE, and must represent what adapters will later learn). Stage 2 encodes renders of the
configured domains once, then trains the UNet and the text encoder from scratch on the cached latents
(epsilon prediction, min-SNR weighting, 10% caption dropout for classifier-free guidance, EMA).
Both stages checkpoint to safetensors and resume after a kill; batches are drawn from a
generator seeded by (seed, step), so a resumed run sees the same data as an uninterrupted one.

    prompt-cdm backbone pretrain recipes/tiny_backbone.toml [--set unet.steps=8000]
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..util import checkpoint
from ..util.io import write_json


@dataclass
class VAEStage:
    steps: int = 600  # ~30 dB PSNR on renders after a few hundred batch-32 steps
    batch_size: int = 32
    lr: float = 1e-3
    kl_weight: float = 1e-6  # SD's VAE uses a tiny KL so latents stay near-deterministic
    seed: int = 0

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("vae.steps >= 0, vae.batch_size >= 1 and vae.lr > 0 are required")


@dataclass
class UNetStage:
    steps: int = 6000
    batch_size: int = 64
    lr: float = 5e-4
    warmup: int = 200
    n_images: int = 40000  # base-domain renders encoded once
    cond_dropout: float = 0.1  # captions replaced by "" so CFG has an unconditional model
    min_snr_gamma: float = 5.0  # Hang et al. 2023: faster convergence
    ema_decay: float = 0.999
    seed: int = 0
    max_minutes: float = 0.0  # stop (with a checkpoint) after this wall time; 0 = no limit
    lr_schedule: str = "constant"  # after warmup: "constant" or "cosine" (down to min_lr_ratio * lr at `steps`)
    min_lr_ratio: float = 0.1

    def __post_init__(self):
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"unet.lr_schedule={self.lr_schedule!r}: use 'constant' or 'cosine'")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("unet.min_lr_ratio must be in [0, 1]")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError("unet.cond_dropout must be in [0, 1)")
        if self.steps < 0 or self.batch_size < 1 or self.n_images < self.batch_size:
            raise ValueError("unet.steps >= 0 and unet.n_images >= unet.batch_size are required")


@dataclass
class PretrainConfig:
    out: str = "runs/backbone"
    # the UNet stage's images: one domain, a comma-separated mixture (equal shares) or "all"
    domain: str = "base"
    # "named": the world's captions; "generic": the base vocabulary only (world.captions.describe_generic),
    # so the backbone sees new visuals without the words that name them
    captions: str = "named"
    threads: int = 0  # torch threads; 0 = torch's default
    device: str = "cpu"  # "cpu", "cuda", "cuda:N" or "auto" (cuda when one is visible)
    mixed_precision: str = "no"  # "no" or "bf16" (autocast of the UNet stage's forward pass)
    log_every: int = 1  # loss-log lines are means over this many steps (each line syncs a GPU)
    # warm start: "tiny" (the shipped weights) or a weight folder (unet/, vae/, text_encoder/); the
    # VAE stage is skipped and the UNet stage continues from those weights with a fresh optimizer
    init_from: str = ""
    checkpoint_every: int = 200
    vae: VAEStage = field(default_factory=VAEStage)
    unet: UNetStage = field(default_factory=UNetStage)

    def __post_init__(self):
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision={self.mixed_precision!r}: use 'no' or 'bf16'")
        if not (self.device in ("cpu", "cuda", "auto") or self.device.startswith("cuda:")):
            raise ValueError(f"device={self.device!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'")
        if self.log_every < 1:
            raise ValueError("log_every must be >= 1")
        from ..world.dataset import CAPTION_VOCABULARIES

        if self.captions not in CAPTION_VOCABULARIES:
            raise ValueError(f"captions={self.captions!r}: use one of {', '.join(CAPTION_VOCABULARIES)}")
        self.domains()  # unknown names fail here, before any work

    def domains(self) -> list[str]:
        """The UNet stage's domains, in order."""
        from ..world.domains import DOMAINS, get_domain

        names = list(DOMAINS) if self.domain == "all" else [d.strip() for d in self.domain.split(",") if d.strip()]
        if not names:
            raise ValueError("domain is empty: name a domain, a comma-separated list or 'all'")
        for d in names:
            get_domain(d)
        return names

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            from ..util.config import ConfigError

            raise ConfigError(f"device={self.device!r} but torch sees no CUDA device; use --set device=cpu")
        return torch.device(self.device)


def lr_at(step: int, st: UNetStage) -> float:
    """Learning rate of (0-based) `step`: linear warmup, then constant or cosine to min_lr_ratio * lr."""
    if step < st.warmup:
        return st.lr * (step + 1) / st.warmup
    if st.lr_schedule == "constant":
        return st.lr
    frac = min(1.0, (step - st.warmup) / max(1, st.steps - st.warmup))
    return st.lr * (st.min_lr_ratio + (1 - st.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def _to_tensor(images) -> torch.Tensor:
    """PIL images -> [N x 3 x 64 x 64] in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _vae_batch(step: int, cfg: VAEStage) -> torch.Tensor:
    from ..world.dataset import example, item_seed
    from ..world.domains import DOMAINS

    names = list(DOMAINS)
    rng = np.random.default_rng([cfg.seed, step])
    ims = []
    for i in range(cfg.batch_size):
        d = names[int(rng.integers(len(names)))]
        ims.append(example(d, item_seed(d, 7_000_000 + cfg.seed, step * cfg.batch_size + i)).image)
    return _to_tensor(ims)


def train_vae(cfg: PretrainConfig, pipe) -> None:
    vae, st = pipe.vae, cfg.vae
    folder = Path(cfg.out) / "vae_ckpt"
    opt = torch.optim.AdamW(vae.parameters(), lr=st.lr, weight_decay=0.0)
    start = 0
    if checkpoint.exists(folder):
        start = checkpoint.load(folder, {"vae": vae}, opt)["step"]
    vae.train().requires_grad_(True)
    log = open(Path(cfg.out) / "vae_log.jsonl", "a")
    bar = tqdm(range(start, st.steps), desc="pretrain vae", initial=start, total=st.steps)
    for step in bar:
        x = _vae_batch(step, st).to(vae.device)
        post = vae.encode(x).latent_dist
        # decode the mean: with KL weight ~1e-6, decoding samples spends hundreds of steps only
        # shrinking the initial unit posterior variance; the UNet stage trains on the means too
        rec = vae.decode(post.mode()).sample
        mse = F.mse_loss(rec, x)
        loss = mse + st.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-10))
        bar.set_postfix(psnr=f"{psnr:.1f}")
        log.write(json.dumps({"step": step + 1, "loss": loss.item(), "psnr": psnr}) + "\n")
        log.flush()
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == st.steps:
            checkpoint.save(folder, {"vae": vae}, opt, {"step": step + 1})
    vae.eval().requires_grad_(False)


# item seeds of a mixture's renders start here: apart from sources' renders (0...) and held-out ones (10M...)
MIXTURE_OFFSET = 5_000_000


def render_mixture(domains: list[str], n: int, seed: int, captions: str = "named") -> list:
    """n examples, item i from domains[i % len(domains)]; one domain with named captions is exactly
    `world.examples(domain, n, seed)` (the shipped backbone's set)."""
    from ..world.dataset import example, examples, item_seed

    if len(domains) == 1 and captions == "named":
        return examples(domains[0], n, seed=seed, progress=True)
    out = []
    for i in tqdm(range(n), desc=f"render {len(domains)} domains", unit="img"):
        d = domains[i % len(domains)]
        out.append(example(d, item_seed(d, MIXTURE_OFFSET + seed, i), captions=captions))
    return out


@torch.no_grad()
def encode_dataset(pipe, domain: str | list[str], n: int, seed: int, batch: int = 256,
                   captions: str = "named") -> tuple[torch.Tensor, list[str]]:
    """Render n examples, return ([n x 8 x 16 x 16] latent mean+logvar, captions)."""
    exs = render_mixture([domain] if isinstance(domain, str) else domain, n, seed, captions)
    moments = []
    dev = pipe.vae.device
    for i in tqdm(range(0, n, batch), desc="encode latents"):
        x = _to_tensor([e.image for e in exs[i : i + batch]]).to(dev)
        moments.append(pipe.vae.encode(x).latent_dist.parameters.float().cpu())
    return torch.cat(moments), [e.caption for e in exs]


def _cache_key(cfg: PretrainConfig) -> dict[str, str]:
    return {"domains": ",".join(cfg.domains()), "captions": cfg.captions, "n_images": str(cfg.unet.n_images),
            "seed": str(cfg.unet.seed)}


def check_latent_cache(cfg: PretrainConfig) -> None:
    """Refuse a run whose `out` holds a latent cache built from other data (before any model loads)."""
    from safetensors import safe_open

    from ..util.config import ConfigError

    path = Path(cfg.out) / "latents.safetensors"
    if not path.exists():
        return
    with safe_open(str(path), "pt") as f:
        have = f.metadata() or {}
    # caches written before these keys existed hold the base domain with named captions
    have = {**{"domains": "base", "captions": "named"}, **have}
    want = _cache_key(cfg)
    diff = [k for k in want if k in have and have[k] != want[k]]
    if diff:
        raise ConfigError(
            f"{path} was built for {', '.join(f'{k}={have[k]}' for k in diff)}, this run asks for "
            f"{', '.join(f'{k}={want[k]}' for k in diff)}; use another `out` or delete the cache"
        )


def _latent_cache(cfg: PretrainConfig, pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached (moments, token ids) of the UNet stage's training set, built once."""
    from safetensors.torch import load_file

    from ..util.io import save_safetensors

    path = Path(cfg.out) / "latents.safetensors"
    if path.exists():  # pretrain() checked that it holds this config's data
        t = load_file(str(path))
        return t["moments"], t["input_ids"]
    moments, captions = encode_dataset(pipe, cfg.domains(), cfg.unet.n_images, cfg.unet.seed, captions=cfg.captions)
    ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    save_safetensors(path, {"moments": moments, "input_ids": ids}, metadata=_cache_key(cfg))
    return moments, ids


def _sample_latents(moments: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The posterior mean (the autoencoder is trained to decode means, see train_vae)."""
    return moments.chunk(2, dim=1)[0]


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def train_unet(cfg: PretrainConfig, pipe) -> None:
    from diffusers import DDPMScheduler

    from .loading import TINY_SCHEDULER

    st = cfg.unet
    dev = cfg.torch_device()
    moments, ids = _latent_cache(cfg, pipe)
    # scale latents to unit variance, as SD does with its 0.18215
    meta_path = Path(cfg.out) / "latent_scale.json"
    if not meta_path.exists():
        lat = _sample_latents(moments[:4096], torch.Generator().manual_seed(0))
        write_json(meta_path, {"scaling_factor": float(1.0 / lat.std())})
    scale = json.loads(meta_path.read_text())["scaling_factor"]
    pipe.vae.register_to_config(scaling_factor=scale)
    moments, ids = moments.to(dev), ids.to(dev)

    unet, text = pipe.unet.to(dev), pipe.text_encoder.to(dev)
    unet.train().requires_grad_(True)
    text.train().requires_grad_(True)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=st.lr, weight_decay=1e-2)
    folder = Path(cfg.out) / "unet_ckpt"
    start = 0
    mods = {"unet": unet, "text": text, "ema_unet": ema_unet, "ema_text": ema_text}
    if checkpoint.exists(folder):
        start = checkpoint.load(folder, mods, opt)["step"]
    sched = DDPMScheduler(**TINY_SCHEDULER)
    acp = sched.alphas_cumprod.to(dev)
    snr = acp / (1 - acp)
    empty = pipe.tokenizer([""], padding="max_length", max_length=ids.shape[1], return_tensors="pt").input_ids[0]
    empty = empty.to(dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16")
    log = open(Path(cfg.out) / "unet_log.jsonl", "a")
    t0 = time.time()
    pending: list[torch.Tensor] = []
    bar = tqdm(range(start, st.steps), desc="pretrain unet", initial=start, total=st.steps)
    for step in bar:
        # batches depend only on (seed, step): a resumed run sees the data an uninterrupted one would
        gen = torch.Generator(device=dev).manual_seed(st.seed * 1_000_003 + step)
        idx = torch.randint(0, moments.shape[0], (st.batch_size,), generator=gen, device=dev)
        x0 = _sample_latents(moments[idx], gen) * scale
        noise = torch.randn(x0.shape, generator=gen, device=dev)
        t = torch.randint(0, sched.config.num_train_timesteps, (st.batch_size,), generator=gen, device=dev)
        drop = torch.rand(st.batch_size, generator=gen, device=dev) < st.cond_dropout
        tok = torch.where(drop[:, None], empty[None], ids[idx])
        xt = sched.add_noise(x0, noise, t)
        with amp:
            enc = text(tok)[0]
            pred = unet(xt, t, enc).sample
        w = torch.clamp(snr[t], max=st.min_snr_gamma) / snr[t]  # min-SNR-gamma for eps-prediction
        loss = (w * F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        lr = lr_at(step, st)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(st.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text, decay)
        pending.append(loss.detach())
        done = step + 1 == st.steps
        out_of_time = st.max_minutes > 0 and (time.time() - t0) / 60 > st.max_minutes
        if len(pending) >= cfg.log_every or done or out_of_time:
            mean = torch.stack(pending).mean().item()
            pending.clear()
            bar.set_postfix(loss=f"{mean:.4f}")
            log.write(json.dumps({"step": step + 1, "loss": mean, "lr": lr, "time": time.time()}) + "\n")
            log.flush()
        if (step + 1) % cfg.checkpoint_every == 0 or done or out_of_time:
            checkpoint.save(folder, mods, opt, {"step": step + 1})
            export_weights(cfg, pipe, ema_unet, ema_text)
        if out_of_time:
            print(f"stopped after {st.max_minutes} min at step {step + 1}; run again to resume")
            break
    unet.load_state_dict(ema_unet.state_dict())
    text.load_state_dict(ema_text.state_dict())
    unet.eval().requires_grad_(False)
    text.eval().requires_grad_(False)


def export_weights(cfg: PretrainConfig, pipe, ema_unet, ema_text) -> Path:
    """Write the EMA weights as the tiny backbone's weight folder under `out/weights`."""
    from .loading import save_tiny_weights

    shadow = copy.copy(pipe)
    shadow.unet, shadow.text_encoder = ema_unet, ema_text
    out = Path(cfg.out) / "weights"
    save_tiny_weights(shadow, out)
    return out


def pretrain(cfg: PretrainConfig):
    """Run both stages (each resumes from its checkpoint); return the trained pipeline."""
    from .loading import build_tiny

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    check_latent_cache(cfg)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    write_json(Path(cfg.out) / "config.json", __import__("prompt_cdm.util.config", fromlist=["to_dict"]).to_dict(cfg))
    pipe = build_tiny(seed=cfg.unet.seed)
    if cfg.init_from:
        _warm_start(cfg, pipe)
        pipe.vae.to(cfg.torch_device())
    else:
        pipe.vae.to(cfg.torch_device())
        train_vae(cfg, pipe)
    train_unet(cfg, pipe)
    return pipe


def _warm_start(cfg: PretrainConfig, pipe) -> None:
    """Load UNet, VAE and text encoder from `cfg.init_from` and keep the VAE's latent scale."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from .loading import TINY_DIR, BackboneError

    folder = TINY_DIR if cfg.init_from == "tiny" else Path(cfg.init_from)
    if not (folder / "unet" / "config.json").exists():
        raise BackboneError(f"init_from={cfg.init_from!r}: {folder} has no unet/config.json; "
                            "pass 'tiny' or a folder written by `backbone pretrain` (runs/backbone/weights)")
    kw = dict(torch_dtype=torch.float32, use_safetensors=True)
    pipe.unet = UNet2DConditionModel.from_pretrained(folder / "unet", **kw)
    pipe.vae = AutoencoderKL.from_pretrained(folder / "vae", **kw).eval().requires_grad_(False)
    pipe.text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", **kw)
    scale = Path(cfg.out) / "latent_scale.json"
    if not scale.exists():
        write_json(scale, {"scaling_factor": float(pipe.vae.config.scaling_factor), "init_from": str(folder)})
