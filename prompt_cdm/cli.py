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
    from .world.dataset import render_domain

    folders = render_domain(a.domain, a.n, a.out, seed=a.seed, splits=a.splits, heldout=a.heldout)
    for f in folders:
        print(f)


def cmd_world_questions(a) -> None:
    from .io import write_json
    from .world.dataset import read_imagefolder
    from .world.questions import questions_for

    rows = read_imagefolder(a.from_dir)
    recs = []
    for r in rows:
        if "spec" not in r:
            raise UsageError(f"{a.from_dir}/metadata.jsonl rows lack `spec`; render the folder with `prompt-cdm world render`")
        recs += questions_for(r["spec"], r["text"], Path(r["file_name"]).stem)
    write_json(a.out, recs)
    print(f"{len(recs)} questions for {len(rows)} captions -> {a.out}")


def cmd_world_train_judge(a) -> None:
    import torch

    from . import config
    from .world.judge_train import JudgeTrainConfig, train_judge

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

    from . import config
    from .pretrain import PretrainConfig, pretrain

    cfg = config.load(PretrainConfig, a.recipe, a.overrides, smoke=a.smoke)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    pretrain(cfg)
    print(f"weights -> {Path(cfg.out) / 'weights'}; install with `prompt-cdm backbone install {Path(cfg.out) / 'weights'}`")


def cmd_backbone_install(a) -> None:
    import shutil

    from .backbone import TINY_DIR

    src = Path(a.weights)
    for sub in ("unet", "vae", "text_encoder"):
        if not (src / sub / "config.json").exists():
            raise UsageError(f"{src} is not a tiny-backbone weight folder (no {sub}/config.json)")
    for sub in ("unet", "vae", "text_encoder"):
        dst = TINY_DIR / sub
        tmp = TINY_DIR / f".{sub}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src / sub, tmp)
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)
    print(f"installed {src} -> {TINY_DIR}")


def cmd_backbone_export(a) -> None:
    from .backbone import export

    print(export(a.name, a.out))


def cmd_backbone_info(a) -> None:
    from dataclasses import asdict

    from .backbone import info, load

    print(json.dumps(asdict(info(load(a.name))), indent=2))


def cmd_eval_backbone(a) -> None:
    from eval.backbone_quality import evaluate_backbone

    res = evaluate_backbone(a.backbone, a.domains.split(","), n=a.n, steps=a.steps, guidance=a.guidance,
                            seed=a.seed, out=a.out)
    print(json.dumps(res, indent=1))


def cmd_demo(a) -> None:
    from .demo import run_demo

    report = run_demo(a.out, n=a.n, steps=a.steps, guidance=a.guidance)
    print(f"report -> {report}")


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

    d = sub.add_parser("demo", help="run the whole story on the embedded default; writes images and report.md")
    d.add_argument("--out", default="demo_out", help="output folder")
    d.add_argument("--n", type=int, default=200, help="held-out captions per domain for the figures")
    d.add_argument("--steps", type=int, default=25, help="sampling steps")
    d.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    from .backbone import BackboneError
    from .config import ConfigError
    from .world.domains import UnknownDomainError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UsageError, ConfigError, BackboneError, UnknownDomainError, FileNotFoundError) as e:
        print(f"prompt-cdm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
