"""Does adaptation work? judge-TIFA and FID per unseen domain: frozen backbone vs soft prompt / deep prompt / LoRA.

    prompt-cdm train-all --world-domains all --kind lora --out runs/cdm_lora --recipe recipes/adapter_train.toml
    prompt-cdm train-all --world-domains all --kind soft-prompt --out runs/cdm_soft --recipe recipes/adapter_train.toml
    python -m eval.adapter_quality --adapters lora=runs/cdm_lora/adapters soft-prompt=runs/cdm_soft/adapters \
        --domains stars,crosses,purple_orange,striped --n 200 --out runs/figs/adapters

Each adapter generates from its own domain's held-out captions with `prompt-cdm generate --adapter`'s
semantics (one source, uncond per-source = plain diffusers with the adapter loaded); the frozen
backbone from the same captions, seeds and sampler.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def adapter_images(pipe, folder, prompts: list[str], steps: int, guidance: float, seed: int,
                   uncond: str | None = None) -> list:
    """Images of one adapter folder on `prompts` (the adapter is removed again afterwards). `uncond`: the
    guidance's unconditional row (None: the request default, the adapter's own for one source)."""
    from prompt_cdm.compose.pipeline import CDMPipeline
    from prompt_cdm.compose.request import ComposeRequest

    with CDMPipeline(pipe, adapters=[folder]) as cdm:
        return cdm(ComposeRequest(prompts, steps=steps, guidance=guidance, seed=seed, uncond=uncond),
                   progress=True).images


def evaluate(adapter_roots: dict[str, str], domains: list[str], n: int = 200, steps: int = 25,
             guidance: float = 5.0, seed: int = 0, backbone: str = "tiny", out: str | None = None) -> dict:
    """{domain: {"frozen": metrics, kind: metrics, ...}}; adapter_roots: kind -> folder of <domain>/ adapters
    (a label ending in @shared or @per-source picks that unconditional row, e.g. deep-prompt@shared)."""
    from prompt_cdm.backbone.loading import load_quietly
    from prompt_cdm.compose.pipeline import text_to_image
    from prompt_cdm.util.plots import grid
    from prompt_cdm.util.io import save_image, write_json

    from .world_scoring import heldout, reference_features, score_world, shipped_judge

    pipe, judge = load_quietly(backbone), shipped_judge()
    results: dict = {}
    for d in domains:
        held = heldout(d, n, seed)
        prompts = [e.caption for e in held]
        ref = reference_features(judge, d, seed=seed)
        rows = {}
        t0 = time.time()
        images = text_to_image(pipe, prompts, steps=steps, guidance_scale=guidance, seed=seed, progress=True)
        rows["frozen"] = dict(score_world(judge, d, held, images, ref_features=ref), seconds=time.time() - t0)
        shown = [e.image for e in held[:8]] + images[:8]
        for kind, root in adapter_roots.items():
            t0 = time.time()
            uncond = kind.rsplit("@", 1)[1] if "@" in kind else None
            images = adapter_images(pipe, Path(root) / d, prompts, steps, guidance, seed, uncond)
            rows[kind] = dict(score_world(judge, d, held, images, ref_features=ref), seconds=time.time() - t0)
            shown += images[:8]
        results[d] = rows
        print(json.dumps({d: {k: {"tifa": round(r["score"], 3), "fid": round(r["fid_judge"], 2)}
                              for k, r in rows.items()}}))
        if out:
            save_image(Path(out) / f"samples_{d}.png", grid(shown, cols=8, scale=3))
            write_json(Path(out) / "results.json", {"n": n, "steps": steps, "guidance": guidance, "seed": seed,
                                                    "adapters": adapter_roots, "results": results})
    return results


def table(results: dict) -> str:
    kinds = list(next(iter(results.values())))
    head = "| domain | " + " | ".join(f"{k} TIFA | {k} FID" for k in kinds) + " |"
    lines = [head, "|---|" + "---|---|" * len(kinds)]
    for d, rows in results.items():
        lines.append(f"| {d} | " + " | ".join(f"{rows[k]['score']:.3f} | {rows[k]['fid_judge']:.1f}" for k in kinds)
                     + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", nargs="+", required=True, metavar="KIND=DIR",
                   help="adapter roots holding one folder per domain, e.g. lora=runs/cdm_lora/adapters; "
                   "KIND@shared=DIR guides with the frozen backbone's unconditional row instead of the adapter's")
    p.add_argument("--domains", required=True, help="comma-separated source domains")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    roots = dict(kv.split("=", 1) for kv in a.adapters)
    res = evaluate(roots, a.domains.split(","), n=a.n, steps=a.steps, guidance=a.guidance, seed=a.seed,
                   backbone=a.backbone, out=a.out)
    print(table(res))


if __name__ == "__main__":  # pragma: no cover
    main()
