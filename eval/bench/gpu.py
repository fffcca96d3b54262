"""The real-scale check: SD1.5-shaped random weights at 512 px in fp16 on one GPU (or the same tables on the CPU).

    python -m eval.bench.gpu                                   # CUDA: sd15-shaped, 512 px, fp16 (< 8 min on one GPU)
    python -m eval.bench.gpu --device cpu --backbone tiny      # the same table shape on the CPU, small latents

(a) one adapter: `CDMPipeline` (ComposeRequest, one LoRA folder) vs `StableDiffusionPipeline` with the same
    LoRA loaded by diffusers' `load_lora_weights`, same seed (a CPU generator): seconds per image, their
    ratio, and the largest pixel difference of the two images;
(b) composition, n = 1, 2, 4, 8, 16 LoRA sources, one image: seconds per step of the batched pass (shared
    unconditional row, n + 1 rows; per-source, 2n rows) vs n sequential single-adapter passes (2 rows
    each), and the peak memory of the per-source step;
(c) LoRA row routing: 32 rows spread over n = 1, 8, 16 adapters, interleaved and grouped by adapter; peft's
    mixed batch, the gathered and the segmented path (`adapters.lora.route_rows(method=...)`), each against
    the bare UNet on the same rows;
(d) training steps/s, the cached loop (`train_adapter`) vs the naive loop (VAE + text encoder every step).
Ratios from one run; the command is printed with the tables (and written with --out DIR as results.json
and results.md).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: allocations, kernel selection, peft's first routed call
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; process-wide peak


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def backbone(name: str, size: int, device: str, dtype: str):
    """The pipeline to measure: 'sd15-shaped' (SD1.5's architecture, random weights, `size` px) or a name
    `backbone.load` takes; placed by backbone.placement."""
    from prompt_cdm.backbone.loading import build_sd15_shaped, fingerprint, freeze, load_quietly, place
    from prompt_cdm.backbone.placement import Placement

    dev, dt = Placement(device, dtype).resolve()
    if name != "sd15-shaped":
        return load_quietly(name, dt, dev)
    pipe = freeze(build_sd15_shaped(seed=0, sample_size=size // 8))
    pipe.backbone_name = "sd15-shaped"
    pipe.backbone_fingerprint = fingerprint(pipe)
    return place(pipe, dev, dt)


def _lora_folder(pipe, root: Path, seed: int = 0) -> Path:
    from prompt_cdm.adapters import LoraAdapter, LoraAdapterConfig, lora, save_adapter

    cfg = LoraAdapterConfig(rank=8, alpha=8.0)
    fresh = lora.create(pipe, cfg)
    g = torch.Generator().manual_seed(seed)
    ad = LoraAdapter(cfg, {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in fresh.tensors.items()})
    return save_adapter(root / f"lora{seed}", ad, pipe, source_id=f"lora{seed}", data_hash="bench")


def one_adapter(pipe, steps: int, repeats: int, root: Path) -> dict:
    """(a) our single-adapter generate vs diffusers' own pipeline with the same LoRA."""
    import numpy as np

    from prompt_cdm.adapters.kinds import LORA_DIFFUSERS_NAME
    from prompt_cdm.compose.pipeline import CDMPipeline
    from prompt_cdm.compose.request import ComposeRequest

    device = pipe.unet.device
    folder = _lora_folder(pipe, root)
    prompt, seed, g = "a red star on the left, striped background", 0, 5.0
    req = ComposeRequest(prompts=[prompt], steps=steps, guidance=g, seed=seed)
    with CDMPipeline(pipe, adapters=[folder]) as cdm:
        ours_img = cdm(req, output_type="np").images[0]
        ours = _timed(lambda: cdm(req, output_type="np"), device, repeats)
    pipe.load_lora_weights(str(folder), weight_name=LORA_DIFFUSERS_NAME, adapter_name="bench")
    try:
        def theirs_call():
            return pipe(prompt, num_inference_steps=steps, guidance_scale=g, output_type="np",
                        generator=torch.Generator("cpu").manual_seed(seed)).images[0]

        theirs_img = theirs_call()
        theirs = _timed(theirs_call, device, repeats)
    finally:
        pipe.unload_lora_weights()
    return {"ours_s": ours, "diffusers_s": theirs, "ratio": ours / theirs,
            "max_pixel_diff": float(np.abs(ours_img - theirs_img).max())}


def _random_sources(pipe, n: int) -> list:
    from prompt_cdm.adapters import LoraAdapter, LoraAdapterConfig, lora
    from prompt_cdm.compose.denoiser import ComposedSource

    cfg = LoraAdapterConfig(rank=8, alpha=8.0)
    out = []
    for i in range(n):
        fresh = lora.create(pipe, cfg)
        g = torch.Generator().manual_seed(100 + i)
        lora.apply(pipe, LoraAdapter(cfg, {k: torch.randn(v.shape, generator=g) * 0.01
                                           for k, v in fresh.tensors.items()}), f"src{i}")
        out.append(ComposedSource(f"src{i}", "lora", f"src{i}"))
    return out


def composition(pipe, sources: list, ns: list[int], repeats: int) -> list[dict]:
    """(b) seconds per step: batched (shared, per-source) vs n sequential single-adapter passes."""
    import copy

    from prompt_cdm.compose.denoiser import ComposedDenoiser
    from prompt_cdm.estimators import get_estimator

    device = pipe.unet.device
    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(25, device=device)
    t = sched.timesteps[10]
    c, s = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    x = torch.randn(1, c, s, s, generator=torch.Generator().manual_seed(0), device="cpu").to(device, pipe.unet.dtype)
    prompt = "a red star on the left, striped background"

    def denoiser(srcs, uncond):
        return ComposedDenoiser(pipe, srcs, [prompt], get_estimator("uniform"), sched, uncond=uncond)

    def run(d):
        d.reset()
        d(x, t)

    rows = []
    for n in ns:
        shared, per_source = denoiser(sources[:n], "shared"), denoiser(sources[:n], "per-source")
        singles = [denoiser([src], "per-source") for src in sources[:n]]
        tb = _timed(lambda: run(shared), device, repeats)
        _reset_peak(device)
        tp = _timed(lambda: run(per_source), device, repeats)
        peak = _peak_mb(device)
        ts = _timed(lambda: [run(d) for d in singles], device, repeats)
        rows.append({"n": n, "shared_s": tb, "per_source_s": tp, "sequential_s": ts, "speedup_shared": ts / tb,
                     "speedup_per_source": ts / tp, "peak_mb_per_source": peak})
        print(json.dumps(rows[-1]), flush=True)
    return rows


ROUTING_METHODS = ("peft", "gather", "segments")


def routing(pipe, bare_unet, sources: list, ns: list[int], repeats: int, rows: int = 32) -> list[dict]:
    """(c) routed UNet passes (peft / gather / segments) over `rows` rows vs `bare_unet` (a copy of the UNet made
    before any adapter was injected) on the same rows, timed in turns so that a busy machine slows all alike.
    Two layouts: rows interleaved over the adapters (row k: adapter k mod n, a server's mixed batch) and
    grouped by adapter (a composition's stacking)."""
    from prompt_cdm.adapters import lora

    device, dtype = pipe.unet.device, pipe.unet.dtype
    c, s = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, c, s, s, generator=g, device="cpu").to(device, dtype)
    e = torch.randn(rows, 77, pipe.unet.config.cross_attention_dim, generator=g, device="cpu").to(device, dtype)
    t = torch.tensor(500, device=device)
    def bare():
        with torch.no_grad():
            bare_unet(x, t, encoder_hidden_states=e)

    out = []
    for n in ns:
        for layout in ("interleaved", "grouped"):
            if n == 1 and layout == "grouped":
                continue  # one adapter: the two layouts are the same rows
            pick = (lambda k: k % n) if layout == "interleaved" else (lambda k: k * n // rows)
            names = [sources[pick(k)].handle for k in range(rows)]

            def routed(method, names=names):
                def call():
                    with torch.no_grad(), lora.route_rows(pipe.unet, names, method=method):
                        pipe.unet(x, t, encoder_hidden_states=e)
                return call

            calls = {"bare": bare, **{m: routed(m) for m in ROUTING_METHODS}}
            times: dict[str, list[float]] = {k: [] for k in calls}
            for _ in range(repeats):
                for k, fn in calls.items():
                    times[k].append(_timed(fn, device, 1))
            res = {"n": n, "rows": rows, "layout": layout, **{f"{k}_s": statistics.median(v) for k, v in times.items()}}
            for method in ROUTING_METHODS:
                res[f"{method}_overhead"] = res[f"{method}_s"] / res["bare_s"] - 1
            out.append(res)
            print(json.dumps(res), flush=True)
    return out


def training(pipe, steps: int, root: Path, n_images: int = 16) -> dict:
    """(d) LoRA training steps/s: cached latents and text states vs the naive loop."""
    from prompt_cdm.data.sources import open_source
    from prompt_cdm.world.dataset import render_domain

    from .train import run_cached, run_naive

    data = root / "stars"
    render_domain("stars", n_images, data, seed=0)
    source = open_source(data)
    cached = run_cached(pipe, source, "lora", steps, 2, root / "train")
    naive = run_naive(pipe, source, "lora", steps, 2)
    return {"cached_steps_per_s": cached["steps_per_s"], "naive_steps_per_s": naive["steps_per_s"],
            "speedup": cached["steps_per_s"] / naive["steps_per_s"], "cache_build_s": cached["setup_s"]}


def table(res: dict) -> str:
    """The measured tables of `res` as markdown (a table not measured is left out)."""
    lines = [f"command: `{res['command']}`", "", f"device: {res['device']}, dtype {res['dtype']}, backbone "
             f"{res['backbone']} at {res['size']} px", ""]
    if res.get("one_adapter"):
        a = res["one_adapter"]
        lines += ["(a) one adapter, seconds per image", "", "| ours | diffusers | ratio | max pixel diff |",
                  "|---|---|---|---|",
                  f"| {a['ours_s']:.3f} | {a['diffusers_s']:.3f} | {a['ratio']:.3f} | {a['max_pixel_diff']:.2e} |", ""]
    if res.get("composition"):
        lines += ["(b) composition, seconds per step", "",
                  "| n | batched shared | batched per-source | n sequential | speed-up shared | speed-up per-source "
                  "| peak MB per-source |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['n']} | {r['shared_s']:.3f} | {r['per_source_s']:.3f} | {r['sequential_s']:.3f} | "
                  f"{r['speedup_shared']:.2f}x | {r['speedup_per_source']:.2f}x | {r['peak_mb_per_source']:.0f} |"
                  for r in res["composition"]]
        lines += [""]
    if res.get("routing"):
        lines += ["(c) LoRA routing over the bare UNet on the same rows", "",
                  "| n | rows | layout | bare s | " + " | ".join(f"{m} s | {m} overhead" for m in ROUTING_METHODS)
                  + " |", "|---|---|---|---|" + "---|---|" * len(ROUTING_METHODS)]
        lines += [f"| {r['n']} | {r['rows']} | {r['layout']} | {r['bare_s']:.3f} | "
                  + " | ".join(f"{r[m + '_s']:.3f} | {100 * r[m + '_overhead']:.0f}%" for m in ROUTING_METHODS)
                  + " |" for r in res["routing"]]
        lines += [""]
    if res.get("training"):
        t = res["training"]
        lines += ["(d) LoRA training", "", "| cached steps/s | naive steps/s | speed-up | cache build s |",
                  "|---|---|---|---|",
                  f"| {t['cached_steps_per_s']:.2f} | {t['naive_steps_per_s']:.2f} | {t['speedup']:.2f}x | "
                  f"{t['cache_build_s']:.1f} |"]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA) | fp32 | fp16 | bf16")
    p.add_argument("--backbone", default=None, help="sd15-shaped (default on CUDA) or a name backbone.load takes "
                   "(default on the CPU: tiny)")
    p.add_argument("--size", type=int, default=None, help="image size of sd15-shaped (default 512 on CUDA, 64 on the CPU)")
    p.add_argument("--ns", default="1,2,4,8,16", help="source counts of (b)")
    p.add_argument("--routing-ns", default="1,8,16", help="adapter counts of (c)")
    p.add_argument("--routing-rows", type=int, default=32, help="UNet rows of each pass of (c)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps of (a)")
    p.add_argument("--train-steps", type=int, default=20, help="training steps of (d); 0 = skip (d)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave)")
    p.add_argument("--tables", default="a,b,c,d", help="which of the tables a, b, c, d to measure")
    p.add_argument("--out", default=None, help="write results.json and results.md here")
    a = p.parse_args(argv)
    tables = set(a.tables.split(","))
    if tables - set("abcd"):
        p.error(f"--tables takes a, b, c, d; got {a.tables}")
    if a.routing_rows < 1:
        p.error(f"--routing-rows must be at least 1; got {a.routing_rows}")
    from prompt_cdm.backbone.placement import Placement

    device, dtype = Placement(a.device, a.dtype).resolve()
    name = a.backbone or ("sd15-shaped" if device.type == "cuda" else "tiny")
    size = a.size or (512 if device.type == "cuda" else 64)
    if a.threads:
        torch.set_num_threads(a.threads)
    cmd = " ".join(["python -m eval.bench.gpu", *(argv if argv is not None else sys.argv[1:])])
    ns, rns = [int(v) for v in a.ns.split(",")], [int(v) for v in a.routing_ns.split(",")]
    pipe = backbone(name, size, a.device, a.dtype)
    res = {"command": cmd, "device": str(device), "dtype": str(dtype).replace("torch.", ""), "backbone": name,
           "size": size, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    with tempfile.TemporaryDirectory() as tmp:
        if "a" in tables:
            res["one_adapter"] = one_adapter(pipe, a.steps, a.repeats, Path(tmp))
            print(json.dumps(res["one_adapter"]), flush=True)
        if tables & {"b", "c"}:
            import copy

            bare = copy.deepcopy(pipe.unet)  # the UNet before any adapter, for (c)
            sources = _random_sources(pipe, max(ns + rns))
            if "b" in tables:
                res["composition"] = composition(pipe, sources, ns, a.repeats)
            if "c" in tables:
                res["routing"] = routing(pipe, bare, sources, rns, a.repeats, a.routing_rows)
            del bare
            from prompt_cdm.adapters import lora

            for s in sources:
                lora.remove(pipe, s.handle)
        if a.train_steps and "d" in tables:
            res["training"] = training(pipe, a.train_steps, Path(tmp))
    text = table(res)
    print(text)
    if a.out:
        from prompt_cdm.util.io import write_json

        write_json(Path(a.out) / "results.json", res)
        (Path(a.out) / "results.md").write_text(text)
    return res


if __name__ == "__main__":  # pragma: no cover
    main()
