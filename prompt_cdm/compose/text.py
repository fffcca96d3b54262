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
    tok = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    return pipe.text_encoder(tok.input_ids.to(pipe.unet.device))[0]


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> list[Image.Image]:
    x = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


@torch.no_grad()
def decode_float(pipe, latents: torch.Tensor) -> np.ndarray:
    """[N x H x W x 3] float32 images in [0, 1], as diffusers' `output_type="np"`."""
    x = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
