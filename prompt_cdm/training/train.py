"""One source's adapter (soft prompt, LoRA or deep prompt) trained on the frozen backbone; resumable and deterministic.

    prompt-cdm train --backbone tiny --source data/stars --kind lora --out adapters/stars
    prompt-cdm train --backbone tiny --source data/a --source data/b --out adapters/paragon   # the paragon
    prompt-cdm train-all --backbone tiny --world-domains all --kind soft-prompt --out runs/cdm

The backbone is frozen, so every image is encoded by the VAE once (the posterior mean x the
scaling factor, [N x 4 x h x w]) and every caption by the text encoder once ([N x 77 x D] hidden
states) before the first step; steps then train on that cache. A soft prompt changes what the text
encoder sees, so for it (and for a LoRA on the text encoder) the cache holds token ids [N x 77] and
the text encoder runs every step. The loss is the standard epsilon- (or v-) prediction MSE on
randomly noised latents (DDPM, Ho et al. 2020) with min-SNR-gamma weighting (Hang et al. 2023), as
the tiny backbone was pretrained.

Determinism: step s draws its batch from a per-epoch permutation seeded by (seed, epoch) and its
noise, timesteps and caption-dropout coins from a generator seeded by (seed, s), so a run resumed
from a checkpoint (adapter weights + optimizer state, safetensors only) ends with the same weights
as one never interrupted. The run's files live beside the adapter folder in `<out>.train/` (cache,
checkpoint, loss log) and are deleted once the adapter folder is written: deleting the adapter folder
then deletes everything derived from the source's data (forgetting stays exact).

Caption dropout defaults to 0: the composition's classifier-free guidance uses the frozen
backbone's unconditional row (DESIGN.md section 2), so an adapter's own unconditional prediction is
never used by default. Set `caption_dropout = 0.1` for the per-source-unconditional comparison: a
dropped LoRA or deep-prompt caption becomes "" (a deep prompt keeps its tokens: the source's prompts on the
empty caption), a dropped soft-prompt caption becomes the bare placeholder.
No horizontal flips: captions say "left" and "right".
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..util import checkpoint
from ..util.config import to_dict
from ..util.io import atomic_path, write_json, write_jsonl
from ..data.sources import DataSource, SourceError

WORK_SUFFIX = ".train"
LOG_NAME = "train_log.jsonl"
CURVE_NAME = "loss_curve.png"
# fields that do not change the weights a run produces: a run may resume with other values
_SCHEDULE_ONLY = ("steps", "checkpoint_every", "n_samples", "sample_prompts", "sample_steps", "guidance_scale",
                  "threads", "gradient_checkpointing", "device")


class TrainError(ValueError):
    """A training run cannot start or resume; the message says why and the fix."""


# ---------------------------------------------------------------- config


@dataclass
class LoraTrain:
    """LoRA hyper-parameters (the adapter's, plus its optimizer's)."""

    rank: int = field(default=4, metadata={"help": "LoRA rank r"})  # the tiny UNet's attention is 64-128 wide
    alpha: float = field(default=4.0, metadata={"help": "update scale alpha / rank"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})  # diffusers' LoRA examples: 1e-4..1e-3
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})  # diffusers' default
    text_encoder: bool = field(default=False, metadata={"help": "also adapt the text encoder (no text cache then)"})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"lora.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"lora.weight_decay must be >= 0, got {self.weight_decay}")
        self.adapter_config()  # validates rank/alpha/dropout

    def adapter_config(self):
        from ..adapters.lora import LoraAdapterConfig

        return LoraAdapterConfig(rank=self.rank, alpha=self.alpha, text_encoder=self.text_encoder,
                                 dropout=self.dropout)


@dataclass
class SoftPromptTrain:
    """Soft-prompt hyper-parameters. Weight decay is always 0: AdamW's decay would move the frozen rows."""

    # 4 vectors: room for a domain's look while leaving 73 of CLIP's 77 positions to the caption
    num_vectors: int = field(default=4, metadata={"help": "learned embedding rows behind the placeholder"})
    init_word: str = field(default="",
                           metadata={"help": "one-token word whose embedding starts every row; '' = random"})
    lr: float = field(default=5e-3, metadata={"help": "AdamW learning rate"})  # embeddings need a larger step than LoRA
    placeholder: str = field(default="", metadata={"help": "the trigger word; '' = <cdm-SOURCE_ID>"})

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"soft_prompt.lr must be > 0, got {self.lr}")
        self.adapter_config("source")  # validates num_vectors/init_word/placeholder

    def adapter_config(self, source_id: str):
        from ..adapters.soft_prompt import SoftPromptConfig

        return SoftPromptConfig(placeholder=self.placeholder or f"<cdm-{source_id.lower()}>",
                                num_vectors=self.num_vectors, init_word=self.init_word)


