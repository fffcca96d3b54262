"""Memorization: copy detection against a source's training images, and a training-data-free detector.

1. Carlini et al. 2023 ("Extracting Training Data from Diffusion Models", USENIX Security), their
   Stable Diffusion rule: normalized l2 = sqrt(sum (a - b)^2 / d) on pixels in [0, 1], computed per
   tile (each image split into tiles x tiles non-overlapping tiles) and maximised over the tiles, so
   two images are close only where *every* part is close. A generation is a copy when its distance to
   the nearest training image is below a threshold delta (about 0.15 at SD's 512 px; this world's
   value is calibrated below). Relative variant (their CIFAR-10 rule): divide the nearest distance by
   alpha times the mean distance to the k nearest training images, so a generation counts as a copy
   only when it is much closer to one training image than to the rest.
2. Wen et al. 2024 (ICLR, "Detecting, Explaining, and Mitigating Memorization in Diffusion Models"):
   d = 1/T sum_{t <= T} ||eps(x_t, c) - eps(x_t, empty)||_2 over the first T sampling steps; a memorized
   prompt drives a large text-conditional noise prediction from the first step. It needs no training
   data, only the model. For a composition the conditional prediction is the mixed one,
   sum_i w_i eps_i(x_t, c), read off the composed denoiser (the same sampling loop, stopped after T steps).

Shapes: images [N x C x H x W] float in [0, 1]; distances [N x M] (N generations, M training images);
noise predictions [N x C x h x w].

Calibration on the embedded world: `calibrate_world` (the numbers are at COPY_THRESHOLD).
The copy experiment (paper Fig. 4B) is `copy_rate_experiment`, on a source made by `duplicated_source`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

# Calibrated on this world with `calibrate_world(domain, n_train=500, n_query=500, seed=0, tiles=8)`:
# near-duplicates = training renders through the tiny backbone's VAE (the closest any generation of
# this backbone can come to a training image); distinct = held-out renders vs their nearest training
# render. Fewest-errors thresholds: base 0.069, striped 0.080, stars 0.110 (the VAE never saw stars, so
# its copies of them are blurrier). At 0.08: VAE copies detected base 99.8%, striped 99.0%, stars 79.6%;
# held-out renders flagged base 3.6%, striped 3.6%, stars 4.8% -- nearly all of them renders of the same
# scene as a training image (same shapes, colours, sizes and cells; only the sub-cell jitter and the
# background grey differ); 13% (base) and 25% (stars) of 500 held-out renders have such a twin as their
# nearest training image. Renders of other scenes lie at >= 0.079 (base) and >= 0.116 (stars). Medians: VAE copies 0.040 / 0.057 / 0.056,
# held-out renders 0.244 / 0.215 / 0.224 (base / striped / stars). The flagged held-out renders are the
# floor a model that never copies scores; `copy_rate_experiment` reports it.
COPY_THRESHOLD = 0.08
TILES = 8  # 8 x 8 tiles of 8 px on 64 px images, about one small object (Carlini et al.: 128 px tiles on 512 px)


# ---------------------------------------------------------------- pure math


def tiled_l2(a: torch.Tensor, b: torch.Tensor, tiles: int = TILES, chunk: int = 512) -> torch.Tensor:
    """[N x C x H x W], [M x C x H x W] -> [N x M]: per tile sqrt(mean (a - b)^2), max over the tiles x tiles
    tiles (Carlini et al. 2023). Float64 Gram-matrix form, so exact copies give 0 up to ~1e-7."""
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"image shapes differ: {tuple(a.shape[1:])} vs {tuple(b.shape[1:])}")
    if tiles < 1 or tiles > min(a.shape[-2:]):
        raise ValueError(f"tiles must be in [1, {min(a.shape[-2:])}], got {tiles}")
    rows = [torch.tensor_split(torch.arange(a.shape[-2]), tiles), torch.tensor_split(torch.arange(a.shape[-1]), tiles)]
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.float64)
    for s in range(0, a.shape[0], chunk):
        best = None
        for ri in rows[0]:
            for ci in rows[1]:
                ta = a[s: s + chunk][..., ri[0]: ri[-1] + 1, ci[0]: ci[-1] + 1].flatten(1).double()
                tb = b[..., ri[0]: ri[-1] + 1, ci[0]: ci[-1] + 1].flatten(1).double()
                sq = (ta.square().sum(1, keepdim=True) + tb.square().sum(1) - 2 * ta @ tb.T).clamp(min=0)
                d = (sq / ta.shape[1]).sqrt()
                best = d if best is None else torch.maximum(best, d)
        out[s: s + chunk] = best
    return out


def copy_scores(dist: torch.Tensor, k: int | None = None, alpha: float = 0.5) -> torch.Tensor:
    """[N x M] distances -> [N]: the nearest distance, or (k given) the nearest distance divided by
    alpha times the mean of the k nearest (Carlini et al.'s relative rule; their k = 50, alpha = 0.5)."""
    nearest = dist.min(dim=1).values
    if k is None:
        return nearest
    if not 1 <= k <= dist.shape[1]:
        raise ValueError(f"k must be in [1, {dist.shape[1]}] (the number of training images), got {k}")
    knn = dist.topk(k, dim=1, largest=False).values
    return nearest / (alpha * knn.mean(dim=1)).clamp(min=1e-12)


def copy_rate(scores: torch.Tensor, threshold: float) -> float:
    """Fraction of generations whose copy score is below `threshold`."""
    return float((scores < threshold).double().mean()) if scores.numel() else float("nan")


def calibrate(near: torch.Tensor, far: torch.Tensor) -> dict:
    """A copy threshold from the distances of known near-duplicates and of distinct images.

    Separable sets: the midpoint of max(near) and min(far). Otherwise the threshold with the fewest
    errors (near at or above it + far below it). Returns the threshold, both ranges and the rates."""
    near, far = near.double().flatten(), far.double().flatten()
    if near.numel() == 0 or far.numel() == 0:
        raise ValueError("calibration needs near-duplicate and distinct distances")
    if near.max() < far.min():
        thr = float((near.max() + far.min()) / 2)
    else:
        cands = torch.cat([near, far]).unique()
        errors = torch.stack([(near >= c).sum() + (far < c).sum() for c in cands])
        thr = float(cands[int(errors.argmin())])

    def q(x, p):
        return float(torch.quantile(x, p))

    return {"threshold": thr, "near_max": float(near.max()), "near_q99": q(near, 0.99), "near_median": q(near, 0.5),
            "far_min": float(far.min()), "far_q01": q(far, 0.01), "far_median": q(far, 0.5),
            "near_detected": copy_rate(near, thr), "far_flagged": copy_rate(far, thr),
            "n_near": near.numel(), "n_far": far.numel()}


def text_noise_norm(eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
    """||eps(x_t, c) - eps(x_t, empty)||_2 per image (Wen et al. 2024): [N x ...] x 2 -> [N]."""
    return (eps_cond - eps_uncond).flatten(1).double().norm(dim=1)


# ---------------------------------------------------------------- images


def to_unit(images) -> torch.Tensor:
    """PIL images, uint8 arrays [N x H x W x 3] or a float tensor in [0, 1] -> float [N x 3 x H x W] in [0, 1]."""
    import numpy as np

    if torch.is_tensor(images):
        return images.float() / 255 if images.dtype == torch.uint8 else images.float()
    arr = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im, dtype=np.float32) for im in images])
    return torch.from_numpy(arr / 255.0).permute(0, 3, 1, 2).contiguous()


