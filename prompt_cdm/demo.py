"""`prompt-cdm demo`: the whole CDM story on the embedded default, written to one folder.

    prompt-cdm demo --out demo_out [--domains stars,striped,purple_orange] [--train-steps 300] [--n 32]

Stages, each timed (a re-run with the same --out and settings reuses what is done: trained
adapters, the registry and its routers, evaluated cells, finished stages):
 1. sources   render each source domain (OUT/data/<d>) and train its LoRA on the frozen tiny backbone
              (OUT/adapters/<d>; `train.train_all`: complete adapters are reused, unfinished ones resumed)
 2. registry  the service: a registry of the adapters with cached latents, the paper's n-way classifier
              router and our per-source ratio heads (`routing.build.build_registry`; OUT/compose/)
 3. samples   one picture: held-out captions of every domain -- the true render, the frozen backbone,
              each source alone, the composition of all sources
 4. quality   judge-TIFA and FID per domain: frozen backbone / the source's own adapter / the composition
              (`eval.composition_quality.evaluate`), with attribution: each source's credit and weight traces
 5. policy    an access policy limited to some sources: composing under it works, another source is refused
 6. forget    forget one source in a copy of the registry, `verify` that nothing of it remains, show that
              generating with it is refused and that the rest still composes (ratio heads need no retraining;
              the classifier saw the forgotten data, turns stale and is retrained on the rest, timed)
 7. report    OUT/report.md (every figure next to the command that makes it) and OUT/results.json
"""
from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# three kinds of novelty the backbone never saw: a new shape, a new background, new colours
DEFAULT_DOMAINS = ("stars", "striped", "purple_orange")
POLICY = "partner"
SHOWN_PER_DOMAIN = 2      # held-out captions per domain in samples.png and in the trace plots
RATIO_CREDIT_N = 4        # captions per domain on which the ratio heads' attribution is measured (credit only)
STATE_FILE = "stages.json"


class DemoError(ValueError):
    """The demo cannot run as asked (e.g. its folder holds a run with other settings); the message says the fix."""


@dataclass
class DemoConfig:
    """What `prompt-cdm demo` runs. Defaults: 10-12 minutes on one core of a 2-core machine (docs/results.md)."""

    out: str = field(default="demo_out", metadata={"help": "output folder (re-use it to resume / reuse adapters)"})
    domains: tuple[str, ...] = field(default=DEFAULT_DOMAINS, metadata={"help": "source domains, one source each"})
    n_images: int = field(default=500, metadata={"help": "training images per source"})
    # 300 of the recipe's 600 steps: the loss curve of a 600-step LoRA is flat after ~300 (runs/cdm_lora)
    train_steps: int = field(default=300, metadata={"help": "LoRA training steps per source (batch 8)"})
    router_steps: int = field(default=400, metadata={"help": "classifier / ratio-head training steps"})
    # 24: the composition (2n UNet rows per image) is the costliest part; 32 took the demo to ~11 min (measured)
    n: int = field(default=24, metadata={"help": "held-out captions per domain for TIFA/FID"})
    steps: int = field(default=25, metadata={"help": "sampling steps"})
    guidance: float = field(default=5.0, metadata={"help": "classifier-free guidance scale"})
    router: str = field(default="classifier", metadata={"help": "router of the composition: classifier | ratio"})
    # The caption prior lambda(c) = p(source | caption) (caption_prior.py): the mixture of conditionals
    # sum_i p(i | c) p_i(x | c) is what composing sources for a caption means, so the router's image evidence
    # p_i(x_t | c) is weighed with it. Off: every source starts equal and only the image decides.
    caption_prior: bool = field(default=True, metadata={"help": "weigh sources by the caption prior lambda(c)"})
    # per-source: each source's guided prediction uses its own adapter's unconditional row (2n UNet rows per image).
    # "shared" (the frozen backbone's unconditional row, n+1 rows) multiplies each adapter's departure from the
    # backbone by the guidance scale: with these adapters (trained without caption dropout) it over-draws the
    # domain's look (one `striped` source alone, 8 captions: FID 1713 shared vs 309 per-source; measured)
    uncond: str = field(default="per-source", metadata={"help": "guidance's unconditional row: per-source | shared"})
    forget: str = field(default="", metadata={"help": "the source to forget ('' = the first domain)"})
    seed: int = field(default=0, metadata={"help": "render, training and sampling seed"})
    # 1: the tiny models gain nothing from a second thread, and on a 2-core machine shared with other jobs
    # a 2-thread UNet call was ~10x slower (measured: 16 images x 25 steps, 84 s with 2 threads, 7.4 s with 1)
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    device: str = field(default="auto", metadata={"help": "where the models run: auto | cpu | cuda | cuda:N | mps"})
    dtype: str = field(default="auto", metadata={"help": "backbone precision: auto | fp32 | fp16 | bf16"})

    def __post_init__(self):
        from .world.domains import SOURCE_DOMAINS

        self.domains = tuple(self.domains)
        bad = [d for d in self.domains if d not in SOURCE_DOMAINS]
        if bad:
            raise DemoError(f"unknown source domain(s) {', '.join(bad)}; valid: {', '.join(SOURCE_DOMAINS)}")
        if len(self.domains) < 2 or len(set(self.domains)) != len(self.domains):
            raise DemoError(f"--domains needs at least two different source domains, got {','.join(self.domains)}")
        self.forget = self.forget or self.domains[0]
        if self.forget not in self.domains:
            raise DemoError(f"--forget {self.forget} is not one of --domains {','.join(self.domains)}")
        if self.router not in ("classifier", "ratio"):
            raise DemoError(f"--router must be classifier or ratio, got {self.router!r}")
        if self.uncond not in ("per-source", "shared"):
            raise DemoError(f"--uncond must be per-source or shared, got {self.uncond!r}")
        for name in ("n_images", "train_steps", "router_steps", "n", "steps", "threads"):
            if getattr(self, name) < 1:
                raise DemoError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.n < SHOWN_PER_DOMAIN:  # the trace plots show the first SHOWN_PER_DOMAIN captions of each domain
            raise DemoError(f"--n must be >= {SHOWN_PER_DOMAIN}, got {self.n}")
        if self.guidance < 1.0:
            raise DemoError(f"--guidance must be >= 1, got {self.guidance}")
        from .backbone.placement import Placement, PlacementError

        try:
            Placement(self.device, self.dtype)
        except PlacementError as e:
            raise DemoError(str(e)) from None

    @property
    def route(self) -> str:
        """The composition's router as eval.composition_quality names it ("classifier+prior", ...)."""
        return self.router + ("+prior" if self.caption_prior else "")

    @property
    def generate_flags(self) -> str:
        """The same router as `prompt-cdm generate` flags."""
        return f"--router {self.router}" + (" --caption-prior" if self.caption_prior else "")

    @property
    def policy_sources(self) -> list[str]:
        """The access policy's sources: two (one when only two domains exist), so one source stays outside."""
        return list(self.domains[: 2 if len(self.domains) > 2 else 1])

    def command(self) -> str:
        """The `prompt-cdm demo` command of these settings: every field that differs from its default, spelled
        as the flags the CLI generates from this dataclass."""
        from dataclasses import fields

        d = DemoConfig()
        parts = [f"prompt-cdm demo --out {self.out}"]
        for f in fields(self):
            v, default = getattr(self, f.name), getattr(d, f.name)
            if f.name == "out" or v == default or (f.name == "forget" and v == self.domains[0]):
                continue
            flag = f"--{f.name.replace('_', '-')}"
            if isinstance(v, bool):
                parts.append(flag if v else f"--no-{f.name.replace('_', '-')}")
            else:
                parts.append(f"{flag} {','.join(v) if isinstance(v, tuple) else v}")
        return " ".join(parts)

    def key(self) -> dict:
        """The settings a finished stage depends on (threads and the folder do not change results)."""
        k = asdict(self)
        k.pop("out")
        k.pop("threads")
        k.pop("device")  # where it ran does not change what a stage means (the dtype does)
        k["domains"] = list(self.domains)
        return k


