"""The backbone's two ends: prompts to text-encoder states (as StableDiffusionPipeline tokenizes them)
and latents to images (the VAE decoder). The loop between them is compose.pipeline.compose_images."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """[N x 77 x D] text-encoder hidden states, tokenized as StableDiffusionPipeline does
    (multi-vector soft-prompt placeholders expanded first, as its `maybe_convert_prompt` does)."""
    from ..adapters.soft_prompt import expand_prompts

    prompts = expand_prompts(pipe.tokenizer, prompts)
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True).input_ids
    te = pipe.text_encoder
    return te(torch.tensor(ids, dtype=torch.long, device=te.device))[0]


@torch.no_grad()
def decode_tensor(pipe, latents: torch.Tensor) -> torch.Tensor:
    """[N x 3 x H x W] VAE decoding of x_0 latents, in [-1, 1] (unclamped).

    Half precision as diffusers does it: the VAE decodes in its own dtype, and where that overflows (SD's
    VAE in fp16 can, at high resolution) and the config sets `force_upcast`, the VAE is upcast to float32
    for this decode and cast back (diffusers' `upcast_vae`)."""
    vae = pipe.vae
    z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
    x = vae.decode(z).sample
    if vae.dtype in (torch.float16, torch.bfloat16) and getattr(vae.config, "force_upcast", False) \
            and not bool(torch.isfinite(x).all()):
        dtype = vae.dtype
        vae.to(torch.float32)
        try:
            x = vae.decode(z.float()).sample
        finally:
            vae.to(dtype)
    return x


def decode(pipe, latents: torch.Tensor) -> list[Image.Image]:
    x = decode_tensor(pipe, latents)
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def decode_float(pipe, latents: torch.Tensor) -> np.ndarray:
    """[N x H x W x 3] float32 images in [0, 1], as diffusers' `output_type="np"`."""
    x = decode_tensor(pipe, latents)
    return (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