@dataclass
class DeepPromptTrain:
    """Deep-prompt hyper-parameters (adapters.deep_prompt): m tokens per cross-attention layer of the UNet."""

    # 16: on the validation domain (checkered, 30 held-out captions) TIFA / FID 0.583 / 380 at 8 tokens, 0.693 / 245
    # at 16, 0.670 / 276 at 24 (docs/results.md, "Deep prompts")
    num_tokens: int = field(default=16, metadata={"help": "learned tokens per cross-attention layer"})
    # kv: on the validation domain (checkered) its loss fell 0.63 -> 0.36 in 200 steps, context's 0.70 -> 0.64 in
    # 400 (docs/results.md, "Deep prompts"); context stays an option
    mode: str = field(default="kv", metadata={"help": "kv (learned key/value prefixes) | context (through W_k, W_v)"})
    timestep_buckets: int = field(default=1, metadata={"help": "prompts per timestep range (1 = one for all t)"})
    lr: float = field(default=2e-2, metadata={"help": "AdamW learning rate"})  # the kv run of that comparison
    # no decay: the tokens start at the frozen encoder's states, decay would pull them towards 0 (off-distribution)
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"deep_prompt.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"deep_prompt.weight_decay must be >= 0, got {self.weight_decay}")
        self.adapter_config()  # validates num_tokens/mode/timestep_buckets

    def adapter_config(self):
        from ..adapters.deep_prompt import DeepPromptConfig

        return DeepPromptConfig(num_tokens=self.num_tokens, mode=self.mode, timestep_buckets=self.timestep_buckets)


