"""`prompt-cdm world ...`: the embedded shapes world (render, questions, train-judge)."""
from __future__ import annotations

import json
from pathlib import Path

from .common import UsageError, _add_recipe_args

MAX_RENDER = 1_000_000  # images per `world render` (the embedded world's largest use is ~10k)


def cmd_world_render(a) -> None:
    from ..world.dataset import render_domain

    if not 1 <= a.n <= MAX_RENDER or a.seed < 0 or (a.splits is not None and not 1 <= a.splits <= a.n):
        raise UsageError(f"--n must be in 1..{MAX_RENDER}, --seed >= 0 and --splits in 1..n (got --n {a.n}, "
                         f"--seed {a.seed}, --splits {a.splits})")
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


def add_parsers(sub) -> None:
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
