"""Text-to-image with a (frozen) backbone: prompt encoding, the guided denoiser, decoding.

This is the plain single-conditioning path; the composed multi-source denoiser plugs into the
same `sampling.sample` loop.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from PIL import Image

from ..core.mixing import guidance
from ..core.sampling import sample


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """[N x 77 x D] text-encoder hidden states, tokenized as StableDiffusionPipeline does
    (multi-vector soft-prompt placeholders expanded first, as its `maybe_convert_prompt` does)."""
    from ..adapters.soft_prompt import expand_prompts

    prompts = expand_prompts(pipe.tokenizer, prompts)
    tok = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    return pipe.text_encoder(tok.input_ids.to(pipe.unet.device))[0]


def guided_denoiser(unet, cond: torch.Tensor, uncond: torch.Tensor, scale: float):
    """denoise(x, t): one UNet pass over [uncond rows; cond rows], then classifier-free guidance."""

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if scale == 1.0:
            return unet(x, t, encoder_hidden_states=cond).sample
        out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        eps_u, eps_c = out.chunk(2)
        return guidance(eps_u, eps_c, scale)

    return denoise


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


@torch.no_grad()
def text_to_image(pipe, prompts: list[str], steps: int = 25, guidance_scale: float = 5.0, seed: int = 0,
                  batch_size: int = 64, progress: bool = False, output_type: str = "pil"):
    """Generate one image per prompt with diffusers' seeding semantics.

    Each batch of prompts draws its initial noise and then the sampler's noise from one
    `torch.Generator(seed + first index)`, exactly as `StableDiffusionPipeline(prompts,
    generator=...)` does, so a batch here equals that diffusers call image for image.
    `output_type`: "pil" (list of uint8 PIL images), "np" ([N x H x W x 3] float32 in [0, 1],
    diffusers' "np") or "latent" ([N x C x h x w] x_0 latents)."""
    if output_type not in ("pil", "np", "latent"):
        raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
    from tqdm.auto import tqdm

    unet = pipe.unet
    c, size = unet.config.in_channels, unet.config.sample_size
    uncond = encode_prompts(pipe, [""])
    images: list = []
    for s in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
        chunk = prompts[s : s + batch_size]
        cond = encode_prompts(pipe, chunk)
        gen = torch.Generator().manual_seed(seed + s)
        noise = torch.randn(len(chunk), c, size, size, generator=gen)
        denoise = guided_denoiser(unet, cond, uncond.expand(len(chunk), -1, -1), guidance_scale)
        sched = copy.deepcopy(pipe.scheduler)
        latents = sample(denoise, sched, noise, steps, generator=gen)
        if output_type == "pil":
            images += decode(pipe, latents)
        else:
            images.append(latents if output_type == "latent" else decode_float(pipe, latents))
    if output_type == "latent":
        return torch.cat(images)
    return images if output_type == "pil" else np.concatenate(images)


def grid(images: list[Image.Image], cols: int = 8, scale: int = 2, pad: int = 2) -> Image.Image:
    """Tile images into one picture (nearest-neighbour upscaled so small renders are visible)."""
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    out = Image.new("RGB", (cols * (w * scale + pad) + pad, rows * (h * scale + pad) + pad), (255, 255, 255))
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out.paste(im.resize((w * scale, h * scale), Image.Resampling.NEAREST),
                  (pad + c * (w * scale + pad), pad + r * (h * scale + pad)))
    return out
