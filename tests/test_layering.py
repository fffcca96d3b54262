"""The package DAG (DESIGN.md section 3), checked on every import statement, lazy ones included.

core -> estimators / world -> backbone / adapters / data -> compose -> registry / routing
     -> training / hub / serve -> eval -> cli and the demo.
A module may import its own layer and the layers below it, never one above. The library (every
layer below eval) never imports eval; eval never imports the CLI or the demo. The pure core and the
estimators import only torch and the standard library (STYLE.md habit 1); only the edge packages
import diffusers / peft / huggingface_hub / fastapi.
"""
import ast
import sys
from pathlib import Path

import pytest

import prompt_cdm

PKG = Path(prompt_cdm.__file__).resolve().parent
ROOT = PKG.parent
LAYERS = {
    "util": 0, "core": 0,
    "estimators": 1, "world": 1,
    "backbone": 2, "adapters": 2, "data": 2,
    "compose": 3,
    "registry": 4, "routing": 4,
    "training": 5, "hub": 5, "serve": 5,
    "eval": 6,
    "cli": 7, "demo": 7,
}
# a module whose layer is not its folder's: the judge's training recipe reconstructs through the backbone
MODULE_LAYER = {"prompt_cdm.world.judge_train": 5}
API = "prompt_cdm"  # the package's __init__: the public API, above the library and below eval
PURE = ("prompt_cdm.core.mixing", "prompt_cdm.core.sampling", "prompt_cdm.core.sigmas",
        "prompt_cdm.core.attribution", "prompt_cdm.core.caption_prior", "prompt_cdm.estimators")
HEAVY = ("diffusers", "peft", "huggingface_hub", "fastapi")
EDGE = ("prompt_cdm.backbone", "prompt_cdm.adapters", "prompt_cdm.training", "prompt_cdm.hub", "prompt_cdm.serve",
        "prompt_cdm.world.judge_train")


def modules():
    """(module name, is package, path) of every module of prompt_cdm and eval."""
    for top in ("prompt_cdm", "eval"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            yield ".".join(parts[:-1] if is_pkg else parts), is_pkg, path


def imports(name: str, is_pkg: bool, path: Path):
    """Absolute names of everything `path` imports (a `from X import y` yields X.y too: y may be a module)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            yield mod
            yield from (f"{mod}.{a.name}" for a in node.names)


def layer(module: str) -> int | None:
    for m, lv in MODULE_LAYER.items():
        if module == m or module.startswith(m + "."):
            return lv
    parts = module.split(".")
    if parts[0] == "eval":
        return LAYERS["eval"]
    if parts[0] != "prompt_cdm":
        return None
    if len(parts) == 1:
        return None  # the API package itself
    return LAYERS.get(parts[1])


ALL = list(modules())


def test_every_package_has_a_layer():
    missing = sorted({m.split(".")[1] for m, _, _ in ALL if m.startswith("prompt_cdm.") and layer(m) is None})
    assert not missing, f"give these packages a layer in LAYERS: {missing}"


@pytest.mark.parametrize("name,is_pkg,path", ALL, ids=[m for m, _, _ in ALL])
def test_no_module_imports_upward(name, is_pkg, path):
    own = layer(name) if name != API else LAYERS["eval"] - 0.5  # the API sits above the library
    bad = []
    for target in imports(name, is_pkg, path):
        if target == API or not (target.startswith("prompt_cdm.") or target.split(".")[0] == "eval"):
            continue
        tl = layer(target)
        if tl is not None and tl > own:
            bad.append(target)
    assert not bad, f"{name} (layer {own}) imports upward: {sorted(set(bad))}"


def test_library_never_imports_eval_and_eval_never_imports_the_cli():
    for name, is_pkg, path in ALL:
        targets = set(imports(name, is_pkg, path))
        top = name.split(".")
        if top[0] == "prompt_cdm" and (len(top) == 1 or top[1] not in ("cli", "demo")):
            assert not any(t.split(".")[0] == "eval" for t in targets), f"{name} imports eval"
        if top[0] == "eval":
            bad = [t for t in targets if t.startswith(("prompt_cdm.cli", "prompt_cdm.demo"))]
            assert not bad, f"{name} imports {bad}"


def _is(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


PURE_MODULES = [(m, p, f) for m, p, f in ALL if _is(m, PURE)]


@pytest.mark.parametrize("name,is_pkg,path", PURE_MODULES, ids=[m for m, _, _ in PURE_MODULES])
def test_pure_modules_import_only_torch_and_stdlib(name, is_pkg, path):
    assert len(PURE_MODULES) >= 12  # 5 core modules, estimators' __init__, base + 6 estimators
    for target in imports(name, is_pkg, path):
        top = target.split(".")[0]
        if top == "prompt_cdm":
            assert _is(target, PURE) or target in ("prompt_cdm.core", "prompt_cdm.estimators"), (
                f"{name} imports {target}, which is not a pure module")
        else:
            assert top == "torch" or top in sys.stdlib_module_names or top == "__future__", (
                f"{name} imports {target}: pure modules may import only torch + stdlib")


def test_only_edge_modules_import_heavy_libraries():
    offenders = []
    for name, is_pkg, path in ALL:
        if not name.startswith("prompt_cdm") or _is(name, EDGE):
            continue
        bad = {t.split(".")[0] for t in imports(name, is_pkg, path)} & set(HEAVY)
        if bad:
            offenders.append(f"{name}: {sorted(bad)}")
    assert not offenders, offenders


def test_nothing_imports_the_cli():
    for name, is_pkg, path in ALL:
        if _is(name, ("prompt_cdm.cli",)):
            continue
        bad = [t for t in imports(name, is_pkg, path) if _is(t, ("prompt_cdm.cli",))]
        assert not bad, f"{name} imports the CLI: {bad}"