@dataclass
class TrainConfig:
    """One adapter's training run. Defaults = recipes/adapter_train.toml (a few minutes per source on 2 cores)."""

    kind: str = field(default="lora", metadata={"help": "adapter kind (adapters.kinds.KINDS): lora | soft-prompt | deep-prompt"})
    steps: int = field(default=600, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "images per step"})
    seed: int = field(default=0, metadata={"help": "seeds init, batches, noise, timesteps"})
    resolution: int = field(default=0, metadata={"help": "image side fed to the VAE; 0 = the backbone's native size"})
    caption_dropout: float = field(default=0.0, metadata={"help": "probability a caption is dropped (see module doc)"})
    min_snr_gamma: float = field(default=5.0, metadata={"help": "min-SNR loss weighting gamma; 0 = plain MSE"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping; 0 = none"})
    mixed_precision: str = field(default="no", metadata={"help": "accelerate mixed precision: no | fp16 | bf16"})
    checkpoint_every: int = field(default=100, metadata={"help": "steps between checkpoints"})
    n_samples: int = field(default=8, metadata={"help": "sample-grid captions (spread over the source); 0 = none"})
    sample_prompts: tuple[str, ...] = field(default=(),
                                            metadata={"help": "sample-grid captions instead of the source's"})
    sample_steps: int = field(default=25, metadata={"help": "sampler steps of the sample grid"})
    guidance_scale: float = field(default=5.0, metadata={"help": "CFG scale of the sample grid"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0 = leave as is"})
    # where the frozen backbone runs (backbone.placement); the dtype of its frozen weights changes the result
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N | mps"})
    dtype: str = field(default="auto", metadata={"help": "frozen backbone's dtype: auto | fp32 | fp16 | bf16"})
    # recomputes the UNet's activations in the backward pass: ~30% slower, a fraction of the memory at 512 px
    gradient_checkpointing: bool = field(default=False, metadata={"help": "UNet gradient checkpointing"})
    lora: LoraTrain = field(default_factory=LoraTrain)
    soft_prompt: SoftPromptTrain = field(default_factory=SoftPromptTrain)
    deep_prompt: DeepPromptTrain = field(default_factory=DeepPromptTrain)

    def __post_init__(self):
        self.sample_prompts = tuple(self.sample_prompts)
        if isinstance(self.lora, dict):
            self.lora = LoraTrain(**self.lora)
        if isinstance(self.soft_prompt, dict):
            self.soft_prompt = SoftPromptTrain(**self.soft_prompt)
        if isinstance(self.deep_prompt, dict):
            self.deep_prompt = DeepPromptTrain(**self.deep_prompt)
        from ..adapters.kinds import KINDS

        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {self.kind!r}")
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.resolution >= 0 and self.resolution % 8 == 0,
             f"resolution must be 0 or a multiple of 8, got {self.resolution}"),
            (0.0 <= self.caption_dropout < 1.0, f"caption_dropout must be in [0, 1), got {self.caption_dropout}"),
            (self.min_snr_gamma >= 0, f"min_snr_gamma must be >= 0, got {self.min_snr_gamma}"),
            (self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {self.max_grad_norm}"),
            (self.mixed_precision in ("no", "fp16", "bf16"),
             f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}"),
            (self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}"),
            (self.n_samples >= 0, f"n_samples must be >= 0, got {self.n_samples}"),
            (self.sample_steps >= 1, f"sample_steps must be >= 1, got {self.sample_steps}"),
            (self.guidance_scale >= 1.0, f"guidance_scale must be >= 1, got {self.guidance_scale}"),
            (self.threads >= 0, f"threads must be >= 0, got {self.threads}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        from ..backbone.placement import Placement

        Placement(self.device, self.dtype)  # the names; whether the device is there is checked at load

    @property
    def section_name(self) -> str:
        """The field holding the hyper-parameters of this run's kind ("lora", "soft_prompt")."""
        from ..adapters.kinds import get_kind

        return get_kind(self.kind).train_section

    @property
    def section(self):
        return getattr(self, self.section_name)

    @property
    def lr(self) -> float:
        return self.section.lr

    def caches_text(self) -> bool:
        """True when the text encoder is frozen for this run, so caption hidden states can be cached."""
        from ..adapters.kinds import get_kind

        return get_kind(self.kind).caches_text(self.section)

    def as_dict(self) -> dict:
        """The config as data, with only this run's kind's section."""
        from ..adapters.kinds import KINDS

        d = to_dict(self)
        for k in KINDS.values():
            if k.name != self.kind:
                d.pop(k.train_section, None)
        return d

    def identity(self) -> dict:
        """The fields that determine the weights (a checkpoint resumes only under the same identity)."""
        d = self.as_dict()
        for k in _SCHEDULE_ONLY:
            d.pop(k)
        return d


# ---------------------------------------------------------------- determinism


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of step `step`'s noise, timesteps and dropout coins: seeded by (seed, step) only."""
    return torch.Generator().manual_seed(_seed("step", seed, step))


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(_seed("epoch", seed, epoch)), device="cpu")


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """[batch_size] item indices of step `step`: consecutive slices of per-epoch permutations, so every
    item is seen once per epoch, and a function of (n, batch_size, seed, step) alone."""
    out: list[int] = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, i = divmod(pos, n)
        take = min(batch_size - len(out), n - i)
        out += _permutation(n, seed, epoch)[i : i + take].tolist()
        pos += take
    return torch.tensor(out, dtype=torch.long, device="cpu")


# ---------------------------------------------------------------- folders


def work_dir(out: str | os.PathLike) -> Path:
    """`<out>.train/`: cache, checkpoint and loss log of an unfinished run (deleted when it finishes)."""
    out = Path(out)
    return out.with_name(out.name + WORK_SUFFIX)


def is_complete(out: str | os.PathLike) -> bool:
    """An adapter folder is complete once save_adapter has renamed it into place (it has its config)."""
    from ..adapters.store import CONFIG_NAME

    return (Path(out) / CONFIG_NAME).is_file()


@dataclass
class TrainResult:
    folder: str
    source_id: str
    data_hash: str
    steps: int
    final_loss: float | None
    steps_per_s: float | None
    wall_s: float | None
    skipped: bool = False


# ---------------------------------------------------------------- the cache


def _images_tensor(images, resolution: int) -> torch.Tensor:
    """PIL images -> [N x 3 x R x R] in [-1, 1] (center crop to square, bicubic resize)."""
    import numpy as np
    from PIL import Image, ImageOps

    arrs = []
    for im in images:
        if im.size != (resolution, resolution):
            im = ImageOps.fit(im, (resolution, resolution), Image.Resampling.BICUBIC)
        arrs.append(np.asarray(im, dtype=np.float32))
    return torch.from_numpy(np.stack(arrs) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


def _no_bar(progress: bool | None) -> bool | None:
    """tqdm's `disable`: None = show on a terminal only."""
    return None if progress is None else not progress


def native_resolution(pipe) -> int:
    return pipe.unet.config.sample_size * (2 ** (len(pipe.vae.config.block_out_channels) - 1))


# images per VAE-encoder call: 16 at the tiny backbone's 64 px, 4 at 128 px, 1 at SD's 512 px -- the encoder's
# activations at 512 px are ~0.5 GB per image in float32, and the cache build must not outgrow the training loop
ENCODE_PIXELS = 16 * 64 * 64


@torch.no_grad()
def encode_latents(pipe, source: DataSource, resolution: int, batch: int | None = None,
                   progress: bool | None = None) -> torch.Tensor:
    """[N x C x h x w] scaled VAE posterior means of every item (the backbone's training input), in the
    VAE's dtype (an fp16 backbone caches half the bytes)."""
    from tqdm.auto import tqdm

    batch = batch or max(1, ENCODE_PIXELS // (resolution * resolution))
    vae, out = pipe.vae, []
    device, dtype = vae.device, vae.dtype
    for s in tqdm(range(0, len(source), batch), desc=f"encode {source.id}", disable=_no_bar(progress)):
        x = _images_tensor([source.image(i) for i in range(s, min(s + batch, len(source)))], resolution)
        # the mean, not a sample: the tiny VAE is trained to decode means (pretrain.py), SD's posterior std is ~0.
        # contiguous: the VAE hands back channels-last means, and the UNet's convolutions round differently on
        # them (a resumed run reads the cache file, so the first run must train on the same layout)
        z = vae.encode(x.to(device, dtype)).latent_dist.mode().cpu() * vae.config.scaling_factor
        out.append(z.contiguous())
    return torch.cat(out)


def _token_ids(pipe, prompts: list[str]) -> torch.Tensor:
    from ..adapters.soft_prompt import expand_prompts

    tok = pipe.tokenizer
    ids = tok(expand_prompts(tok, prompts), padding="max_length", max_length=tok.model_max_length,
              truncation=True).input_ids
    return torch.tensor(ids, dtype=torch.long, device="cpu")


@torch.no_grad()
def _text_states(pipe, prompts: list[str], batch: int = 64) -> torch.Tensor:
    from ..compose.text import encode_prompts

    return torch.cat([encode_prompts(pipe, prompts[s : s + batch]).cpu() for s in range(0, len(prompts), batch)])


def build_cache(pipe, source: DataSource, cfg: TrainConfig, prompt: Callable[[str], str], uncond: str,
                progress: bool | None = None) -> dict[str, torch.Tensor]:
    """{"latents": [N x C x h x w], "text": [N x 77 x D] | "ids": [N x 77], "uncond_text" | "uncond_ids"}."""
    res = cfg.resolution or native_resolution(pipe)
    cache = {"latents": encode_latents(pipe, source, res, progress=progress)}
    prompts = [prompt(c) for c in source.captions]
    if cfg.caches_text():
        cache["text"], cache["uncond_text"] = _text_states(pipe, prompts), _text_states(pipe, [uncond])
    else:
        cache["ids"], cache["uncond_ids"] = _token_ids(pipe, prompts), _token_ids(pipe, [uncond])
    return cache


# ---------------------------------------------------------------- the run


class _Run:
    """The adapter being trained on `pipe` (its kind's `Training` hooks); the pipeline gets it back bare."""

    def __init__(self, pipe, cfg: TrainConfig, source_id: str):
        from ..adapters.errors import AdapterError
        from ..adapters.kinds import get_kind

        self.pipe = pipe
        gen = torch.Generator().manual_seed(_seed("init", cfg.seed))
        try:
            self.training = get_kind(cfg.kind).start_training(pipe, cfg.section, source_id, gen)
        except AdapterError as e:
            raise TrainError(str(e)) from None
        t = self.training
        self.name, self.params, self.prompt, self.uncond = t.name, t.params, t.prompt, t.uncond
        self.holder = torch.nn.ParameterDict(self.params)  # what a checkpoint saves: the adapter only
        try:
            self._check_only_adapter_trains()
        except BaseException:
            self.close()
            raise

    def _check_only_adapter_trains(self) -> None:
        ours = {id(p) for p in self.params.values()}
        for c in ("unet", "vae", "text_encoder"):
            for n, p in getattr(self.pipe, c).named_parameters():
                if p.requires_grad and id(p) not in ours:
                    raise TrainError(f"{c}.{n} would train but is not part of the adapter; "
                                     "pass a frozen backbone (prompt_cdm.backbone.load)")

    def train_mode(self, on: bool) -> None:
        self.training.train_mode(on)

    def read_back(self):
        return self.training.read_back()

    def close(self) -> None:
        """Take the adapter off the pipeline; the frozen backbone is exactly as before."""
        self.training.close()


def _check_start(pipe, out: Path, overwrite: bool) -> None:
    from ..adapters.store import _has_adapters

    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file; pass a folder for the adapter")
    if is_complete(out) and not overwrite:
        raise TrainError(f"{out} already holds a trained adapter; pass --overwrite to retrain it or delete the folder")
    if out.is_dir() and any(out.iterdir()) and not is_complete(out) and not overwrite:
        raise TrainError(f"{out} exists and is not an adapter folder; pick an empty or new --out folder")
    if _has_adapters(pipe):
        raise TrainError("the pipeline already carries adapters; train on the bare frozen backbone "
                         "(prompt_cdm.backbone.load)")


def _open_work(work: Path, run_info: dict, overwrite: bool) -> None:
    """Start `work` (writing run.json) or check that it belongs to the same run; never mix runs."""
    if overwrite and work.exists():
        shutil.rmtree(work)
    info_path = work / "run.json"
    if info_path.is_file():
        try:
            old = json.loads(info_path.read_text())
        except json.JSONDecodeError:
            raise TrainError(f"{info_path} is unreadable; delete {work} to start over") from None
        for k, v in run_info.items():
            if old.get(k) != v:
                diff = k
                if isinstance(v, dict) and isinstance(old.get(k), dict):
                    diff = next((f"{k}.{kk}" for kk in sorted(set(v) | set(old[k])) if v.get(kk) != old[k].get(kk)), k)
                raise TrainError(f"{work} holds an unfinished run with another {diff}; resume it with the same "
                                 f"settings, or delete {work} (or pass --overwrite) to start over")
    else:
        work.mkdir(parents=True, exist_ok=True)
        write_json(info_path, run_info)


def _loss_weights(scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """min-SNR-gamma weights [B] (Hang et al. 2023) for epsilon or v targets; ones when gamma = 0."""
    if gamma <= 0:
        return torch.ones(t.shape[0], device=t.device)
    acp = scheduler.alphas_cumprod[t]
    snr = acp / (1 - acp)
    w = torch.clamp(snr, max=gamma)
    return w / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else w / snr


def save_loss_curve(rows: list[dict], path: Path, title: str) -> None:
    """Loss per step and its moving average, as a PNG (matplotlib's Agg canvas: no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [r["step"] for r in rows]
    loss = [r["loss"] for r in rows]
    k = max(1, len(loss) // 20)
    avg = [sum(loss[max(0, i - k + 1) : i + 1]) / len(loss[max(0, i - k + 1) : i + 1]) for i in range(len(loss))]
    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, loss, lw=0.6, alpha=0.4, label="loss")
    ax.plot(steps, avg, lw=1.6, label=f"moving mean ({k} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("weighted MSE")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _sample_grid(pipe, run: _Run, captions: list[str], cfg: TrainConfig):
    """Row 1: the frozen backbone; row 2: with the adapter (same seed). Removes the adapter."""
    from ..compose.pipeline import text_to_image
    from ..util.plots import grid

    kw = dict(steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale, seed=cfg.seed)
    with_adapter = text_to_image(pipe, [run.prompt(c) for c in captions], **kw)
    adapter = run.read_back()
    run.close()
    plain = text_to_image(pipe, captions, **kw)
    return adapter, grid(plain + with_adapter, cols=len(captions))


def _spread(items: list[str], k: int) -> list[str]:
    if k >= len(items):
        return list(items)
    return [items[round(i * (len(items) - 1) / max(1, k - 1))] for i in range(k)]


def train_adapter(source: DataSource, pipe, cfg: TrainConfig, out: str | os.PathLike, *, base_model: str | None = None,
                  overwrite: bool = False, cache_dir: str | os.PathLike | None = None,
                  on_step: Callable[[int, float], None] | None = None, progress: bool | None = None) -> TrainResult:
    """Train `source`'s adapter on the frozen `pipe` and write it to `out` with `save_adapter`.

    Resumes from `<out>.train/` when an earlier run of the same settings was interrupted. `on_step(step,
    loss)` runs after each optimizer step (and its checkpoint). `pipe` is left exactly as it came, also on
    errors. Raises TrainError / SourceError / AdapterError with a one-line message."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    from ..adapters.store import backbone_fingerprint, save_adapter
    from ..backbone.loading import freeze

    out = Path(out)
    work = work_dir(out)
    freeze(pipe)
    _check_start(pipe, out, overwrite)
    manifest = source.manifest(cache_dir)
    fingerprint = backbone_fingerprint(pipe)
    base_model = base_model or str(getattr(pipe, "backbone_name", None) or "unknown")
    _open_work(work, {"source_id": source.id, "data_hash": manifest.hash, "backbone": fingerprint,
                      "config": cfg.identity()}, overwrite)
    device = pipe.unet.device  # the backbone's placement is the run's (backbone.load(device=, dtype=))
    try:
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=device.type == "cpu")
    except (ValueError, RuntimeError) as e:
        raise TrainError(f"accelerate refuses mixed_precision={cfg.mixed_precision!r} here "
                         f"({str(e).splitlines()[0]}); use --set mixed_precision=no") from None
    if accelerator.num_processes > 1:
        raise TrainError("train one adapter per process (small adapters gain nothing from data parallelism); "
                         "run `prompt-cdm train-all --executor ray` to train sources in parallel")
    threads, rng = torch.get_num_threads(), torch.get_rng_state()  # both restored when we return
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run, checkpointing = None, False
    try:
        run = _Run(pipe, cfg, source.id)
        cache_path = work / "cache.safetensors"  # always trained from the file: a resumed run sees the same bytes
        if not cache_path.is_file():
            from ..util.io import save_safetensors

            save_safetensors(cache_path, build_cache(pipe, source, cfg, run.prompt, run.uncond, progress=progress))
        from safetensors.torch import load_file

        cache = {k: v.to(device) for k, v in load_file(str(cache_path)).items()}
        text_key = "text" if "text" in cache else "ids"
        n = cache["latents"].shape[0]
        if n != len(source):
            raise TrainError(f"{cache_path} holds {n} items but the source has {len(source)}; delete {work}")

        params = list(run.params.values())
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=run.training.weight_decay)
        opt = accelerator.prepare(opt)
        ckpt = work / "checkpoint"
        start, elapsed_before, rows = 0, 0.0, []
        if checkpoint.exists(ckpt):
            try:
                meta = checkpoint.load(ckpt, {"adapter": run.holder}, opt)
            except (ValueError, RuntimeError, KeyError) as e:
                raise TrainError(f"cannot resume from {ckpt} ({str(e).splitlines()[0]}); delete {work} to start "
                                 "over") from None
            start, elapsed_before = meta["step"], meta["elapsed"]
            log = work / LOG_NAME
            rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
            rows = [r for r in rows if r["step"] <= start]
            if start > cfg.steps:
                raise TrainError(f"the unfinished run in {work} is at step {start} > steps={cfg.steps}; "
                                 f"pass --steps {start} or more, or delete {work}")

        with torch.device("cpu"):  # the schedule's tables start on the CPU; diffusers moves them to the samples
            sched = DDPMScheduler.from_config(pipe.scheduler.config)
        n_train_t = sched.config.num_train_timesteps
        unet, text_encoder = pipe.unet, pipe.text_encoder
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            checkpointing = True
        run.train_mode(True)
        t0 = time.time()
        bar = tqdm(range(start, cfg.steps), desc=f"train {source.id} ({cfg.kind})", initial=start, total=cfg.steps,
                   disable=_no_bar(progress))
        for step in bar:
            gen = step_generator(cfg.seed, step)
            torch.manual_seed(_seed("dropout", cfg.seed, step))  # LoRA dropout draws from the global generator
            idx = batch_indices(n, cfg.batch_size, cfg.seed, step).to(device)
            x0 = cache["latents"][idx]
            # every draw from the CPU generator of this step, then moved: the same run on every device
            noise = torch.randn(x0.shape, generator=gen, device="cpu").to(device, x0.dtype)
            t = torch.randint(0, n_train_t, (cfg.batch_size,), generator=gen, device="cpu")
            drop = (torch.rand(cfg.batch_size, generator=gen, device="cpu") < cfg.caption_dropout).to(device)
            cond = torch.where(drop.view(-1, *[1] * (cache[text_key].ndim - 1)),
                               cache["uncond_" + text_key], cache[text_key][idx])
            xt = sched.add_noise(x0, noise, t.to(device))
            target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(x0, noise, t.to(device))
            with accelerator.autocast():
                states = cond if text_key == "text" else text_encoder(cond)[0]
                # the frozen UNet runs in its own dtype; the adapter's trainable tensors stay float32
                pred = unet(xt.to(unet.dtype), t.to(device), encoder_hidden_states=states.to(unet.dtype)).sample
            per_item = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
            loss = (_loss_weights(sched, t, cfg.min_snr_gamma).to(device) * per_item).mean()
            accelerator.backward(loss)
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)

            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainError(f"the loss became {value} at step {step + 1}; lower the learning rate "
                                 f"(--set {cfg.section_name}.lr=...)")
            elapsed = elapsed_before + time.time() - t0
            rows.append({"step": step + 1, "loss": value, "lr": cfg.lr, "elapsed_s": round(elapsed, 3)})
            bar.set_postfix(loss=f"{value:.4f}")
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                # the log first: a kill between the two leaves a log that is ahead, never behind, the checkpoint
                write_jsonl(work / LOG_NAME, rows)
                checkpoint.save(ckpt, {"adapter": run.holder}, opt, {"step": step + 1, "elapsed": elapsed})
            if on_step is not None:
                on_step(step + 1, value)
        bar.close()
        run.train_mode(False)
        loop_s = time.time() - t0
        done = cfg.steps - start

        captions = list(cfg.sample_prompts) or _spread(source.captions, cfg.n_samples)
        if captions:
            adapter, sample_grid = _sample_grid(pipe, run, captions, cfg)
        else:
            adapter, sample_grid = run.read_back(), None
            run.close()
        tail = [r["loss"] for r in rows[-max(1, len(rows) // 10):]]
        final = sum(tail) / len(tail) if tail else None
        wall = elapsed_before + loop_s
        figures = {
            "source": source.id, "images": len(source), "steps": cfg.steps, "batch size": cfg.batch_size,
            "learning rate": cfg.lr, "final loss (mean of last 10% of steps)": final,
            "steps/s": (done / loop_s) if done and loop_s > 0 else None, "wall time (min)": wall / 60,
            "device": str(device), "resumed from step": start,
        }
        figures = {k: v for k, v in figures.items() if v is not None}
        members = [{"source_id": m["source_id"], "data_hash": m["hash"], "n_items": m["n_items"]}
                   for m in manifest.members] or [{"source_id": source.id, "data_hash": manifest.hash,
                                                   "n_items": manifest.n_items}]
        train_config = cfg.as_dict()
        train_config["sources"] = members
        save_run(out, work, adapter, rows, f"{source.id} ({cfg.kind})", source_id=source.id,
                 fingerprint=fingerprint, base_model=base_model, data_hash=manifest.hash, train_config=train_config,
                 figures=figures, sample_grid=sample_grid, overwrite=overwrite)
        return TrainResult(str(out), source.id, manifest.hash, cfg.steps, final,
                           figures.get("steps/s"), wall)
    finally:
        if checkpointing:
            pipe.unet.disable_gradient_checkpointing()
        if run is not None:
            run.close()
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)


def save_run(out: Path, work: Path, adapter, rows: list[dict], title: str, **save_kw) -> Path:
    """A run's end: the adapter folder with its loss log and curve, renamed into place in one step (a run
    killed before the rename resumes and saves again; after it, the folder is whole), then `work` goes
    (the latent cache is derived from the data)."""
    from ..adapters.store import save_adapter

    def log(folder: Path) -> None:
        write_jsonl(folder / LOG_NAME, rows)
        if rows:
            save_loss_curve(rows, folder / CURVE_NAME, title)

    save_adapter(out, adapter, extra=log, **save_kw)
    shutil.rmtree(work, ignore_errors=True)
    return out


def clean_run(out: str | os.PathLike) -> list[str]:
    """Delete `<out>.train/` (an unfinished run's latent cache, checkpoint and log, or what a finished run
    killed before removing it left); the paths deleted. `prompt-cdm train --clean-cache`."""
    work = work_dir(out)
    if not work.exists():
        return []
    if work.is_symlink() or not work.is_dir():
        work.unlink()
    else:
        shutil.rmtree(work)
    return [str(work)]


def load_backbone(name: str, cfg: TrainConfig | None = None):
    from ..backbone.loading import load_quietly

    return load_quietly(name, cfg.dtype if cfg else None, cfg.device if cfg else None)


def train(backbone: str, sources: list[str | os.PathLike], cfg: TrainConfig, out: str | os.PathLike, *,
          source_id: str | None = None, overwrite: bool = False, cache_dir: str | os.PathLike | None = None,
          progress: bool | None = None) -> TrainResult:
    """`prompt-cdm train`: open the source (several = their union, the paragon), load the backbone, train."""
    from ..backbone.placement import Placement
    from ..data.sources import open_sources

    Placement(cfg.device, cfg.dtype).resolve()  # a device that is not there: refused before anything is read

    source = open_sources(sources, source_id=source_id)
    if is_complete(out) and not overwrite:  # before the backbone loads: refusing should be instant
        left = clean_run(out)  # a finished run killed before it removed its work folder
        raise TrainError(f"{out} already holds a trained adapter; pass --overwrite to retrain it or delete the folder"
                         + (f" (removed the finished run's leftover {left[0]})" if left else ""))
    source.manifest(cache_dir)  # a corrupt image stops the run before anything loads
    pipe = load_backbone(backbone, cfg)
    return train_adapter(source, pipe, cfg, out, base_model=backbone, overwrite=overwrite, cache_dir=cache_dir,
                         progress=progress)


# ---------------------------------------------------------------- many sources


@dataclass
class TrainJob:
    """One source's training, as plain data (so another process, e.g. a Ray worker, can run it)."""

    backbone: str
    source: str  # a folder or datasets:NAME[@SPLIT]
    source_id: str
    config: dict
    out: str
    cache_dir: str | None = None
    threads: int = 0
    data_hash: str = ""  # the source's manifest hash when the job was made ('' = do not check)


_PIPES: dict[str, Any] = {}  # one loaded backbone per process, reused across jobs (adapters are removed after each)


def run_job(job: TrainJob) -> TrainResult:
    """Train one source unless its adapter folder is complete (then skip); resumes an unfinished run."""
    from ..util.config import from_dict
    from ..data.sources import open_source

    if is_complete(job.out):
        shutil.rmtree(work_dir(job.out), ignore_errors=True)  # left over if a run died right after saving
        cfg = json.loads((Path(job.out) / "adapter_config.json").read_text())
        if job.data_hash and cfg.get("data_hash") != job.data_hash:
            raise TrainError(f"{job.out} was trained on other data than {job.source} holds now (manifest hash "
                             f"{str(cfg.get('data_hash'))[:12]} vs {job.data_hash[:12]}); delete the folder to retrain")
        return TrainResult(job.out, job.source_id, cfg.get("data_hash", ""),
                           cfg.get("train_config", {}).get("steps", 0), None, None, None, skipped=True)
    if job.threads:
        torch.set_num_threads(job.threads)
    cfg = from_dict(TrainConfig, job.config)
    source = open_source(job.source, source_id=job.source_id)
    key = (job.backbone, cfg.device, cfg.dtype)
    if key not in _PIPES:
        _PIPES.clear()
        _PIPES[key] = load_backbone(job.backbone, cfg)
    return train_adapter(source, _PIPES[key], cfg, job.out, base_model=job.backbone, cache_dir=job.cache_dir)


def render_world_sources(domains: str | list[str], out_dir: str | os.PathLike, n_images: int,
                         seed: int = 0) -> list[Path]:
    """Render shapes-world domains into `out_dir/data/<domain>` (reused when already rendered with n_images).

    `domains`: 'all' (every source domain: all but `base`, which the backbone was pretrained on),
    a comma-separated string or a list."""
    from ..world.dataset import render_domain
    from ..world.domains import SOURCE_DOMAINS, get_domain

    names = list(SOURCE_DOMAINS) if domains == "all" else (
        [d.strip() for d in domains.split(",") if d.strip()] if isinstance(domains, str) else list(domains))
    if not names:
        raise SourceError("no world domain given; pass --world-domains all or a comma-separated list")
    if n_images < 1:
        raise SourceError(f"--n-images must be >= 1, got {n_images}")
    for d in names:
        get_domain(d)  # UnknownDomainError lists the valid names
    folders = []
    for d in names:
        folder = Path(out_dir) / "data" / d
        meta = folder / "metadata.jsonl"  # written last by render_domain: its presence means complete
        if meta.is_file():
            have = sum(1 for line in meta.read_text().splitlines() if line.strip())
            if have != n_images:
                raise SourceError(f"{folder} was rendered with {have} images, not {n_images}; "
                                  f"pass --n-images {have} or delete the folder")
        else:
            render_domain(d, n_images, folder, seed=seed)
        folders.append(folder)
    return folders


def train_all(backbone: str, sources: list[str | os.PathLike], cfg: TrainConfig, out_dir: str | os.PathLike,
              executor: str = "local", cache_dir: str | os.PathLike | None = None, **executor_options
              ) -> list[TrainResult]:
    """One adapter per source into `out_dir/adapters/<source id>`; complete ones are skipped, unfinished
    ones resumed. Every source is opened and hashed first, so a bad image stops the run before any training.
    `executor`: 'local' (sequential, one backbone in memory) or 'ray' (see executors.py)."""
    from .executors import get_executor
    from ..backbone.placement import Placement
    from ..data.sources import open_source

    run = get_executor(executor, **executor_options)  # refuse an unknown / uninstalled executor up front
    Placement(cfg.device, cfg.dtype).resolve()
    opened = [open_source(s) for s in sources]
    ids = [s.id for s in opened]
    dup = next((i for i in ids if ids.count(i) > 1), None)
    if dup:
        raise SourceError(f"two sources have the id {dup!r} (the folder name); rename one folder")
    hashes = [s.manifest(cache_dir).hash for s in opened]
    adapters = Path(out_dir) / "adapters"
    jobs = [TrainJob(backbone, s.location, s.id, to_dict(cfg), str(adapters / s.id),
                     None if cache_dir is None else str(cache_dir), cfg.threads or run.threads_per_job, h)
            for s, h in zip(opened, hashes)]
    try:
        return run(run_job, jobs)
    finally:
        _PIPES.clear()  # the local executor's backbone: do not keep it alive after the call


def summary(results: list[TrainResult]) -> list[dict]:
    return [dataclasses.asdict(r) for r in results]