def nearest_training(generated, training, tiles: int = TILES, k: int | None = None, alpha: float = 0.5) -> dict:
    """Copy scores of generated images against training images (PIL lists or tensors):
    {"scores": [N], "nearest": [N] training index, "distance": [N] nearest tiled l2}."""
    dist = tiled_l2(to_unit(generated), to_unit(training), tiles)
    d, idx = dist.min(dim=1)
    return {"scores": copy_scores(dist, k, alpha), "nearest": idx, "distance": d}


# ---------------------------------------------------------------- calibration on the embedded world


@torch.no_grad()
def vae_roundtrip(pipe, images) -> list:
    """Images through the backbone's VAE (encode mean, decode): what a perfect copy by this backbone looks like."""
    from prompt_cdm.compose.text import decode

    x = to_unit(images) * 2 - 1
    lat = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    return decode(pipe, lat)


def calibrate_world(domain: str = "base", n_train: int = 500, n_query: int = 200, seed: int = 0, pipe=None,
                    tiles: int = TILES) -> dict:
    """Calibrate the copy threshold on rendered images: near-duplicates = the first n_query training
    renders through the tiny backbone's VAE; distinct = n_query held-out renders (never trained on),
    each against its nearest of the n_train training renders."""
    from prompt_cdm.world.dataset import examples

    if pipe is None:
        from prompt_cdm.backbone.loading import load_quietly

        pipe = load_quietly("tiny")
    train = [e.image for e in examples(domain, n_train, seed=seed)]
    held = [e.image for e in examples(domain, n_query, seed=seed, heldout=True)]
    near = tiled_l2(to_unit(vae_roundtrip(pipe, train[:n_query])), to_unit(train), tiles).min(dim=1).values
    far = tiled_l2(to_unit(held), to_unit(train), tiles).min(dim=1).values
    return dict(calibrate(near, far), domain=domain, n_train=n_train, tiles=tiles)


