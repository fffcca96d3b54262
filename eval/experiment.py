"""The CDM paper's table on the embedded world: paragon vs compositions, forgetting, TIFA, attribution.

    prompt-cdm experiment recipes/paper_small.toml [--set key=value ...] [--smoke]

Stages, each cached in OUT/stages/<stage>.json (a killed run resumes at the first unfinished stage;
the training and evaluation inside a stage resume too):
 1. data      render every domain (OUT/data/<domain>) and K random splits of their union (OUT/splits/)
 2. train     one adapter per domain, one per split, and the paragon on the union of all data
 3. eval      judge-TIFA / FID on each domain's held-out captions: the paragon alone; the composition of the
              domain sources and of the split sources under every router (attribution for domain sources)
 4. forget    forget one domain source in a copy of the registry: its wall time (+ retraining the classifier
              router) vs the paragon's retraining time, `verify`, and the FID of the rest before vs after
 5. memorization  a source with duplicated images: copy rate (tiled l2) and Wen's score of its adapter alone
              vs composed with the other domain sources (the paper's Figure 4B)
 6. report    report.md, results.json and PNG plots, each figure next to the command that made it
Where a result differs from the paper's claim, the report says so.
"""
from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

class ExperimentError(ValueError):
    """The experiment cannot run as asked (e.g. its folder holds a run with other settings)."""


@dataclass
class ExperimentConfig:
    out: str = field(default="runs/paper_small", metadata={"help": "output folder"})
    backbone: str = "tiny"
    domains: list[str] = field(default_factory=list, metadata={"help": "source domains ([] = all 8)"})
    n_images: int = 500          # per domain: 8 x 500 = 4000 images in the union the paragon sees
    splits: int = 8              # random splits of the union (the paper's 8-split experiment)
    kind: str = "lora"           # adapter kind of every source and of the paragon
    steps: int = 600             # per source adapter (recipes/adapter_train.toml)
    paragon_steps: int = 2400    # the paragon sees all data: half the 8 sources' total budget (8 x 600)
    batch_size: int = 8          # training batch of every adapter
    lora_rank: int = 4
    lora_lr: float = 1e-3
    resolution: int = 0          # training resolution, 0 = the backbone's native size (tiny 64, SD1.5 512)
    mixed_precision: str = "no"  # "fp16" / "bf16" on a GPU (accelerate)
    domain_adapters: str = ""    # reuse trained domain adapters (folder of <domain>/), "" = train here
    routers: list[str] = field(default_factory=lambda: ["uniform", "classifier", "ratio", "ito"])
    split_routers: list[str] = field(default_factory=lambda: ["uniform", "classifier"])  # for the split sources
    router_steps: int = 400      # classifier / ratio-head training steps (prompt-cdm router train's default)
    # guidance's unconditional row: per-source (each source's own model, 2n rows; what a single adapter does in
    # diffusers, so the paragon and the compositions are guided alike) or shared (the frozen backbone, n+1 rows)
    uncond: str = "per-source"
    n_eval: int = 8              # held-out captions per domain
    sample_steps: int = 25
    guidance: float = 5.0
    seed: int = 0
    forget: str = "stars"        # the domain source to forget
    mem_domain: str = "striped"  # memorization: this domain's source, rebuilt with duplicated images
    mem_unique: int = 400        # images seen once
    mem_duplicated: int = 10     # images seen mem_copies times each (their captions are the test prompts)
    mem_copies: int = 30
    mem_per_prompt: int = 4      # generations per duplicated caption
    mem_steps: int = 0           # training steps of the duplicated source's LoRA (0 = steps)
    mem_lora_rank: int = 0       # its LoRA rank (0 = lora_rank)
    threads: int = 2
    device: str = "auto"         # where every model runs (backbone.placement): auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"          # the backbone's precision: auto | fp32 | fp16 | bf16

    def __post_init__(self):
        from prompt_cdm.backbone.placement import Placement
        from prompt_cdm.world.domains import SOURCE_DOMAINS

        Placement(self.device, self.dtype)

        bad = [d for d in self.domains if d not in SOURCE_DOMAINS]
        if bad:
            raise ValueError(f"unknown domains {bad}; valid: {', '.join(SOURCE_DOMAINS)}")
        doms = self.domains or list(SOURCE_DOMAINS)
        if self.forget not in doms:
            raise ValueError(f"forget={self.forget!r} is not one of the domains {doms}")
        if self.mem_domain not in doms:
            raise ValueError(f"mem_domain={self.mem_domain!r} is not one of the domains {doms}")
        if self.uncond not in ("shared", "per-source"):
            raise ValueError(f"uncond must be shared or per-source, got {self.uncond!r}")
        if min(self.n_images, self.splits, self.steps, self.paragon_steps, self.n_eval, self.sample_steps) < 1:
            raise ValueError("n_images, splits, steps, paragon_steps, n_eval and sample_steps must be >= 1")

    @property
    def domain_list(self) -> list[str]:
        from prompt_cdm.world.domains import SOURCE_DOMAINS

        return list(self.domains or SOURCE_DOMAINS)


