"""What every command group shares: the usage error, recipe flags, prompt reading."""
from __future__ import annotations

import argparse
from pathlib import Path


class UsageError(ValueError):
    """Bad input from the command line; printed as one line, exit status 2."""


def check_writable_file(path, what: str, error=UsageError):
    from ..util.io import check_writable_file as check

    return check(path, what, error)


def check_image_out(path) -> None:
    """UsageError unless `path` is a writable file path with an image extension PIL saves (before any model
    runs: a bad --out must not cost the generation)."""
    from ..util.io import image_format

    if Path(path).is_dir():
        raise UsageError(f"--out {path} is a folder; give an image file path (e.g. out.png)")
    if image_format(path) is None:
        raise UsageError(f"--out {path}: unknown image extension {Path(path).suffix or '(none)'!r}; use .png, "
                         ".jpg or .webp")
    check_writable_file(path, "--out")


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="TOML recipe (see recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set unet.steps=100 (type-checked; repeatable)")
    p.add_argument("--smoke", action="store_true", help="merge the recipe's [smoke] section (a seconds-long run)")


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


def _train_errors():
    from ..training.executors import ExecutorError
    from ..data.sources import SourceError
    from ..training.train import TrainError

    return (SourceError, TrainError, ExecutorError)
