"""`prompt-cdm generate`, `registry ...` and `router ...`: composing sources, the registry, its routers."""
from __future__ import annotations

import json
from pathlib import Path

from .common import (UsageError, _load_backbone_quietly, _read_prompts, add_compile, add_placement, check_image_out,
                     check_writable_file)


# ComposeRequest fields spelled by hand on the command line (old spellings kept); every other field is a
# generated flag, and --set reaches all of them
REQUEST_BY_HAND = ("prompts", "lambdas", "caption_prior")


def generate_request(a):
    """The composition request of `prompt-cdm generate`'s flags (validated before any model loads)."""
    from ..compose.request import ComposeRequest, parse_lambdas
    from .fields import build, request_fields

    return build(ComposeRequest, a, request_fields(ComposeRequest, REQUEST_BY_HAND),
                 {"prompts": _read_prompts(a), "lambdas": parse_lambdas(a.weights),
                  "caption_prior": a.caption_prior_strength if a.caption_prior else None})


def cmd_generate(a) -> None:
    from ..compose.pipeline import CDMPipeline
    from ..registry.registry import Registry
    from ..util.io import save_image, write_json
    from ..util.plots import grid

    request = generate_request(a)
    check_image_out(a.out)
    if a.trace:
        check_writable_file(a.trace, "--trace", UsageError)
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
    if reg is not None:  # unknown sources and policies, before the backbone loads
        n = len(reg.resolve(request.sources, request.policy))
    elif request.sources or request.policy:
        raise UsageError("--sources and --policy select from a registry: pass --registry DIR")
    else:
        n = len(a.adapter)
    from ..compose.rows import RowBudgetError, check_max_rows

    try:  # a row budget below one image's rows, before any model loads
        check_max_rows(request.max_rows, n, request.uncond_for(n), request.guidance != 1.0)
    except RowBudgetError as e:
        raise UsageError(str(e)) from None
    pipe = _load_backbone_quietly(a.backbone or (reg.backbone["name"] if reg else "tiny"), a)
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

    from ..adapters.kinds import backbone_table

    pipe = _load_backbone_quietly(a.backbone)  # the fingerprint does not depend on the placement
    reg = Registry.create(a.registry, a.backbone, pipe.backbone_fingerprint, modules=backbone_table(pipe))
    print(f"registry {reg.folder} for backbone {a.backbone} ({pipe.backbone_fingerprint})")


def cmd_registry_add(a) -> None:
    from ..registry.registry import Registry

    entry = Registry(a.registry).add(a.name, a.adapter_dir, manifest=a.manifest)
    print(f"added {a.name} ({entry['kind']}) -> {Path(a.registry) / entry['adapter']}")


def cmd_registry_list(a) -> None:
    from ..registry.registry import Registry

    reg = Registry(a.registry)
    backbone = {k: v for k, v in reg.backbone.items() if k != "modules"}
    print(json.dumps({"backbone": backbone, "sources": reg.summary(), "policies": reg.policies,
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
    pipe = _load_backbone_quietly(a.backbone or reg.backbone["name"], a)
    print(f"cached -> {reg.folder / cache_latents(reg, a.source, pipe, a.data)}")


def cmd_router_train(a) -> None:
    from ..registry.registry import Registry
    from ..routing.routers import RouterTrainConfig, train_router
    from .fields import build, request_fields

    reg = Registry(a.registry)
    if a.kind not in ("classifier", "ratio"):
        raise UsageError(f"--kind must be classifier or ratio, got {a.kind!r}")
    try:
        cfg = build(RouterTrainConfig, a, request_fields(RouterTrainConfig))
    except ValueError as e:
        raise UsageError(str(e)) from None
    names = reg.resolve(a.sources.split(",") if a.sources else None)
    pipe = _load_backbone_quietly(a.backbone or reg.backbone["name"], a)
    if pipe.backbone_fingerprint != reg.backbone["fingerprint"]:
        raise UsageError(f"--backbone is not the registry's backbone ({reg.backbone['name']})")
    device = pipe.unet.device  # the routers train where the backbone runs
    print(json.dumps(train_router(reg, a.kind, pipe.scheduler.alphas_cumprod, cfg, names, device=device), indent=1))


def add_parsers(sub) -> None:
    from ..compose.request import ComposeRequest
    from ..routing.routers import RouterTrainConfig
    from .fields import add_fields, add_set

    g = sub.add_parser("generate", help="compose sources' adapters on the frozen backbone (CDM) and generate")
    g.add_argument("--backbone", default=None, help="'tiny', an SD folder or a hub id (default: the registry's, "
                   "else tiny)")
    g.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="an adapter folder to compose (repeatable)")
    g.add_argument("--registry", default=None, metavar="DIR", help="compose sources of this registry")
    g.add_argument("--prompt", default=None, help="one prompt -> one image")
    g.add_argument("--prompts", default=None, metavar="FILE", help="one prompt per line -> a grid image")
    g.add_argument("--weights", default=None, metavar="A=0.5,B=0.5",
                   help="mixing prior lambda per source (the mixture itself for --router fixed)")
    g.add_argument("--caption-prior", action="store_true",
                   help="multiply lambda by p_i(prompt), each source's caption model (registry caches; "
                   "built by `router cache`)")
    g.add_argument("--caption-prior-strength", type=float, default=1.0, metavar="S",
                   help="exponent of p_i(prompt) (< 1 tempers the unigram model's overconfidence)")
    add_fields(g, ComposeRequest, skip=REQUEST_BY_HAND, aliases={"estimator": ["--router"]})
    add_set(g, "composition request (compose.request.ComposeRequest)")
    g.add_argument("--out", required=True, help="output image (PNG)")
    g.add_argument("--trace", default=None, metavar="T.json", help="write the routing trace and its plot T.png")
    add_placement(g)
    add_compile(g)
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
    add_placement(rc)
    rc.set_defaults(func=cmd_router_cache)
    rt = rr.add_parser("train", help="train the classifier (sees every source) or per-source ratio heads")
    reg_arg(rt)
    rt.add_argument("--kind", required=True, help="classifier or ratio")
    rt.add_argument("--sources", default=None, metavar="A,B", help="default: every source")
    add_fields(rt, RouterTrainConfig)  # --use-context / --no-use-context, and the old spelling below
    rt.add_argument("--no-context", dest="use_context", action="store_false", help="do not read the caption embedding")
    add_set(rt, "router training (routing.routers.RouterTrainConfig)")
    rt.add_argument("--backbone", default=None, help="default: the registry's backbone")
    add_placement(rt, "the backbone and the routers' training")
    rt.set_defaults(func=cmd_router_train)