class Stages:
    """OUT/stages/<name>.json: run a stage once, keep its result. OUT/stages/config.json pins the settings
    (all but `threads`): a folder holding a run with other settings is refused, not mixed."""

    def __init__(self, out: Path, cfg: ExperimentConfig):
        from prompt_cdm.util.io import write_json

        self.dir = out / "stages"
        ident = {k: v for k, v in asdict(cfg).items() if k != "threads"}
        pin = self.dir / "config.json"
        if pin.is_file() and json.loads(pin.read_text()) != ident:
            old = json.loads(pin.read_text())
            diff = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
            raise ExperimentError(f"{out} holds an experiment with other settings ({', '.join(diff)}); "
                             f"delete {out} or pass --set out=\"another/folder\"")
        write_json(pin, ident)

    def run(self, name: str, fn) -> dict:
        from prompt_cdm.util.io import write_json

        path = self.dir / f"{name}.json"
        if path.is_file():
            print(f"[{name}] done before, kept ({path})")
            return json.loads(path.read_text())
        print(f"[{name}] ...", flush=True)
        t0 = time.time()
        res = fn()
        res["stage_seconds"] = time.time() - t0
        write_json(path, res)
        return res


def write_splits(folders: list[Path], k: int, out: Path, seed: int) -> list[Path]:
    """K uniform random splits of the union of imagefolders, as imagefolders OUT/split_i."""
    from prompt_cdm.util.io import write_jsonl
    from prompt_cdm.world.dataset import read_imagefolder

    items = [(f, r) for f in folders for r in read_imagefolder(f)]
    random.Random(seed).shuffle(items)
    made = []
    for i in range(k):
        dst = out / f"split{i}"
        if not (dst / "metadata.jsonl").is_file():
            dst.mkdir(parents=True, exist_ok=True)
            rows = []
            for j, (f, r) in enumerate(items[i::k]):
                name = f"{j:06d}.png"
                shutil.copyfile(f / r["file_name"], dst / name)
                rows.append(dict(r, file_name=name, **({"spec": r["spec"].to_dict()} if "spec" in r else {})))
            write_jsonl(dst / "metadata.jsonl", rows)  # last: its presence means complete
        made.append(dst)
    return made


def _train_cfg(cfg: ExperimentConfig, steps: int, rank: int = 0):
    """An adapter's training config; rank 0 = cfg.lora_rank."""
    from prompt_cdm.training.train import LoraTrain, TrainConfig

    rank = rank or cfg.lora_rank
    return TrainConfig(kind=cfg.kind, steps=steps, batch_size=cfg.batch_size, resolution=cfg.resolution,
                       mixed_precision=cfg.mixed_precision, threads=cfg.threads, n_samples=4,
                       device=cfg.device, dtype=cfg.dtype,
                       sample_steps=cfg.sample_steps, guidance_scale=cfg.guidance,
                       lora=LoraTrain(rank=rank, alpha=float(rank), lr=cfg.lora_lr))


