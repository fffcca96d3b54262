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


def add_placement(p: argparse.ArgumentParser, what: str = "the backbone") -> None:
    """--device / --dtype: where `what` runs (checked before any model loads; backbone.placement)."""
    from ..backbone.placement import DEVICE_HELP, DTYPE_HELP

    p.add_argument("--device", default="auto", help=f"{what}: {DEVICE_HELP}")
    p.add_argument("--dtype", default="auto", help=f"{what}: {DTYPE_HELP}")


def add_compile(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow first step; then faster on "
                   "a GPU; routing stays exact)")


def check_placement(a) -> None:
    """Resolve a command's --device / --dtype now: a device that is not there is refused before anything runs."""
    from ..backbone.placement import Placement

    if hasattr(a, "device"):
        Placement.of(a.device, getattr(a, "dtype", None)).resolve()


def _load_backbone_quietly(name: str, a=None):
    """The backbone `name`, placed by the command's --device / --dtype (if it has them)."""
    from ..backbone.loading import load_quietly

    pipe = load_quietly(name, getattr(a, "dtype", None), getattr(a, "device", None))
    if getattr(a, "compile", False):
        from ..backbone.loading import compile_unet

        compile_unet(pipe)
    return pipe


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
