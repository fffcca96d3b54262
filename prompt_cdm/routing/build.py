"""A registry ready for every estimator: each domain's adapter, its cached latents and caption statistics,
the classifier, the per-source ratio heads and their public reference set (rendered from the shapes
world's base domain). Used by the demo and the composition evaluation; each piece is skipped when it is
already there, so a rerun resumes.
"""
from __future__ import annotations

from pathlib import Path


def build_registry(pipe, adapters: Path, data: Path, out: Path, domains: list[str], n_ref: int = 500,
                   router_steps: int = 400, kinds=("classifier", "ratio")):
    """OUT/registry with every domain's adapter, cached latents and the routers of `kinds` (the classifier,
    the ratio heads and their reference set)."""
    from ..adapters.kinds import backbone_table
    from ..registry.registry import REFERENCE, Registry
    from .routers import CACHE_FILE, CAPTION_STATS, RouterTrainConfig, cache_caption_stats, cache_latents, train_router
    from ..world.dataset import render_domain

    folder = out / "registry"
    reg = Registry(folder) if (folder / "registry.json").is_file() else Registry.create(
        folder, pipe.backbone_name, pipe.backbone_fingerprint, modules=backbone_table(pipe))
    report = {}
    for d in domains:
        if d not in reg.sources:
            reg.add(d, adapters / d)
        if not (reg.cache_dir(d) / CACHE_FILE).is_file():
            cache_latents(reg, d, pipe, data / d)
        if not (reg.cache_dir(d) / CAPTION_STATS).is_file():  # registries cached before the caption prior
            cache_caption_stats(reg, d, pipe.tokenizer, data / d)
    if "ratio" in kinds and not (reg.folder / REFERENCE / CACHE_FILE).is_file():
        ref = out / "reference_base"
        if not (ref / "metadata.jsonl").is_file():
            render_domain("base", n_ref, ref, seed=7)
        cache_latents(reg, None, pipe, ref)
    cfg = RouterTrainConfig(steps=router_steps)
    abar = pipe.scheduler.alphas_cumprod
    if "classifier" in kinds and ("classifier" not in reg.routers or reg.router("classifier").get("stale")):
        report["classifier"] = train_router(reg, "classifier", abar, cfg, domains, device=pipe.unet.device)
    missing = [d for d in domains if f"ratio-{d}" not in reg.routers] if "ratio" in kinds else []
    if missing:
        report["ratio"] = train_router(reg, "ratio", abar, cfg, missing, device=pipe.unet.device)
    return reg, report