def stage_train(cfg: ExperimentConfig, out: Path, data: list[Path], splits: list[Path]) -> dict:
    from prompt_cdm.training.train import is_complete, train, train_all

    res = {}
    if not cfg.domain_adapters:
        r = train_all(cfg.backbone, [str(p) for p in data], _train_cfg(cfg, cfg.steps), out / "cdm_domains")
        res["domains"] = [asdict(x) for x in r]
    r = train_all(cfg.backbone, [str(p) for p in splits], _train_cfg(cfg, cfg.steps), out / "cdm_splits")
    res["splits"] = [asdict(x) for x in r]
    par = out / "paragon"
    if not is_complete(par):
        r = train(cfg.backbone, [str(p) for p in data], _train_cfg(cfg, cfg.paragon_steps), par, source_id="paragon")
        res["paragon"] = asdict(r)
    else:
        res["paragon"] = {"folder": str(par), "skipped": True}
    return res


def domain_adapters(cfg: ExperimentConfig, out: Path) -> Path:
    return Path(cfg.domain_adapters) if cfg.domain_adapters else out / "cdm_domains" / "adapters"


def stage_eval(cfg: ExperimentConfig, out: Path) -> dict:
    from prompt_cdm.backbone.loading import load_quietly

    from . import composition_quality as cq
    from .adapter_quality import adapter_images
    from .world_scoring import heldout, score_world, shipped_judge

    kw = dict(domains=cfg.domain_list, n=cfg.n_eval, steps=cfg.sample_steps, guidance=cfg.guidance, seed=cfg.seed,
              backbone=cfg.backbone, router_steps=cfg.router_steps, uncond=cfg.uncond)
    dom = cq.evaluate(str(domain_adapters(cfg, out)), str(out / "data"), str(out / "eval_domains"),
                      routers=cfg.routers, **kw)
    spl = cq.evaluate(str(out / "cdm_splits" / "adapters"), str(out / "splits"), str(out / "eval_splits"),
                      routers=cfg.split_routers, sources=[f"split{i}" for i in range(cfg.splits)], **kw)
    pipe, judge = load_quietly(cfg.backbone, cfg.dtype, cfg.device), shipped_judge()
    paragon = {}
    for d in cfg.domain_list:
        held = heldout(d, cfg.n_eval, cfg.seed)
        t0 = time.time()
        images = adapter_images(pipe, out / "paragon", [e.caption for e in held], cfg.sample_steps, cfg.guidance,
                                cfg.seed)
        paragon[d] = dict(score_world(judge, d, held, images), seconds=time.time() - t0)
    mean = {k: sum(c[k] for c in paragon.values()) / len(paragon) for k in ("score", "fid_judge", "seconds")}
    return {"domains": dom["summary"], "splits": spl["summary"], "paragon": mean, "paragon_cells": paragon,
            "domain_cells": dom["cells"], "split_cells": spl["cells"]}


