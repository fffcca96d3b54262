"""Adapter training throughput: prompt_cdm's cached path vs a naive loop, per adapter kind.

    python -m eval.bench.train --steps 150 --threads 2
    python -m eval.bench.train --backbone sd15-shaped --sample-size 16 --steps 10 --batch 2 --n-images 40
    python -m eval.bench.train --backbone sd15-shaped --sample-size 64 --n-images 6 --steps 8 --batch 1  # SD's 512 px

The cached path is `prompt_cdm.train.train_adapter` itself (VAE latents and, for LoRA, the caption
embeddings computed once per source; the soft prompt still runs the text encoder on its ids every
step, since its own rows are what train). The naive loop is what diffusers' example training scripts do:
every step decodes the batch's PNGs, encodes them with the VAE and the captions with the text encoder,
then the same UNet forward/backward, min-SNR loss and AdamW step. Each (kind, path) runs in its own
process, so peak memory (max RSS on CPU, max allocated on CUDA) is its own. Figures are ratios measured in
one run on one machine; the one-time cache build is reported beside them.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

KINDS = ("lora", "soft-prompt", "deep-prompt")  # the kinds the bench compares by default (prompt_cdm.adapters.kinds.KINDS)
PATHS = ("cached", "naive")


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _config(kind: str, steps: int, batch: int):
    from prompt_cdm.training.train import TrainConfig

    return TrainConfig(kind=kind, steps=steps, batch_size=batch, checkpoint_every=steps, n_samples=0)


def run_cached(pipe, source, kind: str, steps: int, batch: int, work: Path) -> dict:
    from prompt_cdm.training.train import train_adapter

    t0 = time.time()
    r = train_adapter(source, pipe, _config(kind, steps, batch), work / f"{kind}-cached", progress=False)
    total = time.time() - t0
    loop = steps / r.steps_per_s
    return {"steps_per_s": r.steps_per_s, "loop_s": loop, "setup_s": total - loop}


def run_naive(pipe, source, kind: str, steps: int, batch: int) -> dict:
    """diffusers-example style: encode images and captions inside every step."""
    from diffusers import DDPMScheduler

    from prompt_cdm.training.train import (_Run, _images_tensor, _loss_weights, _token_ids, batch_indices,
                                  native_resolution, step_generator)

    cfg = _config(kind, steps, batch)
    run = _Run(pipe, cfg, source.id)
    try:
        sched = DDPMScheduler.from_config(pipe.scheduler.config)
        vae, unet, te = pipe.vae, pipe.unet, pipe.text_encoder
        device, res = unet.device, native_resolution(pipe)
        opt = torch.optim.AdamW(list(run.params.values()), lr=cfg.lr, weight_decay=run.training.weight_decay)
        captions = [run.prompt(c) for c in source.captions]
        run.train_mode(True)
        t0 = time.time()
        for step in range(steps):
            gen = step_generator(cfg.seed, step)
            idx = batch_indices(len(source), batch, cfg.seed, step).tolist()
            x = _images_tensor([source.image(i) for i in idx], res).to(device)  # decode the PNGs
            with torch.no_grad():
                x0 = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
            ids = _token_ids(pipe, [captions[i] for i in idx]).to(device)
            with torch.set_grad_enabled(not run.training.caches_text):  # a frozen encoder needs no graph
                states = te(ids)[0]
            noise = torch.randn(x0.shape, generator=gen).to(device)
            t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
            xt = sched.add_noise(x0, noise, t.to(device))
            pred = unet(xt, t.to(device), encoder_hidden_states=states).sample
            per_item = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
            loss = (_loss_weights(sched, t, cfg.min_snr_gamma).to(device) * per_item).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(run.params.values()), cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # queued kernels belong to the loop
        loop = time.time() - t0
    finally:
        run.close()
    return {"steps_per_s": steps / loop, "loop_s": loop, "setup_s": 0.0}


def worker(a) -> None:
    """One (kind, path) in this process; prints one JSON line."""
    from prompt_cdm.data.sources import open_source

    from .compose import _pipe

    torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = _pipe(a.backbone, a.sample_size).to(device)
    source = open_source(a.data)
    base_mb = _peak_mb(device)
    with tempfile.TemporaryDirectory() as tmp:
        if a.path == "cached":
            r = run_cached(pipe, source, a.kind, a.steps, a.batch, Path(tmp))
        else:
            r = run_naive(pipe, source, a.kind, a.steps, a.batch)
    r.update(kind=a.kind, path=a.path, peak_mb=_peak_mb(device), loaded_mb=base_mb, device=str(device))
    print(json.dumps(r))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="tiny", help="'tiny', 'sd15-shaped' (random weights) or an SD folder")
    p.add_argument("--sample-size", type=int, default=16, help="sd15-shaped: latent size (images are 8x larger)")
    p.add_argument("--domain", default="stars", help="shapes-world domain rendered as the source")
    p.add_argument("--n-images", type=int, default=500)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--out", default=None, help="write results.json here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--kind", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)

    from prompt_cdm.world.dataset import render_domain

    cmd = (f"python -m eval.bench.train --backbone {a.backbone} --sample-size {a.sample_size} --domain {a.domain} "
           f"--n-images {a.n_images} "
           f"--steps {a.steps} --batch {a.batch} --threads {a.threads} --kinds {a.kinds}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / a.domain
        render_domain(a.domain, a.n_images, data, seed=0)
        for kind in a.kinds.split(","):
            for path in PATHS:
                out = subprocess.run([sys.executable, "-m", "eval.bench.train", "--worker", "--kind", kind,
                                      "--path", path, "--data", str(data), "--backbone", a.backbone,
                                      "--sample-size", str(a.sample_size),
                                      "--steps", str(a.steps), "--batch", str(a.batch), "--threads",
                                      str(a.threads)], capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    raise SystemExit(f"{kind}/{path} failed:\n{out.stderr[-3000:]}")
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    by = {(r["kind"], r["path"]): r for r in rows}
    lines = [f"command: {cmd}", "",
             "| kind | cached steps/s | naive steps/s | speed-up | cache build s | peak MB cached | peak MB naive |",
             "|---|---|---|---|---|---|---|"]
    summary = {}
    for kind in a.kinds.split(","):
        c, n = by[(kind, "cached")], by[(kind, "naive")]
        summary[kind] = c["steps_per_s"] / n["steps_per_s"]
        lines.append(f"| {kind} | {c['steps_per_s']:.2f} | {n['steps_per_s']:.2f} | {summary[kind]:.2f}x | "
                     f"{c['setup_s']:.1f} | {c['peak_mb']:.0f} | {n['peak_mb']:.0f} |")
    print("\n".join(lines))
    if a.out:
        from prompt_cdm.util.io import write_json

        write_json(Path(a.out) / "results.json", {"command": cmd, "rows": rows, "speedup": summary})


if __name__ == "__main__":  # pragma: no cover
    main()
