"""`prompt-cdm train` and `prompt-cdm train-all`: one source's adapter, or every source's."""
from __future__ import annotations

import argparse

from .common import UsageError, _train_errors


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
    for key in ("device", "dtype"):  # the flags win over the recipe's keys
        if getattr(a, key) is not None:
            overrides.append(f'{key}="{getattr(a, key)}"')
    return config.load(TrainConfig, a.recipe, overrides, smoke=a.smoke)


def cmd_train(a) -> None:
    from ..training.train import clean_run, train

    if a.clean_cache:
        gone = clean_run(a.out)
        print(f"removed {gone[0]} (the run's latent cache, checkpoint and log)" if gone else
              f"nothing to remove: {a.out}.train does not exist")
        return
    if not a.source:
        raise UsageError("give --source DIR (the data to train on)")
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
    from ..adapters.kinds import KINDS

    p.add_argument("--kind", choices=list(KINDS), default=None,
                   help="adapter kind (default: the recipe's `kind`, else lora)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's)")
    p.add_argument("--recipe", default=None, help="TOML recipe, e.g. recipes/adapter_train.toml "
                   "(default: TrainConfig's defaults, which equal that recipe)")
    p.add_argument("--smoke", action="store_true", help="merge the recipe's [smoke] section (a seconds-long run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set lora.rank=8 (type-checked; repeatable)")
    from ..backbone.placement import DEVICE_HELP, DTYPE_HELP

    p.add_argument("--device", default=None, help=f"the backbone (default: the recipe's `device`, else auto): "
                   f"{DEVICE_HELP}")
    p.add_argument("--dtype", default=None, help=f"the frozen backbone (default: the recipe's `dtype`, else auto): "
                   f"{DTYPE_HELP}")


def add_parsers(sub) -> None:
    t = sub.add_parser("train", help="train one source's adapter on the frozen backbone (resumable)")
    t.add_argument("--source", action="append", default=None, metavar="DIR",
                   help="an imagefolder (metadata.jsonl: file_name, text) or datasets:NAME[@SPLIT]; "
                   "repeat for the union of several (the monolithic paragon)")
    t.add_argument("--source-id", default=None, help="the source id (default: the folder name; 'paragon' for a union)")
    t.add_argument("--out", required=True, metavar="ADAPTER_DIR", help="the adapter folder to write")
    t.add_argument("--overwrite", action="store_true", help="retrain from scratch and replace a finished adapter")
    t.add_argument("--clean-cache", action="store_true", help="only delete OUT.train (the run's latent cache -- "
                   "derived from the data -- checkpoint and log) and exit")
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