def stage_forget(cfg: ExperimentConfig, out: Path, train_res: dict, eval_res: dict) -> dict:
    """Forget one domain source in a copy of the evaluated registry; re-evaluate the others (classifier)."""
    from prompt_cdm.backbone.loading import load_quietly
    from prompt_cdm.registry.registry import Registry
    from prompt_cdm.routing.routers import RouterTrainConfig, train_router

    from . import composition_quality as cq

    src, dst = out / "eval_domains" / "registry", out / "forget" / "registry"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    reg = Registry(dst)
    t0 = time.time()
    report = reg.forget(cfg.forget)
    forget_s = time.time() - t0
    leftovers = reg.verify_forgotten(cfg.forget)
    rest = [d for d in cfg.domain_list if d != cfg.forget]
    router = "classifier" if len(rest) > 1 and "classifier" in cfg.routers else "uniform"
    router_s = 0.0
    if router == "classifier":  # the stale n-way classifier is retrained on the others' cached latents
        t0 = time.time()
        train_router(reg, "classifier", load_quietly(cfg.backbone, cfg.dtype, cfg.device).scheduler.alphas_cumprod,
                     RouterTrainConfig(steps=cfg.router_steps), rest)
        router_s = time.time() - t0
    after = cq.evaluate(str(domain_adapters(cfg, out)), str(out / "data"), str(out / "forget"), domains=rest,
                        routers=[router], n=cfg.n_eval, steps=cfg.sample_steps, guidance=cfg.guidance,
                        seed=cfg.seed, backbone=cfg.backbone, router_steps=cfg.router_steps, uncond=cfg.uncond)
    before = [eval_res["domain_cells"][f"{router}/{d}"] for d in rest]
    fid_before = sum(c["fid_judge"] for c in before) / len(before)
    tifa_before = sum(c["score"] for c in before) / len(before)
    par = train_res.get("paragon", {})
    paragon_s = par.get("wall_s") if not par.get("skipped") else None
    return {"forgotten": cfg.forget, "router": router, "deleted": report.deleted, "stale_routers": report.stale_routers,
            "verify_leftovers": leftovers, "forget_seconds": forget_s, "router_retrain_seconds": router_s,
            "paragon_retrain_seconds": paragon_s,
            "fid_before": fid_before, "fid_after": after["summary"][router]["fid_judge"],
            "tifa_before": tifa_before, "tifa_after": after["summary"][router]["score"]}


def stage_memorization(cfg: ExperimentConfig, out: Path) -> dict:
    """CDM paper Fig. 4B: a source with duplicated images, its adapter alone vs composed with the other domains."""
    from prompt_cdm.backbone.loading import load_quietly
    from prompt_cdm.training.train import is_complete, train

    from .memorization import copy_rate_experiment, duplicated_source

    name = f"{cfg.mem_domain}_dup"
    data = out / "memorization" / name
    if not (data / "metadata.jsonl").is_file():
        duplicated_source(cfg.mem_domain, data, cfg.mem_unique, cfg.mem_duplicated, cfg.mem_copies, seed=cfg.seed)
    adapter = out / "memorization" / "adapters" / name
    if not is_complete(adapter):
        train(cfg.backbone, [str(data)], _train_cfg(cfg, cfg.mem_steps or cfg.steps, cfg.mem_lora_rank), adapter,
              source_id=name)
    others = {d: domain_adapters(cfg, out) / d for d in cfg.domain_list if d != cfg.mem_domain}
    return copy_rate_experiment(load_quietly(cfg.backbone, cfg.dtype, cfg.device), {name: adapter, **others}, name, data,
                                n_per_prompt=cfg.mem_per_prompt, steps=cfg.sample_steps, guidance=cfg.guidance,
                                seed=cfg.seed, wen_first_steps=min(5, cfg.sample_steps), uncond=cfg.uncond)


def run_experiment(cfg: ExperimentConfig, command: str = "") -> Path:
    from prompt_cdm.training.train import render_world_sources

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    st = Stages(out, cfg)
    t0 = time.time()
    data = render_world_sources(cfg.domain_list, out, cfg.n_images, seed=cfg.seed)
    splits = write_splits(data, cfg.splits, out / "splits", cfg.seed)
    tr = st.run("train", lambda: stage_train(cfg, out, data, splits))
    ev = st.run("eval", lambda: stage_eval(cfg, out))
    fg = st.run("forget", lambda: stage_forget(cfg, out, tr, ev))
    mem = st.run("memorization", lambda: stage_memorization(cfg, out))
    from .experiment_report import write_report

    return write_report(cfg, out, tr, ev, fg, mem, command, time.time() - t0)
