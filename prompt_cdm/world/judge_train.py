"""Training recipe of the judge: renders of every domain, with corruptions like a generator's.

A judge trained on clean renders only is brittle on autoencoder outputs, so batches get small
brightness/contrast jitter, Gaussian blur and noise, and (when a backbone VAE is given) half of
them are replaced by their VAE reconstruction.

    prompt-cdm world train-judge recipes/judge.toml
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .judge import Judge, JudgeConfig, JudgeNet, attribute_accuracy, spec_targets, to_tensor


@dataclass
class JudgeTrainConfig:
    out: str = "runs/judge"
    steps: int = 2500
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0
    vae_recon: float = 0.5  # fraction of each batch replaced by VAE reconstructions (needs `vae`)
    vae: str = ""  # 'tiny', a pipeline folder or an AutoencoderKL folder whose VAE reconstructs; "" = none
    eval_per_domain: int = 300
    model: JudgeConfig = field(default_factory=JudgeConfig)

    def __post_init__(self):
        if not 0 <= self.vae_recon <= 1:
            raise ValueError("vae_recon must be in [0, 1]")


def _batch(step: int, cfg: JudgeTrainConfig):
    from .dataset import example, item_seed
    from .domains import DOMAINS

    names = list(DOMAINS)
    rng = np.random.default_rng([cfg.seed, step, 11])
    exs = []
    for i in range(cfg.batch_size):
        d = names[int(rng.integers(len(names)))]
        exs.append(example(d, item_seed(d, 5_000_000 + cfg.seed, step * cfg.batch_size + i)))
    return to_tensor([e.image for e in exs]), [e.spec for e in exs]


def corrupt(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-image brightness/contrast jitter, blur (sigma <= 1 px) and Gaussian noise."""
    n = x.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, 1, 1, 1, generator=gen)  # noqa: E731
    x = (x - x.mean(dim=(1, 2, 3), keepdim=True)) * u(0.85, 1.15) + x.mean(dim=(1, 2, 3), keepdim=True) + u(-0.08, 0.08)
    sigma = torch.rand(n, generator=gen) * 1.0
    k = torch.arange(-2, 3, dtype=torch.float32)
    ker = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    ker = ker / ker.sum(1, keepdim=True)  # [n x 5]
    blurred = []
    for i in range(n):
        kk = ker[i]
        xi = F.conv2d(F.pad(x[i : i + 1], (2, 2, 0, 0), mode="replicate"), kk.view(1, 1, 1, 5).repeat(3, 1, 1, 1), groups=3)
        xi = F.conv2d(F.pad(xi, (0, 0, 2, 2), mode="replicate"), kk.view(1, 1, 5, 1).repeat(3, 1, 1, 1), groups=3)
        blurred.append(xi)
    x = torch.cat(blurred)
    x = x + torch.randn(x.shape, generator=gen) * u(0.0, 0.06)
    return x.clamp(-1, 1)


def _loss(out: dict, tgt: dict) -> torch.Tensor:
    ce = lambda a, b: F.cross_entropy(a.reshape(-1, a.shape[-1]), b.reshape(-1), ignore_index=-100)  # noqa: E731
    return sum(ce(out[k], tgt[k]) for k in ("shape", "color", "size", "background", "style"))


def evaluate(judge: Judge, n_per_domain: int = 300, seed: int = 0, vae=None) -> dict[str, dict[str, float]]:
    """Held-out accuracy per domain and attribute (optionally on VAE reconstructions)."""
    from .dataset import examples
    from .domains import DOMAINS

    res = {}
    for d in DOMAINS:
        exs = examples(d, n_per_domain, seed=seed, heldout=True)
        x = to_tensor([e.image for e in exs])
        if vae is not None:
            with torch.no_grad():
                x = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        res[d] = attribute_accuracy([e.spec for e in exs], judge.read(x, d))
    return res


def _load_vae(name: str):
    """An AutoencoderKL from 'tiny', a pipeline folder (its vae/) or an AutoencoderKL folder."""
    if name == "tiny" or (Path(name) / "model_index.json").exists():
        from ..backbone.loading import load

        return load(name).vae
    from diffusers import AutoencoderKL

    folder = Path(name)
    folder = folder / "vae" if (folder / "vae" / "config.json").exists() else folder
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no AutoencoderKL at {name}; pass 'tiny', a pipeline folder or a VAE folder")
    return AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32, use_safetensors=True).eval()


def train_judge(cfg: JudgeTrainConfig) -> tuple[Judge, dict]:
    from ..util import checkpoint

    torch.manual_seed(cfg.seed)
    net = JudgeNet(cfg.model)
    vae = _load_vae(cfg.vae) if cfg.vae and cfg.vae_recon > 0 else None
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    folder = Path(cfg.out) / "ckpt"
    start = checkpoint.load(folder, {"judge": net}, opt)["step"] if checkpoint.exists(folder) else 0
    net.train()
    bar = tqdm(range(start, cfg.steps), desc="train judge", initial=start, total=cfg.steps)
    for step in bar:
        x, specs = _batch(step, cfg)
        gen = torch.Generator().manual_seed(cfg.seed * 7_777 + step)
        if vae is not None:
            m = int(cfg.batch_size * cfg.vae_recon)
            with torch.no_grad():
                x[:m] = vae.decode(vae.encode(x[:m]).latent_dist.sample(generator=gen)).sample.clamp(-1, 1)
        x = corrupt(x, gen)
        lr = cfg.lr * 0.5 * (1 + np.cos(np.pi * step / cfg.steps))  # cosine to zero
        for g in opt.param_groups:
            g["lr"] = lr
        loss = _loss(net(x), spec_targets(specs))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % 250 == 0 or step + 1 == cfg.steps:
            checkpoint.save(folder, {"judge": net}, opt, {"step": step + 1})
    judge = Judge(net.eval())
    report = {"renders": evaluate(judge, cfg.eval_per_domain, cfg.seed)}
    if vae is not None:
        report["vae_reconstructions"] = evaluate(judge, cfg.eval_per_domain, cfg.seed, vae=vae)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "accuracy.json").write_text(json.dumps(report, indent=2))
    return judge, report
