"""`prompt-cdm` command line: thin argparse subcommands, each calling one library function.

Bad input (unknown domain, recipe key, unreadable recipe, missing or non-SD backbone folder, a path
that cannot be written) prints one line naming the problem and the fix, and exits with status 2. Any
other exception -- a bug -- prints one line naming the log file that holds its traceback, and exits
with status 1: the command line never prints a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from datetime import datetime
from pathlib import Path

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

    from ..util.lock import LockTimeout
    from .common import check_placement

    args = build_parser().parse_args(argv)
    try:
        check_placement(args)
        args.func(args)
    except (UsageError, ConfigError, BackboneError, PlacementError, UnknownDomainError, FileNotFoundError, AdapterError,
            ComposeError, RegistryError, HubError, KeyStoreError, EvalError, LockTimeout) as e:
        _one_line(f"error: {e}")
        return 2
    except ValueError as e:  # the library's own validation (configs' __post_init__, ...)
        _one_line(f"error: {e}")
        return 2
    except RecursionError:
        _one_line("error: an input is nested too deeply; check the files passed")
        return 2
    except OSError as e:  # a path that is a file, a folder, unwritable, too long, a full disk, ...
        where = f" ({e.filename})" if e.filename else ""
        _one_line(f"error: {e.strerror or e}{where}; check the path and retry")
        return 2
    except KeyboardInterrupt:
        _one_line("interrupted")
        return 130
    except Exception as e:  # a bug: one line here, the traceback in a log file
        _one_line(f"internal error: {type(e).__name__}: {e} (traceback: {_crash_log(argv)}); please report it")
        return 1
    return 0


def _one_line(text: str) -> None:
    line = " ".join(str(text).split())  # an error message never spans lines
    print(f"prompt-cdm: {line[:2000]}", file=sys.stderr)


def _crash_log(argv) -> str:
    """Write the current exception's traceback to a log file; its path (or why none could be written)."""
    from ..data.sources import cache_root

    text = f"prompt-cdm {' '.join(sys.argv[1:] if argv is None else map(str, argv))}\n{traceback.format_exc()}"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for folder in (cache_root() / "logs", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, path = tempfile.mkstemp(prefix=f"crash-{stamp}-", suffix=".log", dir=folder)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return path
        except OSError:
            continue
    return "no log: no writable folder"


if __name__ == "__main__":
    sys.exit(main())