# ---------------------------------------------------------------- Wen et al.: text-conditional noise norm


class _Stop(Exception):
    """Ends the sampling loop after the first steps (raised from its per-step callback)."""


@torch.no_grad()
def wen_scores(pipe, prompts: Sequence[str], sources: Sequence | None = None, estimator=None, *, steps: int = 25,
               first_steps: int = 5, guidance: float = 7.5, seed: int = 0, uncond: str | None = None,
               scheduler=None, prompt_prior=None) -> torch.Tensor:
    """[N] Wen et al.'s score per prompt: the mean over the first `first_steps` of `steps` sampling steps of
    ||eps(x_t, c) - eps(x_t, empty)||_2, on the trajectory the sampler actually takes (guidance `guidance`).

    sources=None: the backbone alone (`ComposedSource.plain()`, the n = 1 composition). Otherwise the composition of `sources`
    (`compose.ComposedSource`s already applied to `pipe`) with `estimator` (default uniform); its conditional
    prediction is the mixed sum_i w_i eps_i(c) and its unconditional one the shared row (or the
    weight-mixed per-source rows). uncond: default per-source for one source (= plain diffusers with that
    adapter), else shared. prompt_prior: lambda(c) per prompt [N x n] (compose.ComposedDenoiser). One batch,
    noise from torch.Generator(seed)."""
    import copy

    from prompt_cdm.compose.request import default_uncond
    from prompt_cdm.core.mixing import mix
    from prompt_cdm.core.sampling import sample

    if guidance == 1.0:
        raise ValueError("the score needs the unconditional prediction: use a guidance scale other than 1")
    if not 1 <= first_steps <= steps:
        raise ValueError(f"first_steps must be in [1, steps={steps}], got {first_steps}")
    prompts = list(prompts)
    sched = copy.deepcopy(scheduler if scheduler is not None else pipe.scheduler)
    gen = torch.Generator().manual_seed(seed)
    c, size = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    noise = torch.randn(len(prompts), c, size, size, generator=gen)
    norms: list[torch.Tensor] = []
    from prompt_cdm.compose.denoiser import ComposedDenoiser, ComposedSource
    from prompt_cdm.estimators import get_estimator

    sources = [ComposedSource.plain()] if sources is None else list(sources)
    denoise = ComposedDenoiser(pipe, sources, prompts, estimator or get_estimator("uniform"), sched,
                               guidance_scale=guidance, prompt_prior=prompt_prior,
                               uncond=uncond or default_uncond(len(sources)))

    def read():
        rec = denoise.last
        w = rec.out.weights
        eps_u = rec.eps_uncond if rec.eps_uncond.dim() < rec.eps_rows.dim() else mix(rec.eps_uncond, w)
        return text_noise_norm(mix(rec.eps_rows, w), eps_u)

    def callback(i, t, x):
        denoise.on_step(i, t, x)
        norms.append(read())
        if len(norms) >= first_steps:
            raise _Stop

    try:
        sample(denoise, sched, noise, steps, generator=gen, callback=callback)
    except _Stop:
        pass
    return torch.stack(norms).mean(0)


# ---------------------------------------------------------------- the copy experiment (paper Fig. 4B)


