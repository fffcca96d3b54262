"""The sampling loop: any `denoise(x, t) -> eps` through a diffusers scheduler.

Like k-diffusion's samplers, the loop knows nothing of prompts, adapters or sources: guidance
and composition live in the denoiser. Per-step results leave through `callback(step, t, x)`.
The order of operations is exactly StableDiffusionPipeline's denoising loop, so the same
denoiser, scheduler and initial latents give the same latents as diffusers.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Scheduler(Protocol):  # the part of a diffusers scheduler the loop uses
    timesteps: torch.Tensor
    init_noise_sigma: float

    def set_timesteps(self, num_inference_steps: int, device=None): ...
    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor: ...
    def step(self, model_output, timestep, sample, **kwargs): ...


def sample(
    denoise: Denoiser,
    scheduler: Scheduler,
    noise: torch.Tensor,
    num_steps: int,
    generator: torch.Generator | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run the reverse process from `noise` [N x C x H x W] (unit Gaussian); return x_0 latents."""
    scheduler.set_timesteps(num_steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    extra = {"generator": generator} if generator is not None else {}
    for i, t in enumerate(scheduler.timesteps):
        eps = denoise(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x, **extra, return_dict=False)[0]
        if callback is not None:
            callback(i, t, x)
    return x
