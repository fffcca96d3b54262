"""The row budget: how many UNet rows one pass of the composed batch may hold.

A composed step stacks N (n + 1) rows (shared unconditional row) or 2 N n rows (per-source) into one UNet
call. At Stable Diffusion's 512 px that outgrows a GPU quickly, so the denoiser splits the rows into passes
of at most `max_rows` (the result does not depend on the split: every row is an independent UNet
evaluation). `max_rows=None` is automatic: unlimited on the CPU; on CUDA the free memory divided by what
one more row costs, measured once per UNet, latent size and dtype (`calibrate`), with headroom.

    rows_per_image(n_sources, uncond, guided)   the rows one image needs: a budget below it is refused
    row_budget(free_bytes, bytes_per_row)       the pure rule
"""
from __future__ import annotations

import torch

HEADROOM = 0.8  # of the free memory: the allocator's fragmentation, the VAE decode and the text encoder


class RowBudgetError(ValueError):
    """A row budget that cannot run one image's step; the message names the fix."""


def rows_per_image(n_sources: int, uncond: str, guided: bool = True) -> int:
    """UNet rows one image needs per step: n conditional rows, plus one shared or n per-source
    unconditional rows when guided (g != 1)."""
    if not guided:
        return n_sources
    return n_sources + 1 if uncond == "shared" else 2 * n_sources


def check_max_rows(max_rows: int | None, n_sources: int, uncond: str, guided: bool = True) -> None:
    if max_rows is None:
        return
    need = rows_per_image(n_sources, uncond, guided)
    if max_rows < need:
        raise RowBudgetError(f"--max-rows {max_rows} is below one image's {need} UNet rows ({n_sources} source(s), "
                             f"uncond {uncond}); give --max-rows {need} or more, or leave it out (automatic)")


def row_budget(free_bytes: int, bytes_per_row: int, headroom: float = HEADROOM) -> int:
    """Rows that fit in `headroom` of `free_bytes` at `bytes_per_row` each (at least 1)."""
    if bytes_per_row <= 0:
        raise ValueError(f"bytes_per_row must be > 0, got {bytes_per_row}")
    return max(1, int(free_bytes * headroom) // bytes_per_row)


_MEASURED: dict[tuple, int] = {}


@torch.no_grad()
def calibrate(unet, latents: torch.Tensor, timestep, embeddings: torch.Tensor) -> int:
    """Bytes one more row costs in a pass of `unet` on CUDA: the peak of a 2-row pass minus a 1-row pass
    (inputs shaped as the composition's: latents [1 x C x h x w], embeddings [1 x L x D])."""
    device = latents.device
    key = (id(unet), tuple(latents.shape[1:]), latents.dtype, tuple(embeddings.shape[1:]), str(device))
    if key not in _MEASURED:
        peaks = []
        for k in (1, 2):
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            unet(latents.expand(k, *latents.shape[1:]), timestep, encoder_hidden_states=embeddings.expand(k, -1, -1))
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device) - base)
        _MEASURED[key] = max(1, peaks[1] - peaks[0])
    return _MEASURED[key]


def auto_max_rows(unet, latents: torch.Tensor, timestep, embeddings: torch.Tensor) -> int | None:
    """The automatic budget: None (unlimited) off CUDA; on CUDA, what the free memory holds."""
    if latents.device.type != "cuda":
        return None
    per_row = calibrate(unet, latents[:1], timestep, embeddings[:1])
    free, _ = torch.cuda.mem_get_info(latents.device)
    return row_budget(free, per_row)
