"""The import rule (STYLE.md habit 1): only the edge modules touch diffusers/peft/huggingface_hub/fastapi."""
import ast
from pathlib import Path

import prompt_cdm

PKG = Path(prompt_cdm.__file__).parent
HEAVY = ("diffusers", "peft", "huggingface_hub", "fastapi")
# the modules allowed to import them: backbone and its pretraining recipe, adapters, training
# (and the judge's recipe, which reconstructs through the backbone's VAE), hub, serving
EDGE = {"backbone.py", "pretrain.py", "train.py", "hub.py", "serve.py", "adapters", "world/judge_train.py"}


def _imports(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module.split(".")[0])
    return mods


def test_only_edge_modules_import_heavy_libraries():
    offenders = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).as_posix()
        if rel in EDGE or rel.split("/")[0] in EDGE:
            continue
        bad = _imports(path) & set(HEAVY)
        if bad:
            offenders.append(f"{rel}: {sorted(bad)}")
    assert not offenders, offenders


def test_nothing_imports_the_cli():
    for path in PKG.rglob("*.py"):
        if path.name == "cli.py":
            continue
        src = path.read_text()
        assert "from .cli" not in src and "prompt_cdm.cli" not in src and "from ..cli" not in src, path
