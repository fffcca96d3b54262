"""docs/cli.md's flag tables, written from the parser itself so the page cannot drift from `--help`.

    python -m prompt_cdm.cli.reference docs/cli.md     # rewrite the tables in place (prose is kept)

Each command's section is a "### prompt-cdm COMMAND" heading (the command in backticks), a paragraph, then a table with one row per
flag: its spellings with metavar, `(required)` / `(positional)`, the default, the help. A test
(tests/cli/test_reference.py) checks that the page holds exactly these tables.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

HEADER = "| flag | default | what it does |\n|---|---|---|"


def commands(parser: argparse.ArgumentParser, prefix: str = "prompt-cdm"):
    """[(\"prompt-cdm world render\", subparser, help)] for every leaf command, in `--help` order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                has_sub = any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)
                if has_sub:
                    yield from commands(sub, f"{prefix} {name}")
                else:
                    yield f"{prefix} {name}", sub, helps.get(name, "")
            return


def _row(action: argparse.Action) -> str | None:
    if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
        return None
    if not action.option_strings:
        spell = f"`{action.dest}` (positional)"
    else:
        takes_value = action.nargs != 0
        meta = action.metavar or action.dest.upper()
        spell = ", ".join(f"`{o} {meta}`" if takes_value else f"`{o}`" for o in action.option_strings)
        if action.required:
            spell += " (required)"
    default = action.default
    if isinstance(default, (list, tuple)):
        default = ",".join(map(str, default))
    flag_only = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
    shown = "" if default is None or default == "" or flag_only or not action.option_strings else f"`{default}`"
    text = (action.help or "").replace("|", "\\|").replace("\n", " ")
    if action.choices:
        text += f" (one of {', '.join(map(str, action.choices))})"
    return f"| {spell} | {shown} | {text} |"


def table(sub: argparse.ArgumentParser) -> str:
    """The markdown flag table of one command."""
    rows = [r for r in (_row(a) for a in sub._actions) if r is not None]
    return "\n".join([HEADER, *rows])


def _section_re(command: str) -> re.Pattern:
    return re.compile(rf"(^### `{re.escape(command)}`\n.*?)(^\| flag \| default \| what it does \|\n(?:^\|[^\n]*(?:\n|$))*)",
                      re.M | re.S)


def render(page: str, parser: argparse.ArgumentParser) -> str:
    """`page` with every command's table replaced by the parser's; a command the page lacks is appended
    (its paragraph: the command's help)."""
    for command, sub, help_ in commands(parser):
        pattern = _section_re(command)
        m = pattern.search(page)
        if m is not None and "\n### " not in m.group(1)[4:]:
            page = page[: m.start(2)] + table(sub) + "\n" + page[m.end(2):]
        else:
            text = (help_ or "")[:1].upper() + (help_ or "")[1:]
            page = page.rstrip("\n") + f"\n\n### `{command}`\n\n{text}.\n\n{table(sub)}\n"
    return page


def stale(page: str, parser: argparse.ArgumentParser) -> list[str]:
    """The commands whose table on `page` differs from the parser's (empty: the page is current)."""
    out = []
    for command, sub, _ in commands(parser):
        m = _section_re(command).search(page)
        if m is None or "\n### " in m.group(1)[4:] or m.group(2).rstrip("\n") != table(sub):
            out.append(command)
    return out


def main(argv: list[str] | None = None) -> int:
    from . import build_parser

    args = argv if argv is not None else sys.argv[1:]
    path = Path(args[0] if args else "docs/cli.md")
    page = path.read_text()
    new = render(page, build_parser())
    if new != page:
        path.write_text(new)
    print(f"{path}: {len(stale(page, build_parser()))} table(s) rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
