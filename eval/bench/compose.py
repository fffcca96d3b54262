"""Composition cost: one batched UNet pass for n sources vs n sequential adapter passes; sparse vs dense.

    python -m eval.bench.compose --backbone tiny --ns 1,2,4,8 --threads 2
    python -m eval.bench.compose --backbone sd15-shaped --sample-size 16 --ns 1,2,4,8 --repeats 2 --threads 2
    python -m eval.bench.compose --registry runs/figs/compose/registry --threads 2      # + sparse vs dense

Per step (n LoRA sources with random weights, one prompt, guidance on):
- batched: `ComposedDenoiser` in ONE UNet call, with the shared unconditional row (n + 1 rows) or with each
  source's own (per-source, 2n rows);
- sequential: what a diffusers user does without us, one single-adapter pass per source
  (`ComposedDenoiser` with that source and its own unconditional row: 2 rows, the adapter swapped in),
  n calls, 2n rows.
With `--registry` (a registry with trained sources and a classifier router, e.g. from
`python -m eval.composition_quality`): whole images, 25 steps, one held-out caption per source domain,
seconds per image for one source's adapter alone, all sources dense, and all sources sparse
(classifier weights, sources below 0.05 dropped after 20% of the steps; `--uncond` per-source by default, as
`prompt-cdm experiment`). Ratios from one run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def _pipe(backbone: str, sample_size: int):
    from prompt_cdm.backbone.loading import build_sd15_shaped, freeze, load_quietly

    if backbone == "sd15-shaped":
        pipe = freeze(build_sd15_shaped(seed=0, sample_size=sample_size))
        pipe.backbone_name = "sd15-shaped"
        return pipe
    return load_quietly(backbone)


def _random_loras(pipe, n: int, rank: int = 4) -> list:
    """n LoRA sources with random (non-zero) weights, applied to `pipe`."""
    from prompt_cdm.adapters import LoraAdapter, LoraAdapterConfig, lora
    from prompt_cdm.compose.denoiser import ComposedSource

    cfg = LoraAdapterConfig(rank=rank, alpha=float(rank))
    out = []
    for i in range(n):
        fresh = lora.create(pipe, cfg)
        g = torch.Generator().manual_seed(i)
        name = f"bench{i}"
        lora.apply(pipe, LoraAdapter(cfg, {k: torch.randn(v.shape, generator=g) * 0.01
                                           for k, v in fresh.tensors.items()}), name)
        out.append(ComposedSource(name, "lora", name))
    return out


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, peft's first routed call)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_costs(pipe, ns: list[int], repeats: int, prompt: str = "a red circle to the left of a blue square") -> list:
    from prompt_cdm.adapters import lora
    from prompt_cdm.compose.denoiser import ComposedDenoiser
    from prompt_cdm.estimators import get_estimator

    sources = _random_loras(pipe, max(ns))
    try:
        sched = pipe.scheduler
        sched.set_timesteps(25)
        t = sched.timesteps[10]
        size, c = pipe.unet.config.sample_size, pipe.unet.config.in_channels
        x = torch.randn(1, c, size, size, generator=torch.Generator().manual_seed(0))
        rows = []
        for n in ns:
            batched = ComposedDenoiser(pipe, sources[:n], [prompt], get_estimator("uniform"), sched, uncond="shared")
            batched_ps = ComposedDenoiser(pipe, sources[:n], [prompt], get_estimator("uniform"), sched,
                                          uncond="per-source")
            singles = [ComposedDenoiser(pipe, [s], [prompt], get_estimator("uniform"), sched, uncond="per-source")
                       for s in sources[:n]]

            def one_batched():
                batched.reset()
                batched(x, t)

            def one_batched_ps():
                batched_ps.reset()
                batched_ps(x, t)

            def one_by_one():
                for d in singles:
                    d.reset()
                    d(x, t)

            tb, tp, ts = _timed(one_batched, repeats), _timed(one_batched_ps, repeats), _timed(one_by_one, repeats)
            rows.append({"n": n, "batched_s": tb, "batched_per_source_s": tp, "sequential_s": ts, "speedup": ts / tb,
                         "speedup_per_source": ts / tp, "rows_batched": n + 1, "rows_sequential": 2 * n})
            print(rows[-1], flush=True)
    finally:
        for s in sources:
            lora.remove(pipe, s.handle)
    return rows


def image_costs(registry: str, steps: int = 25, seed: int = 0, uncond: str = "per-source",
                caption_prior: bool = False) -> dict:
    """Seconds per image: one source alone vs every source dense vs sparse (classifier router); with
    caption_prior also dense and sparse-from-the-first-step under the caption prior (each prompt is one
    source domain's held-out caption)."""
    from prompt_cdm.backbone.loading import load_quietly
    from prompt_cdm.compose.pipeline import CDMPipeline
    from prompt_cdm.compose.request import SPARSE_WARMUP, ComposeRequest
    from prompt_cdm.registry.registry import Registry
    from prompt_cdm.world.dataset import examples
    from prompt_cdm.world.domains import DOMAINS

    reg = Registry(registry)
    names = reg.sources
    pipe = load_quietly(reg.backbone["name"])
    prompts = [examples(d, 1, seed=seed + 3, heldout=True)[0].caption if d in DOMAINS else "a red circle"
               for d in names]
    cdm = CDMPipeline(pipe, registry=reg)
    cdm.apply(names)
    try:
        def run(srcs, router, uncond, sparse, prior=False, warmup=SPARSE_WARMUP):
            plan = cdm.plan(ComposeRequest(prompts, sources=srcs, estimator=router, uncond=uncond, sparse=sparse,
                                           sparse_warmup=warmup, caption_prior=1.0 if prior else None, steps=steps,
                                           seed=seed, batch_size=1))
            t0 = time.perf_counter()  # the composition itself (its heads and prior are read before)
            res = cdm.run(plan, output_type="latent")
            rows = sum(sum(r) for r in res.rows_per_step) / len(prompts)
            return (time.perf_counter() - t0) / len(prompts), rows

        single = run(names[:1], "uniform", "per-source", False)
        router = "classifier" if "classifier" in reg.routers else "ito"
        dense = run(names, router, uncond, False)
        sparse = run(names, router, uncond, True)
        prior_cols = {}
        if caption_prior:  # the caption prior decides the weights from the first step: sparse without warm-up
            pd = run(names, router, uncond, False, prior=True)
            ps = run(names, router, uncond, True, prior=True, warmup=0.0)
            prior_cols = {"prior_dense_s": pd[0], "prior_sparse0_s": ps[0], "prior_dense_rows": pd[1],
                          "prior_sparse0_rows": ps[1], "prior_sparse0_over_single": ps[0] / single[0]}
    finally:
        cdm.close()
    return {"n": len(names), "router": router, "uncond": uncond, "single_s": single[0], "dense_s": dense[0], "sparse_s": sparse[0],
            "single_rows": single[1], "dense_rows": dense[1], "sparse_rows": sparse[1],
            "sparse_over_single": sparse[0] / single[0], "dense_over_single": dense[0] / single[0], **prior_cols}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="tiny", help="'tiny', 'sd15-shaped' (random weights) or an SD folder")
    p.add_argument("--sample-size", type=int, default=16, help="sd15-shaped: latent size (SD1.5: 64)")
    p.add_argument("--ns", default="1,2,4,8")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--registry", default=None, help="also time whole images: single vs dense vs sparse")
    p.add_argument("--skip-steps", action="store_true", help="only the --registry image timings")
    p.add_argument("--caption-prior", action="store_true", help="--registry images: also dense and sparse (no "
                   "warm-up) under the caption prior (the registry's caption statistics)")
    p.add_argument("--uncond", default="per-source", help="--registry images: per-source (2 rows per active source) "
                   "or shared (1 + 1 per active source) unconditional rows")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cmd = "python -m eval.bench.compose " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"command: {cmd}")
    if not a.skip_steps:
        rows = step_costs(_pipe(a.backbone, a.sample_size), [int(v) for v in a.ns.split(",")], a.repeats)
        print(f"\none denoising step, backbone {a.backbone}" + (f" (latents {a.sample_size}x{a.sample_size})"
                                                                 if a.backbone == "sd15-shaped" else ""))
        print("| n | batched, shared uncond (n+1 rows) | batched, per-source uncond (2n rows) | sequential (n calls "
              "of 2 rows) | speed-up shared | speed-up per-source |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['n']} | {r['batched_s']:.4f} s | {r['batched_per_source_s']:.4f} s | {r['sequential_s']:.4f} s | "
                  f"{r['speedup']:.2f}x | {r['speedup_per_source']:.2f}x |")
    if a.registry:
        r = image_costs(a.registry, uncond=a.uncond, caption_prior=a.caption_prior)
        print(f"\nper image, {r['n']} sources, router {r['router']}, uncond {r['uncond']}, 25 steps")
        print("| | s / image | UNet rows / image | vs one adapter |\n|---|---|---|---|")
        keys = ("single", "dense", "sparse") + (("prior_dense", "prior_sparse0") if a.caption_prior else ())
        for k in keys:
            print(f"| {k} | {r[k + '_s']:.3f} | {r[k + '_rows']:.0f} | {r[k + '_s'] / r['single_s']:.2f}x |")


if __name__ == "__main__":  # pragma: no cover
    main()
