"""The frozen backbone: load any diffusers Stable Diffusion 1.x/2.x pipeline, or the embedded `tiny`.

`load("tiny")` builds the shipped tiny pipeline (real SD classes, small configs) from the
safetensors inside the package; `load(folder_or_hub_id)` loads any SD pipeline the same way.
Every loaded backbone is frozen and carries a fingerprint (sha256 of its frozen weights) that
adapters record, so an adapter trained on one backbone is refused by another.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

TINY_DIR = Path(__file__).resolve().parent.parent / "weights" / "tiny"

# Small SD-architecture configs. Cross-attention at every level (16x16, 8x8, 4x4): the
# attention blocks carry no position embedding, and a 4x4 level sees the borders from
# everywhere, which is how the network learns "left"/"top" through padding.
TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3,
    up_block_types=("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(64, 96, 128),  # 5.8M params, ~1.2 s per batch-64 step on 2 CPU cores
    layers_per_block=1,
    cross_attention_dim=64,
    attention_head_dim=4,  # diffusers' legacy name: the number of heads
    norm_num_groups=16,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),  # f=4: 64x64x3 images <-> 16x16x4 latents, 0.95M params
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=64,
)
TINY_TEXT = dict(
    vocab_size=49408,  # CLIP's BPE vocabulary, so the real CLIP tokenizer drives it
    hidden_size=64,  # the embedding table dominates size: 49408 x 64 fp16 = 6.3 MB
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
TINY_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",  # Stable Diffusion's schedule
    prediction_type="epsilon",
    steps_offset=1,
)

# Stable Diffusion 1.5's shapes (its unet/, vae/, text_encoder/ config.json), for tests and benchmarks
# that must see real SD sizes where no SD weights exist: built with random weights at a small sample size.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280),  # 860M parameters
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),  # f=8
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
)
SD15_TEXT = dict(  # CLIP ViT-L/14's text tower
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)


class BackboneError(ValueError):
    """A backbone cannot be loaded; the message names the path and the fix."""


def tiny_scheduler():
    """The tiny pipeline's sampler: Euler-ancestral (stochastic, good at 25 steps) on SD's schedule."""
    from diffusers import EulerAncestralDiscreteScheduler

    return EulerAncestralDiscreteScheduler(**TINY_SCHEDULER)


def build_tiny(seed: int = 0):
    """A randomly initialised tiny pipeline (the starting point of pretraining, and of tests)."""
    return _build(TINY_UNET, TINY_VAE, TINY_TEXT, seed)


def build_sd15_shaped(seed: int = 0, sample_size: int = 16):
    """Stable Diffusion 1.5's architecture with random weights, latents of `sample_size` (SD: 64) --
    real SD sizes for tests and benchmarks where no SD weights can be downloaded. ~1.1B parameters."""
    return _build(dict(SD15_UNET, sample_size=sample_size), dict(SD15_VAE, sample_size=sample_size * 8), SD15_TEXT,
                  seed)


def _build(unet: dict, vae: dict, text: dict, seed: int):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..world.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**vae),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
        tokenizer=clip_tokenizer(),
        unet=UNet2DConditionModel(**unet),
        scheduler=tiny_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_pipeline_folder(path: Path) -> None:
    if not path.exists():
        raise BackboneError(
            f"backbone folder {path} does not exist; pass 'tiny', a diffusers Stable Diffusion folder or a hub id"
        )
    if not (path / "model_index.json").exists():
        raise BackboneError(
            f"{path} is not a diffusers pipeline folder (no model_index.json); "
            "export one with `prompt-cdm backbone export tiny DIR` or point at an SD checkpoint folder"
        )
    index = json.loads((path / "model_index.json").read_text())
    missing = [k for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if k not in index]
    if missing:
        raise BackboneError(f"{path} is not a Stable Diffusion pipeline: model_index.json lacks {', '.join(missing)}")
    from ..util.io import is_pickle_name

    pickles = [p for p in path.rglob("*") if is_pickle_name(p.name)]
    if pickles and not list(path.rglob("*.safetensors")):
        raise BackboneError(
            f"{path} holds only pickle weights ({pickles[0].name}); prompt_cdm loads safetensors only -- "
            "convert the checkpoint to safetensors first"
        )


WEIGHT_PARTS = ("unet", "vae", "text_encoder")


def missing_weight_parts(path: Path) -> list[str]:
    """The parts of a tiny-backbone weight folder (unet/, vae/, text_encoder/ with configs) that `path` lacks."""
    return [sub for sub in WEIGHT_PARTS if not (path / sub / "config.json").exists()]


def is_weight_folder(path: Path) -> bool:
    """A tiny-backbone weight folder (every part, no model_index.json), as `backbone pretrain` writes under
    `out/weights` and the package ships."""
    return not (path / "model_index.json").exists() and not missing_weight_parts(path)


def _load_tiny(folder: Path = TINY_DIR):
    """A pipeline from a weight folder, with the world's tokenizer and the tiny scheduler."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from ..world.tokenizer import clip_tokenizer

    if not (folder / "unet" / "diffusion_pytorch_model.safetensors").exists():
        raise BackboneError(
            f"the tiny backbone's weights are missing from {folder}; "
            "train them with `prompt-cdm backbone pretrain recipes/tiny_backbone.toml`"
        )
    kw = dict(torch_dtype=torch.float32, use_safetensors=True)
    try:
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL.from_pretrained(folder / "vae", **kw),
            text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", **kw),
            tokenizer=clip_tokenizer(),
            unet=UNet2DConditionModel.from_pretrained(folder / "unet", **kw),
            scheduler=tiny_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError, EnvironmentError) as e:
        raise BackboneError(f"cannot load the weight folder {folder}: {str(e).splitlines()[0]}") from None
    return pipe


