"""docs/cli.md's flag tables are the parser's (prompt_cdm.cli.reference): the page cannot drift from --help."""
from pathlib import Path

from prompt_cdm.cli import build_parser
from prompt_cdm.cli.reference import commands, render, stale, table

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def test_docs_cli_tables_are_the_parsers():
    bad = stale(DOC.read_text(), build_parser())
    assert not bad, f"docs/cli.md is stale for {bad}: run `python -m prompt_cdm.cli.reference docs/cli.md`"


def test_every_command_is_listed_and_every_flag_has_help():
    cmds = list(commands(build_parser()))
    assert {"prompt-cdm generate", "prompt-cdm serve", "prompt-cdm router train", "prompt-cdm keys list"} <= {
        c for c, _, _ in cmds}
    for command, sub, _ in cmds:
        for action in sub._actions:
            assert action.help, f"{command}: {action.option_strings or action.dest} has no help"


def test_render_replaces_a_stale_table_and_keeps_the_prose():
    parser = build_parser()
    page = DOC.read_text()
    broken = page.replace("| `--lr LR` | `0.001` | Adam learning rate |\n", "")
    assert broken != page and stale(broken, parser) == ["prompt-cdm router train"]
    assert render(broken, parser) == page
    # a command the page lacks is appended with its help as the paragraph
    cut = page[: page.index("### `prompt-cdm keys list`")]
    redone = render(cut, parser)
    assert redone.rstrip("\n").endswith(table(dict((c, s) for c, s, _ in commands(parser))["prompt-cdm keys list"]))
    assert "### `prompt-cdm keys list`\n\nPrint the keys" in redone
