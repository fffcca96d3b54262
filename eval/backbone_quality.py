"""How well a backbone draws each domain: judge-TIFA and judge-feature FID on held-out captions.

    prompt-cdm eval backbone --backbone tiny --domains base,stars,striped --n 200 --out runs/eval_backbone
"""
from __future__ import annotations

import time
from pathlib import Path

import torch


def evaluate_domain(pipe, judge, domain: str, n: int = 200, steps: int = 25, guidance: float = 5.0,
                    seed: int = 0, n_ref: int = 1000):
    """Generate from n held-out captions of `domain`; return (metrics, generated images)."""
    from prompt_cdm.compose.pipeline import text_to_image

    from .world_scoring import heldout, score_world

    held = heldout(domain, n, seed)
    t0 = time.time()
    images = text_to_image(pipe, [e.caption for e in held], steps=steps, guidance_scale=guidance, seed=seed,
                           progress=True)
    gen_s = time.time() - t0
    res = score_world(judge, domain, held, images, n_ref=n_ref, seed=seed)
    res["seconds_per_image"] = gen_s / n
    return res, images


def evaluate_backbone(backbone: str = "tiny", domains: list[str] = ("base",), n: int = 200, steps: int = 25,
                      guidance: float = 5.0, seed: int = 0, out: str | None = None, device=None, dtype=None) -> dict:
    """Judge-TIFA and FID of `backbone` (placed on `device` in `dtype`, backbone.placement) per domain."""
    from prompt_cdm.backbone.loading import load
    from prompt_cdm.util.plots import grid
    from prompt_cdm.util.io import save_image, write_json
    from prompt_cdm.world.judge import Judge

    pipe, judge = load(backbone, dtype, device), Judge.load()
    results = {}
    for d in domains:
        res, images = evaluate_domain(pipe, judge, d, n=n, steps=steps, guidance=guidance, seed=seed)
        results[d] = res
        if out:
            save_image(Path(out) / f"samples_{d}.png", grid(images[:32]))
    if out:
        write_json(Path(out) / "results.json", {"backbone": backbone, "steps": steps, "guidance": guidance,
                                                "n": n, "results": results})
    return results


if __name__ == "__main__":  # pragma: no cover
    torch.set_num_threads(2)