class _Stages:
    """OUT/stages.json: each finished stage's result, kept while the settings stay the same."""

    def __init__(self, path: Path, key: dict):
        self.path, self.key = path, key
        data = json.loads(path.read_text()) if path.is_file() else {}
        self.done = data.get("stages", {}) if data.get("key") == key else {}
        self.times: dict[str, dict] = {}

    def run(self, name: str, fn, cache: bool = True):
        from .util.io import write_json

        print(f"[demo] {name} ...", flush=True)
        if cache and name in self.done:
            self.times[name] = {"seconds": 0.0, "reused": True, "first_run_seconds": self.done[name]["seconds"]}
            return self.done[name]["result"]
        t0 = time.time()
        result = fn()
        s = time.time() - t0
        self.times[name] = {"seconds": s, "reused": False}
        if cache:
            self.done[name] = {"result": result, "seconds": s}
            write_json(self.path, {"key": self.key, "stages": self.done})
        print(f"[demo] {name}: {s:.1f} s", flush=True)
        return result


# ---------------------------------------------------------------- the stages


def _final_loss(folder: Path) -> float | None:
    log = folder / "train_log.jsonl"
    if not log.is_file():
        return None
    loss = [json.loads(line)["loss"] for line in log.read_text().splitlines() if line.strip()]
    tail = loss[-max(1, len(loss) // 10):]
    return sum(tail) / len(tail) if tail else None


def stage_sources(cfg: DemoConfig, out: Path) -> list[dict]:
    """Render each domain and train (or reuse) its LoRA; refuse adapters trained with other settings."""
    from .training.train import TrainConfig, render_world_sources, train_all

    folders = render_world_sources(list(cfg.domains), out, cfg.n_images, seed=cfg.seed)
    # no per-adapter sample grid: samples.png shows the same comparison for every source at once
    tcfg = TrainConfig(kind="lora", steps=cfg.train_steps, seed=cfg.seed, n_samples=0, device=cfg.device,
                       dtype=cfg.dtype)
    rows = []
    for r in train_all("tiny", folders, tcfg, out):
        tc = json.loads((Path(r.folder) / "adapter_config.json").read_text()).get("train_config", {})
        if tc.get("steps") != cfg.train_steps or tc.get("kind") != "lora":
            raise DemoError(f"{r.folder} holds a {tc.get('kind')} adapter of {tc.get('steps')} steps, not a LoRA of "
                            f"{cfg.train_steps}; pass --train-steps {tc.get('steps')} or use another --out")
        rows.append({"source": r.source_id, "reused": r.skipped, "steps": cfg.train_steps,
                     "final_loss": _final_loss(Path(r.folder)), "steps_per_s": r.steps_per_s, "wall_s": r.wall_s})
    return rows


def stage_registry(cfg: DemoConfig, out: Path, pipe) -> dict:
    """The registry (OUT/compose/registry) with cached latents, the classifier and the ratio heads."""
    from .registry.registry import Registry
    from .routing.build import build_registry

    folder = out / "compose" / "registry"
    if (folder / "registry.json").is_file():
        have = Registry(folder)
        if set(have.sources) != set(cfg.domains) or have.data["forgotten"]:
            raise DemoError(f"{folder} holds the sources {','.join(have.sources) or '(none)'}, this run composes "
                            f"{','.join(cfg.domains)}; use another --out or delete {out / 'compose'}")
    reg, _ = build_registry(pipe, out / "adapters", out / "data", out / "compose", list(cfg.domains),
                            router_steps=cfg.router_steps)
    routers = {}
    for name, e in reg.routers.items():
        meta = json.loads((reg.router_dir(name) / "router.json").read_text())
        trained = meta.get("config", {}).get("train", {}).get("steps")
        if trained != cfg.router_steps:
            raise DemoError(f"router {name!r} in {reg.folder} was trained for {trained} steps, not {cfg.router_steps}; "
                            f"pass --router-steps {trained} or delete {out / 'compose'}")
        routers[name] = {"kind": e["kind"], "sources_seen": e["sources_seen"],
                         "seconds": meta.get("config", {}).get("report", {}).get("seconds")}
    return {"folder": str(reg.folder), "sources": reg.sources, "routers": routers}


def stage_samples(cfg: DemoConfig, out: Path, pipe) -> dict:
    """samples.png: columns = held-out captions of every domain; rows = truth, frozen, each source alone,
    the composition. Same seed and batch everywhere, so each column starts from the same noise."""
    from eval.adapter_quality import adapter_images
    from eval.composition_quality import compose_cell
    from eval.world_scoring import heldout

    from .compose.pipeline import CDMPipeline, text_to_image
    from .registry.registry import Registry
    from .util.io import save_image, write_text
    from .util.plots import grid

    reg = Registry(out / "compose" / "registry")
    names = list(cfg.domains)
    held = [e for d in names for e in heldout(d, cfg.n, cfg.seed)[:SHOWN_PER_DOMAIN]]
    prompts = [e.caption for e in held]
    kw = {"steps": cfg.steps, "guidance": cfg.guidance, "seed": cfg.seed}
    rows = [("true render", [e.image for e in held]),
            ("frozen backbone", text_to_image(pipe, prompts, steps=cfg.steps, guidance_scale=cfg.guidance,
                                              seed=cfg.seed, batch_size=16, progress=True))]
    for s in names:
        rows.append((f"{s} alone", adapter_images(pipe, reg.adapter_dir(s), prompts, **kw)))
    with CDMPipeline(pipe, registry=reg) as cdm:
        res, _ = compose_cell(cdm, names, cfg.route, prompts, None, **kw, uncond=cfg.uncond)
    rows.append((f"composition ({cfg.route})", res.images))
    save_image(out / "samples.png", grid([im for _, ims in rows for im in ims], cols=len(prompts), scale=3))
    write_text(out / "samples_prompts.txt", "\n".join(prompts) + "\n")
    return {"rows": [r for r, _ in rows], "prompts": prompts}


def stage_quality(cfg: DemoConfig, out: Path, pipe) -> dict:
    """Frozen backbone (also on `base`, the baseline), each source's own adapter and the composition."""
    from eval.backbone_quality import evaluate_domain
    from eval.composition_quality import evaluate
    from eval.world_scoring import shipped_judge

    # evaluate() resumes its cells, and recomputes them when they were made with other settings
    comp = evaluate(str(out / "adapters"), str(out / "data"), str(out / "compose"), list(cfg.domains),
                    routers=[cfg.route], n=cfg.n, steps=cfg.steps, guidance=cfg.guidance, seed=cfg.seed,
                    router_steps=cfg.router_steps, uncond=cfg.uncond)
    judge = shipped_judge()
    cells = {}
    for d in ("base", *cfg.domains):  # the frozen backbone: what `prompt-cdm eval backbone` measures
        t0 = time.time()
        res, _ = evaluate_domain(pipe, judge, d, n=cfg.n, steps=cfg.steps, guidance=cfg.guidance, seed=cfg.seed)
        cells[f"frozen/{d}"] = dict(res, seconds=time.time() - t0)
    for k, v in comp["cells"].items():
        if k.split("/")[0] in ("own", cfg.route):
            cells[k] = v
    return {"cells": cells, "summary": comp["summary"]}


def stage_ratio_credit(cfg: DemoConfig, out: Path, pipe) -> dict:
    """The ratio heads' attribution on the first captions of each domain (credit only, no quality)."""
    from eval.composition_quality import compose_cell
    from eval.world_scoring import heldout

    from .compose.pipeline import CDMPipeline
    from .registry.registry import Registry
    from .util.plots import plot_traces

    reg = Registry(out / "compose" / "registry")
    names = list(cfg.domains)
    credit, traces = {}, []
    with CDMPipeline(pipe, registry=reg) as cdm:
        for i, d in enumerate(names):
            held = heldout(d, cfg.n, cfg.seed)[:RATIO_CREDIT_N]
            res, att = compose_cell(cdm, names, "ratio", [e.caption for e in held], i, cfg.steps, cfg.guidance,
                                    cfg.seed, cfg.uncond)
            credit[d] = att
            traces += [dict(res.trace_json(names, k), prompt=f"[{d}] {held[k].caption}")
                       for k in range(min(SHOWN_PER_DOMAIN, len(held)))]
    plot_traces(traces, out / "compose" / "trace_ratio.png")
    return credit


def _compose_figure(pipe, reg, names: list[str], router: str, prompts: list[str], labels: list[str], cfg: DemoConfig,
                    stem: Path) -> dict:
    """Compose `names` on `prompts`; write STEM.png (the images) and STEM_trace.png; return the credits."""
    from eval.composition_quality import compose_cell

    from .compose.pipeline import CDMPipeline
    from .util.io import save_image, write_text
    from .util.plots import grid, plot_traces

    with CDMPipeline(pipe, registry=reg) as cdm:
        res, _ = compose_cell(cdm, names, router, prompts, None, cfg.steps, cfg.guidance, cfg.seed, cfg.uncond)
    save_image(stem.with_suffix(".png"), grid(res.images, cols=len(prompts), scale=3))
    write_text(stem.with_name(stem.name + "_prompts.txt"), "\n".join(prompts) + "\n")
    traces = [dict(res.trace_json(names, k), prompt=f"[{labels[k]}] {p}") for k, p in enumerate(prompts)]
    plot_traces(traces, stem.with_name(stem.name + "_trace.png"))
    return {f"[{labels[k]}] {p}": t["credit"] for k, (p, t) in enumerate(zip(prompts, traces))}


def stage_policy(cfg: DemoConfig, out: Path, pipe) -> dict:
    """Policy `partner` allows some sources: compose under it; a source outside it is refused."""
    from eval.world_scoring import heldout

    from .registry.registry import Registry, RegistryError

    reg = Registry(out / "compose" / "registry")
    allowed = reg.set_policy(POLICY, cfg.policy_sources)
    names = reg.resolve(None, POLICY)
    outside = next(d for d in cfg.domains if d not in allowed)
    try:
        reg.resolve([outside], POLICY)
        refusal = None
    except RegistryError as e:
        refusal = str(e)
    if refusal is None:
        raise DemoError(f"policy {POLICY!r} let {outside!r} through; the registry's access check is broken")
    labels = [d for d in (*allowed, outside) for _ in range(SHOWN_PER_DOMAIN)]
    prompts = [e.caption for d in (*allowed, outside) for e in heldout(d, cfg.n, cfg.seed)[:SHOWN_PER_DOMAIN]]
    credit = _compose_figure(pipe, reg, names, cfg.route, prompts, labels, cfg, out / "policy")
    return {"policy": POLICY, "allowed": names, "outside": outside, "refusal": refusal, "credit": credit}


def stage_forget(cfg: DemoConfig, out: Path, pipe) -> dict:
    """Forget `cfg.forget` in OUT/registry_forget (a copy, so a re-run can reuse OUT/compose/registry)."""
    from eval.world_scoring import heldout

    from .registry.registry import Registry, RegistryError
    from .routing.routers import RouterTrainConfig, train_router

    name = cfg.forget
    dst = out / "registry_forget"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(out / "compose" / "registry", dst)
    reg = Registry(dst)
    t0 = time.time()
    rep = reg.forget(name)
    forget_s = time.time() - t0
    problems = reg.verify()  # the whole registry, every forgotten source included
    paths_left = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if name in p.relative_to(dst).as_posix())
    refusals = {}
    try:
        reg.resolve([name])
    except RegistryError as e:
        refusals["generate"] = str(e)
    rest = reg.sources
    try:
        reg.heads("classifier", rest)
    except RegistryError as e:
        refusals["classifier"] = str(e)
    retrain_s = None
    if len(rest) >= 2:  # the paper's classifier saw the forgotten data: retrain it on the rest's cached latents
        t0 = time.time()
        train_router(reg, "classifier", pipe.scheduler.alphas_cumprod, RouterTrainConfig(steps=cfg.router_steps), rest,
                     device=pipe.unet.device)
        retrain_s = time.time() - t0
    problems_after = reg.verify()
    # the rest composes with the ratio heads as they were (no retraining), on captions of every domain
    doms = [*rest, name]
    labels = [d for d in doms for _ in range(SHOWN_PER_DOMAIN)]
    prompts = [e.caption for d in doms for e in heldout(d, cfg.n, cfg.seed)[:SHOWN_PER_DOMAIN]]
    credit = _compose_figure(pipe, reg, rest, "ratio", prompts, labels, cfg, out / "forget")
    return {"forgotten": name, "registry": str(dst), "deleted": rep.deleted, "stale_routers": rep.stale_routers,
            "policies_edited": rep.policies, "forget_seconds": forget_s, "verify": problems,
            "paths_naming_it": paths_left, "refusals": refusals, "classifier_retrain_seconds": retrain_s,
            "verify_after_retrain": problems_after, "rest": rest, "credit": credit}


# ---------------------------------------------------------------- the report


def _f(v, fmt=".3f") -> str:
    return "—" if v is None else format(v, fmt)


def _quality_table(cfg: DemoConfig, cells: dict) -> str:
    r = cfg.route
    lines = ["| domain | frozen TIFA | own adapter TIFA | composition TIFA | frozen FID | own adapter FID | composition FID |",
             "|---|---|---|---|---|---|---|"]
    for d in ("base", *cfg.domains):
        row = [cells.get(f"{s}/{d}") for s in ("frozen", "own", r)]
        lines.append(f"| {d}{'' if d != 'base' else ' (pretraining domain)'} | "
                     + " | ".join(_f(c and c["score"]) for c in row) + " | "
                     + " | ".join(_f(c and c["fid_judge"], ".1f") for c in row) + " |")
    means = {s: [cells[f"{s}/{d}"] for d in cfg.domains] for s in ("frozen", "own", r)}
    lines.append("| **mean over sources** | " + " | ".join(
        f"**{sum(c['score'] for c in v) / len(v):.3f}**" for v in means.values()) + " | " + " | ".join(
        f"**{sum(c['fid_judge'] for c in v) / len(v):.1f}**" for v in means.values()) + " |")
    return "\n".join(lines)


def _by_type_table(cfg: DemoConfig, cells: dict) -> str:
    keys = [k for k in (f"frozen/{d}" for d in ("base", *cfg.domains))] + [
        f"{s}/{d}" for d in cfg.domains for s in ("own", cfg.route)]
    types = sorted({t for k in keys for t in cells[k]["by_type"]})
    lines = ["| system / domain | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(_f(cells[k]["by_type"].get(t)) for t in types) + " |")
    return "\n".join(lines)


def _credit_table(names: list[str], credit: dict, n_label: str) -> str:
    lines = ["| captions of | " + " | ".join(names) + " | credit of the true source | top-1 |",
             "|---|" + "---|" * (len(names) + 2)]
    for d, att in credit.items():
        cells = [f"**{c:.2f}**" if names[i] == d else f"{c:.2f}" for i, c in enumerate(att["mean_credit"])]
        lines.append(f"| {d} ({n_label}) | " + " | ".join(cells) + f" | {_f(att.get('true_credit'), '.2f')} | "
                     f"{_f(att.get('top1'), '.2f')} |")
    return "\n".join(lines)


def _per_prompt_credit(credit: dict, names: list[str]) -> str:
    lines = ["| prompt | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for p, c in credit.items():
        lines.append(f"| {p} | " + " | ".join(f"{c[n]:.2f}" for n in names) + " |")
    return "\n".join(lines)


def _verdicts(cfg: DemoConfig, res: dict) -> str:
    """The story's claims against this run's numbers (means over the source domains)."""
    names, r, cells = list(cfg.domains), cfg.route, res["quality"]["cells"]
    mean = {s: {k: sum(cells[f"{s}/{d}"][k] for d in names) / len(names) for k in ("score", "fid_judge")}
            for s in ("frozen", "own", r)}
    fid_better = [d for d in names if cells[f"own/{d}"]["fid_judge"] < cells[f"frozen/{d}"]["fid_judge"]]
    tifa_better = [d for d in names if cells[f"own/{d}"]["score"] > cells[f"frozen/{d}"]["score"]]
    fid_gap = mean[r]["fid_judge"] / mean["own"]["fid_judge"] - 1
    top = [d for d in names if cells[f"{r}/{d}"]["top1"] >= 0.5]
    credit = sum(cells[f"{r}/{d}"]["true_credit"] for d in names) / len(names)
    rc = res["ratio_credit"]
    img_credit = sum(rc[d]["true_credit"] for d in names) / len(names)
    img_top = [d for d in names if rc[d]["top1"] >= 0.5]
    fg, pol = res["forget"], res["policy"]
    fm, tm = {s: f"{v['fid_judge']:.1f}" for s, v in mean.items()}, {s: f"{v['score']:.3f}" for s, v in mean.items()}

    def yes(ok: bool) -> str:
        return "yes" if ok else "**no**"

    rows = [
        ("each source's own adapter draws its domain better than the frozen backbone",
         (f"FID better in {len(fid_better)}/{len(names)} domains ({', '.join(fid_better) or 'none'}), judge-TIFA in "
          f"{len(tifa_better)}/{len(names)}; means: FID {fm['frozen']} -> {fm['own']}, TIFA {tm['frozen']} -> "
          f"{tm['own']}"), yes(len(fid_better) == len(names))),
        (f"composing all sources ({r}) costs little against each source alone (CDM: within 10% FID)",
         f"FID {fm['own']} -> {fm[r]} ({fid_gap:+.0%}), TIFA {tm['own']} -> {tm[r]}", yes(fid_gap <= 0.10)),
        ("attribution credits the caption's own source most"
         + (" (router evidence x the caption prior)" if cfg.caption_prior else ""),
         (f"mean credit of the true source {credit:.2f} (uniform {1 / len(names):.2f}); it is the top source for "
          f"at least half of the captions in {len(top)}/{len(names)} domains ({', '.join(top) or 'none'})"),
         yes(len(top) == len(names))),
        ("attribution from the image alone (each source's ratio head; no caption prior)",
         (f"mean credit of the true source {img_credit:.2f}; the top source for at least half of the captions in "
          f"{len(img_top)}/{len(names)} domains ({', '.join(img_top) or 'none'})"), yes(len(img_top) == len(names))),
        (f"forgetting `{fg['forgotten']}` is exact and immediate",
         f"{fg['forget_seconds']:.2f} s; `verify`: {len(fg['verify'])} problem(s); generating with it refused",
         yes(not fg["verify"] and "generate" in fg["refusals"])),
        (f"an access policy limits a caller to {', '.join(pol['allowed'])}",
         f"`{pol['outside']}` refused under it", yes(bool(pol["refusal"]))),
    ]
    lines = ["| claim | this run | holds here? |", "|---|---|---|"]
    lines += [f"| {c} | {m} | {v} |" for c, m, v in rows]
    return "\n".join(lines)


def write_report(cfg: DemoConfig, out: Path, res: dict, times: dict, wall: float) -> Path:
    from .util.io import write_text

    o, names, r, u, gf = cfg.out, list(cfg.domains), cfg.route, cfg.uncond, cfg.generate_flags
    rows = 2 * len(names) if u == "per-source" else len(names) + 1
    uncond_note = ("guidance with each source's own unconditional row; `--uncond shared` uses the frozen backbone's "
                   "one row instead (n+1 rows), which multiplies each adapter's departure from the backbone by the "
                   "guidance scale -- compare the two" if u == "per-source" else
                   "guidance with the frozen backbone's one unconditional row; `--uncond per-source` gives each "
                   "source its own (2n rows)")
    doms = ",".join(names)
    tr, reg, smp, q, pol, fg = (res[k] for k in ("sources", "registry", "samples", "quality", "policy", "forget"))
    cells = q["cells"]
    bi = res["backbone"]
    comp_credit = {d: cells[f"{r}/{d}"] for d in names}
    train_rows = "\n".join(
        f"| {t['source']} | {'reused' if t['reused'] else 'trained'} | {t['steps']} | {_f(t['final_loss'], '.4f')} | "
        f"{_f(t['steps_per_s'], '.1f')} | {_f(t['wall_s'], '.0f')} |" for t in tr)
    router_rows = "\n".join(f"| {k} | {v['kind']} | {', '.join(v['sources_seen'])} | {_f(v['seconds'], '.1f')} |"
                            for k, v in reg["routers"].items())
    stage_rows = "\n".join(f"| {k} | {v['seconds']:.1f} | "
                           + (f"reused (first run {v['first_run_seconds']:.1f} s)" if v["reused"] else "") + " |"
                           for k, v in times.items())
    rest = fg["rest"]
    steps_note = (f"{cfg.train_steps} steps of batch 8, half of the recipe's 600 (`recipes/adapter_train.toml`): the "
                  "recipe's loss curve is flat after ~300 steps, and the demo's time budget needs the other half."
                  if cfg.train_steps == 300 else f"{cfg.train_steps} steps of batch 8 (the recipe uses 600).")
    if fg["classifier_retrain_seconds"] is None:
        retrain = "with one source left there is nothing to route, so it is not retrained."
    else:
        retrain = (f"retraining it on the {len(rest)} remaining sources' cached latents took "
                   f"{fg['classifier_retrain_seconds']:.1f} s (`verify` afterwards: "
                   f"{'ok' if not fg['verify_after_retrain'] else '; '.join(fg['verify_after_retrain'])}).")
    reused = [v for v in times.values() if v["reused"]]
    rerun = (f" This run reused {len(reused)} finished stage(s) of an earlier run with the same settings (their first "
             f"run: {sum(v['first_run_seconds'] for v in reused) / 60:.1f} min)." if reused else "")
    verify = "**nothing remains** (`verify` finds no problem)" if not fg["verify"] else \
        "problems: " + "; ".join(fg["verify"])
    sep = "\n"
    report = f"""# prompt_cdm demo report

Command: `{cfg.command()}`
Wall time **{wall / 60:.1f} min** on {cfg.threads} torch thread(s) ({platform.processor() or platform.machine()},
{_cpus()} CPU cores).{rerun} Every number and picture below comes from this run (`results.json`).

## What this run shows
{_verdicts(cfg, res)}

Backbone `tiny` (fingerprint `{bi['fingerprint']}`): UNet {bi['unet_params'] / 1e6:.2f}M, VAE
{bi['vae_params'] / 1e6:.2f}M, text encoder {bi['text_params'] / 1e6:.2f}M parameters, frozen; pretrained on the
shapes world's `base` domain only. Sources: {', '.join(f'`{d}`' for d in names)} -- domains the backbone never
saw; each source's {cfg.n_images} images touch only its own LoRA.

## 1. Sources: one LoRA per source
```
prompt-cdm train-all --world-domains {doms} --n-images {cfg.n_images} --world-seed {cfg.seed} --kind lora --steps {cfg.train_steps} --set seed={cfg.seed} --set n_samples=0 --out {o}
```
| source | this run | steps | final loss | steps/s | wall s |
|---|---|---|---|---|---|
{train_rows}

{steps_note} Loss curves: {', '.join(f'`adapters/{d}/loss_curve.png`' for d in names)}.
A re-run with the same `--out` reuses finished adapters and resumes unfinished ones.

## 2. The service: registry and routers
```
prompt-cdm registry init --registry {reg['folder']} --backbone tiny
prompt-cdm registry add --registry {reg['folder']} SOURCE {o}/adapters/SOURCE                     # each source
prompt-cdm router cache --registry {reg['folder']} --source SOURCE --data {o}/data/SOURCE         # each source
prompt-cdm world render --domain base --n 500 --seed 7 --out {o}/compose/reference_base
prompt-cdm router cache --registry {reg['folder']} --reference --data {o}/compose/reference_base
prompt-cdm router train --registry {reg['folder']} --kind classifier --steps {cfg.router_steps}
prompt-cdm router train --registry {reg['folder']} --kind ratio --steps {cfg.router_steps}
```
| router artifact | kind | sources whose data it saw | training s |
|---|---|---|---|
{router_rows}

The classifier (the CDM paper's router) has seen every source; each ratio head only its own source (against the
public reference set: renders of `base`), so forgetting a source deletes its head and touches no other.

## 3. Frozen backbone vs each source alone vs the composition
![samples](samples.png)

Columns: {SHOWN_PER_DOMAIN} held-out captions of each of {', '.join(names)} (`samples_prompts.txt`). Rows, top to
bottom: {'; '.join(smp['rows'])}. Every column starts from the same noise ({cfg.steps} Euler-ancestral steps,
guidance {cfg.guidance}). Each adapter row:
`prompt-cdm generate --adapter {o}/adapters/SOURCE --prompts {o}/samples_prompts.txt --out SOURCE.png`; the
composition row: `prompt-cdm generate --registry {reg['folder']} {gf} --uncond {u} --prompts {o}/samples_prompts.txt --out composed.png`.

## 4. Quality: judge-TIFA and FID per domain ({cfg.n} held-out captions each)
```
prompt-cdm eval backbone --backbone tiny --domains base,{doms} --n {cfg.n} --steps {cfg.steps} --guidance {cfg.guidance}     # frozen
python -m eval.composition_quality --adapters {o}/adapters --data {o}/data --domains {doms} --routers {r} --n {cfg.n} --steps {cfg.steps} --guidance {cfg.guidance} --uncond {u} --threads {cfg.threads} --out {o}/compose   # own, composition
```
{_quality_table(cfg, cells)}

*frozen*: the backbone without adapters; *own adapter*: the domain's source alone (plain diffusers with its LoRA
loaded); *composition*: all {len(names)} sources composed with the `{r}` router in one batched UNet pass per step
({rows} UNet rows per image and step; {uncond_note}). judge-TIFA: TIFA's question-answering score with the world's judge as the VQA model
(1.0 = every stated fact drawn); FID on the judge's features against 1000 held-out renders of the domain (lower is
better). `base` is the frozen backbone's baseline on what it was pretrained on.

Per question type:

{_by_type_table(cfg, cells)}

Images: `compose/samples_{r}.png` (4 per domain).

## 5. Attribution: which source shaped each image
![traces](compose/trace_{r}.png)

Weight w_i(x_t, t) of each source over the sampling steps ({r} router; the legend gives each source's credit = mean
weight), {SHOWN_PER_DOMAIN} captions per domain. `prompt-cdm generate --registry {reg['folder']} {gf} --uncond {u} --prompt "..." --out img.png --trace trace.json` writes one.
Mean credit per source over the {cfg.n} captions of each domain (bold: the caption's own source):

{_credit_table(names, comp_credit, f'{cfg.n} captions')}

The ratio heads (ours: each head saw only its own source) on the first {RATIO_CREDIT_N} captions of each domain
(`compose/trace_ratio.png`):

{_credit_table(names, res['ratio_credit'], f'{RATIO_CREDIT_N} captions')}

![attribution](compose/attribution.png)

## 6. Access policy: a caller limited to {len(pol['allowed'])} source(s)
```
prompt-cdm registry policy --registry {reg['folder']} set {POLICY} {','.join(pol['allowed'])}
prompt-cdm generate --registry {reg['folder']} --policy {POLICY} {gf} --uncond {u} --prompts {o}/policy_prompts.txt --out policy.png --trace policy_trace.json
prompt-cdm generate --registry {reg['folder']} --policy {POLICY} --sources {pol['outside']} --prompt "..." --out x.png   # refused
```
![policy](policy.png)
![policy traces](policy_trace.png)

Policy `{POLICY}` composes only {', '.join(pol['allowed'])}; the captions are {SHOWN_PER_DOMAIN} of each allowed
domain and {SHOWN_PER_DOMAIN} of `{pol['outside']}`, which the caller may not use: those are drawn without it.
Asking for `{pol['outside']}` under the policy is refused: `` {pol['refusal']} ``

{_per_prompt_credit(pol['credit'], pol['allowed'])}

## 7. Forgetting `{fg['forgotten']}`
```
cp -r {reg['folder']} {fg['registry']}      # the demo forgets in a copy, so a re-run can reuse the registry
prompt-cdm registry forget --registry {fg['registry']} {fg['forgotten']}
prompt-cdm registry verify --registry {fg['registry']}
prompt-cdm generate --registry {fg['registry']} --sources {fg['forgotten']} --prompt "..." --out x.png        # refused
prompt-cdm router train --registry {fg['registry']} --kind classifier --steps {cfg.router_steps}             # the stale classifier
prompt-cdm generate --registry {fg['registry']} --router ratio --uncond {u} --prompts {o}/forget_prompts.txt --out forget.png --trace forget_trace.json
```
- Forgetting took **{fg['forget_seconds']:.2f} s**: deleted {', '.join(f'`{p}`' for p in fg['deleted'])}; routers
  made stale (they saw its data together with others, their weights are deleted):
  {', '.join(fg['stale_routers']) or 'none'}; policies edited: {', '.join(fg['policies_edited']) or 'none'}.
- `verify`: {verify}. Files under the registry whose path names `{fg['forgotten']}`:
  {', '.join(fg['paths_naming_it']) or 'none'} (the index keeps only its name and data hash, so `verify` can keep
  proving it is gone and its data can never be added back).
- Generating with it is refused: `` {fg['refusals'].get('generate')} ``
- The paper's classifier cannot route any more: `` {fg['refusals'].get('classifier')} `` -- {retrain}
  The ratio heads of the rest need no retraining: the composition below uses them as they were.

![forget](forget.png)
![forget traces](forget_trace.png)

The rest ({', '.join(rest)}) composed with the ratio heads, on {SHOWN_PER_DOMAIN} captions of each remaining domain and
{SHOWN_PER_DOMAIN} of the forgotten `{fg['forgotten']}` (now drawn by the others):

{_per_prompt_credit(fg['credit'], rest)}

The source owner's own files, `{o}/data/{fg['forgotten']}` and `{o}/adapters/{fg['forgotten']}`, are outside the
service and stay (a re-run of the demo reuses them); the service itself holds nothing of the source.

## Wall time per stage
| stage | seconds (this run) | |
|---|---|---|
{stage_rows}
| **total** | **{wall:.1f}** | |
"""
    write_text(out / "report.md", report.replace(sep * 3, sep * 2))
    return out / "report.md"


def _cpus() -> int:
    import os

    return os.cpu_count() or 1


# ---------------------------------------------------------------- the command


def run_demo(cfg: DemoConfig) -> Path:
    """Run (or resume) every stage into cfg.out; return the path of report.md."""
    from .backbone.loading import info, load_quietly
    from .util.io import write_json

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        t0 = time.time()
        st = _Stages(out / STATE_FILE, cfg.key())
        res: dict = {"settings": cfg.key(), "command": cfg.command()}
        res["sources"] = st.run("sources", lambda: stage_sources(cfg, out), cache=False)  # train_all resumes itself
        pipe = load_quietly("tiny", cfg.dtype, cfg.device)
        res["backbone"] = asdict(info(pipe))
        res["registry"] = st.run("registry", lambda: stage_registry(cfg, out, pipe), cache=False)
        res["samples"] = st.run("samples", lambda: stage_samples(cfg, out, pipe))
        res["quality"] = st.run("quality", lambda: stage_quality(cfg, out, pipe))
        res["ratio_credit"] = st.run("ratio attribution", lambda: stage_ratio_credit(cfg, out, pipe))
        res["policy"] = st.run("policy", lambda: stage_policy(cfg, out, pipe))
        res["forget"] = st.run("forget", lambda: stage_forget(cfg, out, pipe))
        wall = time.time() - t0
        res.update(stage_seconds=st.times, wall_seconds=wall, threads=cfg.threads)
        write_json(out / "results.json", res)
        report = write_report(cfg, out, res, st.times, wall)
    finally:
        torch.set_num_threads(threads)
    q = res["quality"]["cells"]
    print(json.dumps({d: {s: {"tifa": round(q[f"{s}/{d}"]["score"], 3), "fid": round(q[f"{s}/{d}"]["fid_judge"], 1)}
                          for s in ("frozen", "own", cfg.route) if f"{s}/{d}" in q} for d in ("base", *cfg.domains)},
                     indent=1))
    print(f"[demo] wall time {wall / 60:.1f} min")
    return report