def duplicated_source(domain: str, out: str | Path, n_unique: int = 400, n_duplicated: int = 10, copies: int = 30,
                      seed: int = 0) -> Path:
    """An imagefolder of `domain` in which `n_duplicated` images appear `copies` times each (the rest once):
    n_unique + n_duplicated * copies training items. Rows of the duplicated images carry
    `"duplicated": true`; their captions are the prompts of the copy experiment."""
    from prompt_cdm.util.io import save_image, write_jsonl
    from prompt_cdm.world.dataset import examples

    exs = examples(domain, n_unique + n_duplicated, seed=seed)
    out = Path(out)
    rows = []
    for i, e in enumerate(exs):
        dup = i < n_duplicated
        for c in range(copies if dup else 1):
            name = f"dup{i:03d}_{c:03d}.png" if dup else f"{i:06d}.png"
            save_image(out / name, e.image)
            rows.append({"file_name": name, "text": e.caption, "spec": e.spec.to_dict(), "duplicated": dup})
    write_jsonl(out / "metadata.jsonl", rows)
    return out


def _training_images(folder: str | Path) -> tuple[list, list[dict]]:
    """The distinct training images of an imagefolder (byte-identical files once) and their metadata rows."""
    import json

    from PIL import Image

    from prompt_cdm.util.io import sha256_file

    folder = Path(folder)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    seen, images, kept = set(), [], []
    for r in rows:
        digest = sha256_file(folder / r["file_name"])
        if digest in seen:
            continue
        seen.add(digest)
        with Image.open(folder / r["file_name"]) as im:
            images.append(im.convert("RGB"))
        kept.append(r)
    return images, kept


def copy_rate_experiment(pipe, adapters: dict[str, str | Path], target: str, train_folder: str | Path, *,
                         n_per_prompt: int = 8, threshold: float = COPY_THRESHOLD, router: str = "uniform",
                         steps: int = 25, guidance: float = 5.0, seed: int = 0, wen_first_steps: int = 5,
                         n_floor: int = 200, uncond: str = "per-source",
                         prior_data: dict[str, str | Path] | None = None) -> dict:
    """Copy rate of `target`'s adapter alone vs the composition of all `adapters` ({name: folder}) on the
    captions of `target`'s duplicated training images (`duplicated_source`), n_per_prompt seeds each
    (CDM paper Fig. 4B: mixing sources lowers the copy rate). Also Wen et al.'s score of each setting and,
    for a shapes-world folder, `heldout_floor`: the rate n_floor held-out renders of its domain score (what a
    model that never copies but draws the same scenes would get). uncond: the composition's guidance rows
    (compose.UNCOND_MODES; the adapter alone is always guided by its own row, as plain diffusers does).
    prior_data: {name: imagefolder} of every adapter's training data -> the composition also weighs each
    source by the caption prior lambda(c) (caption_prior.py) of those captions. The adapters are removed
    afterwards.

        duplicated_source("stars", "runs/mem/stars_dup")           # then train an adapter on it, e.g.
        # prompt-cdm train --source runs/mem/stars_dup --out runs/mem/adapters/stars_dup
        copy_rate_experiment(load_quietly("tiny"), {"stars_dup": "runs/mem/adapters/stars_dup",
                             "striped": ..., "crosses": ...}, "stars_dup", "runs/mem/stars_dup")"""
    from prompt_cdm.compose.pipeline import CDMPipeline
    from prompt_cdm.compose.request import ComposeRequest

    if target not in adapters:
        raise ValueError(f"target {target!r} is not among the adapters {sorted(adapters)}")
    train, rows = _training_images(train_folder)
    prompts = [r["text"] for r in rows if r.get("duplicated")] or [r["text"] for r in rows]
    prompts = [p for p in prompts for _ in range(n_per_prompt)]
    out = {"target": target, "threshold": threshold, "n_generations": len(prompts), "n_training": len(train),
           "router": router, "uncond": uncond, "caption_prior": prior_data is not None}
    stats = None
    if prior_data is not None:
        missing = sorted(set(adapters) - set(prior_data))
        if missing:
            raise ValueError(f"prior_data lacks the training data of {missing}: the caption prior needs every "
                             "composed source's captions")
        from prompt_cdm.routing.routers import folder_caption_stats

        stats = [folder_caption_stats(pipe.tokenizer, prior_data[n]) for n in adapters]
    domain = rows[0].get("spec", {}).get("domain") if isinstance(rows[0].get("spec"), dict) else None
    if domain:  # the rate of a model that never copies: held-out renders of the same domain
        from prompt_cdm.world.dataset import examples

        held = [e.image for e in examples(domain, n_floor, seed=seed, heldout=True)]
        out["heldout_floor"] = copy_rate(nearest_training(held, train)["scores"], threshold)
    for setting, names in (("alone", [target]), ("composed", list(adapters))):
        composed = len(names) > 1
        with CDMPipeline(pipe, adapters=[adapters[n] for n in names], caption_stats=stats if composed else None) as cdm:
            request = ComposeRequest(prompts, estimator=router if composed else "uniform", uncond=uncond if composed
                                     else "per-source", caption_prior=1.0 if composed and stats else None, steps=steps,
                                     guidance=guidance, seed=seed)
            plan = cdm.plan(request)
            images = cdm.run(plan).images
            wen = wen_scores(pipe, prompts, plan.sources, plan.estimator, steps=steps, first_steps=wen_first_steps,
                             guidance=guidance, seed=seed, uncond=plan.uncond, prompt_prior=plan.prompt_prior)
        near = nearest_training(images, train)
        out[setting] = {"sources": names, "copy_rate": copy_rate(near["scores"], threshold),
                        "mean_nearest_distance": float(near["distance"].mean()), "wen_mean": float(wen.mean())}
    return out



