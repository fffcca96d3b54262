"""`prompt-cdm` command line: thin argparse subcommands, each calling one library function.

Bad input (unknown domain, recipe key, unreadable recipe, missing or non-SD backbone folder)
prints one line naming the problem and the fix, and exits with status 2.
"""
from __future__ import annotations

import argparse
import sys

from . import backbone, compose, evaluate, hub, runs, serve, train, world
from .common import UsageError

__all__ = ["UsageError", "build_parser", "main"]
GROUPS = (world, backbone, evaluate, runs, compose, train, hub, serve)  # the order of `prompt-cdm --help`


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prompt-cdm", description="Compartmentalized diffusion models on a frozen SD backbone")
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from ..adapters.errors import AdapterError
    from ..backbone.loading import BackboneError
    from ..backbone.placement import PlacementError
    from ..compose.request import ComposeError
    from ..registry.registry import RegistryError
    from ..util.config import ConfigError
    from ..hub.hub import HubError
    from ..serve.keys import KeyStoreError
    from ..world.domains import UnknownDomainError
    from eval.errors import EvalError

    from .common import check_placement

    args = build_parser().parse_args(argv)
    try:
        check_placement(args)
        args.func(args)
    except (UsageError, ConfigError, BackboneError, PlacementError, UnknownDomainError, FileNotFoundError, AdapterError,
            ComposeError, RegistryError, HubError, KeyStoreError, EvalError) as e:
        print(f"prompt-cdm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