def freeze(pipe):
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
        m.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_pipeline(name_or_path: str, path: Path, looks_local: bool, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline

    if looks_local:
        _check_pipeline_folder(path)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            name_or_path, torch_dtype=dtype, use_safetensors=True, safety_checker=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError, EnvironmentError) as e:
        raise BackboneError(f"cannot load backbone {name_or_path!r}: {str(e).splitlines()[0]}") from None
    return pipe


def load(name_or_path: str = "tiny", dtype: torch.dtype | str | None = None, device: torch.device | str | None = None):
    """Load and freeze a backbone: 'tiny', a tiny-backbone weight folder, a diffusers SD pipeline folder,
    or a hub id, placed on `device` in `dtype` (`placement.Placement`: None / "auto" = the first CUDA device
    in fp16 when one is visible, else the CPU in fp32; "cpu", "cuda:1", "fp16", torch objects ...).

    The placement is checked before anything loads. The weights load in float32, are fingerprinted (so the
    fingerprint does not depend on the dtype), then cast and moved. Attention runs through PyTorch's SDPA
    (diffusers' AttnProcessor2_0)."""
    from .placement import Placement

    device, dtype = Placement.of(device, dtype).resolve()
    if name_or_path == "tiny":
        pipe = _load_tiny()
    else:
        path = Path(name_or_path)
        looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1
        if looks_local and path.is_dir() and is_weight_folder(path):
            pipe = _load_tiny(path)  # e.g. `backbone pretrain`'s out/weights, without installing it
        else:
            pipe = _load_pipeline(name_or_path, path, looks_local, torch.float32)
    pipe.backbone_name = name_or_path
    pipe.backbone_fingerprint = fingerprint(pipe)
    place(pipe, device, dtype)
    return freeze(pipe)


def place(pipe, device: torch.device, dtype: torch.dtype):
    """Move the pipeline's models to `device` in `dtype`, with SDPA attention (diffusers' default on torch 2;
    set again so a pipeline built with other processors gets it too)."""
    import warnings

    import diffusers.utils.logging as dlog
    from diffusers.models.attention_processor import AttnProcessor2_0

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()  # diffusers' notices on casting with to() and on fp16 on the CPU (we checked it runs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe.to(device=device, dtype=dtype)
    finally:
        dlog.set_verbosity(level)
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    return pipe


def compile_unet(pipe, backend: str = "inductor", mode: str | None = None):
    """torch.compile the UNet in place (`nn.Module.compile`: the module tree and its parameter names stay, so
    adapters still apply and multi-LoRA row routing stays exact -- tests/compose/test_scale.py). The first
    call of each new routing compiles; the composed batch's rows keep their shapes across steps."""
    pipe.unet.compile(backend=backend, mode=mode)
    return pipe


def load_quietly(name_or_path: str = "tiny", dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None):
    """`load` without the libraries' progress bars and dtype notices on stderr (errors stay one line)."""
    import warnings

    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    saved = [(m, m.get_verbosity(), m.is_progress_bar_enabled()) for m in (dlog, tlog)]
    for m, _, _ in saved:
        m.set_verbosity_error()
        m.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # diffusers' torch_dtype -> dtype rename notice
            return load(name_or_path, dtype, device)
    finally:
        for m, level, bar in saved:
            m.set_verbosity(level)
            if bar:
                m.enable_progress_bar()


def fingerprint(pipe) -> str:
    """sha256 over the frozen weights (UNet, VAE, text encoder), dtype-independent (float32 bytes)."""
    h = hashlib.sha256()
    for name in ("unet", "vae", "text_encoder"):
        sd = getattr(pipe, name).state_dict()
        for k in sorted(sd):
            h.update(f"{name}.{k}:{tuple(sd[k].shape)}".encode())
            h.update(sd[k].detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def save_tiny_weights(pipe, out: Path = TINY_DIR, dtype: torch.dtype = torch.float16) -> None:
    """Write the pipeline's models into the package's weight folder (fp16 safetensors + configs)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae", "text_encoder"):
        model = getattr(pipe, name)
        orig = next(model.parameters()).dtype
        model.to(dtype)
        model.save_pretrained(out / name, safe_serialization=True)
        model.to(orig)


def export(name_or_path: str, out: str | Path) -> Path:
    """Write a standard pipeline folder that plain `StableDiffusionPipeline.from_pretrained` loads."""
    pipe = load(name_or_path)
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


@dataclass
class BackboneInfo:
    name: str
    fingerprint: str
    unet_params: int
    vae_params: int
    text_params: int


def info(pipe) -> BackboneInfo:
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return BackboneInfo(getattr(pipe, "backbone_name", "?"), getattr(pipe, "backbone_fingerprint", fingerprint(pipe)),
                        n(pipe.unet), n(pipe.vae), n(pipe.text_encoder))