def main(argv: list[str] | None = None) -> None:
    """The copy experiment from the command line: build a duplicated source, train its LoRA, compare its copy
    rate alone vs composed with other sources' adapters."""
    import argparse
    import json

    p = argparse.ArgumentParser(description="copy rate of a duplicated source's adapter alone vs composed "
                                "(CDM paper Fig. 4B)")
    p.add_argument("--domain", default="stars", help="shapes-world domain of the duplicated source")
    p.add_argument("--unique", type=int, default=40, help="images seen once")
    p.add_argument("--duplicated", type=int, default=5, help="images repeated --copies times (the test captions)")
    p.add_argument("--copies", type=int, default=40)
    p.add_argument("--steps", type=int, default=1500, help="LoRA training steps (batch 8)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--compose-with", required=True, metavar="DIR,DIR", help="other sources' adapter folders")
    p.add_argument("--router", default="uniform")
    p.add_argument("--caption-prior", metavar="DIR,DIR", default="",
                   help="weigh the composition by the caption prior: the --compose-with sources' training imagefolders, "
                   "in the same order")
    p.add_argument("--uncond", default="per-source")
    p.add_argument("--per-prompt", type=int, default=16, help="generations per duplicated caption")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from prompt_cdm.backbone.loading import load_quietly
    from prompt_cdm.training.train import LoraTrain, TrainConfig, is_complete, train

    out = Path(a.out)
    name = f"{a.domain}_dup"
    data = out / name
    if not (data / "metadata.jsonl").is_file():
        duplicated_source(a.domain, data, a.unique, a.duplicated, a.copies, seed=a.seed)
    adapter = out / "adapters" / name
    if not is_complete(adapter):  # resumes an interrupted training run
        cfg = TrainConfig(kind="lora", steps=a.steps, batch_size=8, threads=a.threads, n_samples=4, seed=a.seed,
                          lora=LoraTrain(rank=a.rank, alpha=float(a.rank), lr=1e-3))
        train("tiny", [str(data)], cfg, adapter, source_id=name)
    others = {Path(d).name: Path(d) for d in a.compose_with.split(",") if d}
    prior_data = None
    if a.caption_prior:
        folders = [Path(d) for d in a.caption_prior.split(",") if d]
        if len(folders) != len(others):
            p.error(f"--caption-prior names {len(folders)} folders for {len(others)} --compose-with adapters")
        prior_data = {name: data, **dict(zip(others, folders))}
    res = copy_rate_experiment(load_quietly("tiny"), {name: adapter, **others}, name, data,
                               n_per_prompt=a.per_prompt, router=a.router, seed=a.seed, uncond=a.uncond,
                               steps=a.sample_steps, wen_first_steps=min(5, a.sample_steps), prior_data=prior_data)
    from prompt_cdm.util.io import write_json

    write_json(out / ("copy_experiment_caption_prior.json" if prior_data else "copy_experiment.json"), res)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":  # pragma: no cover
    main()
