"""`prompt-cdm backbone ...`: pretrain, install, export, info."""
from __future__ import annotations

import json
from pathlib import Path

from .common import UsageError, _add_recipe_args


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


def add_parsers(sub) -> None:
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
