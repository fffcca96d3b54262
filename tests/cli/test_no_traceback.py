"""The command line never prints a traceback (issue 16, findings 7 and 9): every argument is validated before
any model loads, bad files (JSON or TOML nested 100k deep, a recipe that is a folder) are one-line
refusals with exit status 2, and a bug is one line naming its log file (exit 1). A hypothesis fuzz over
the argument space checks the same; loading a model is replaced by a sentinel, so an argument that got
past validation costs nothing."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import save_random_adapters
from prompt_cdm.cli import main
from prompt_cdm.registry.registry import Registry

DEEP = "[" * 100_000 + "]" * 100_000
EXAMPLES = int(__import__("os").environ.get("PROMPT_CDM_FUZZ_EXAMPLES", "60"))  # more for a longer hunt


class ModelWouldLoad(BaseException):
    """Raised instead of loading a backbone: the arguments passed every check (not an Exception, so the
    CLI's last-resort handler does not swallow it)."""


@pytest.fixture(autouse=True)
def no_models(monkeypatch):
    import prompt_cdm.backbone.loading as loading

    def refuse(*a, **k):
        raise ModelWouldLoad

    monkeypatch.setattr(loading, "load", refuse)
    monkeypatch.setattr(loading, "load_quietly", refuse)


@pytest.fixture(scope="module")
def world(pipe, tmp_path_factory):
    """A registry with sources a, c; a policy; an adapter folder; paths of every awkward kind."""
    root = tmp_path_factory.mktemp("cli")
    ad = save_random_adapters(pipe, root / "adapters")
    reg = Registry.create(root / "reg", "tiny-random", pipe.backbone_fingerprint)
    reg.add("a", ad["a"])
    reg.add("c", ad["c"])
    reg.set_policy("p", ["a"])
    (root / "afile").write_text("x")
    deep = root / "deep-adapter"
    shutil.copytree(ad["b"], deep)
    (deep / "adapter_config.json").write_text(DEEP)
    (root / "deep.toml").write_text("a = " + "[" * 50_000 + "]" * 50_000 + "\n")
    pulled = root / "pushed"
    shutil.copytree(ad["b"], pulled)
    (pulled / "checksums.json").write_text(DEEP)
    return {"root": root, "reg": str(root / "reg"), "adapters": ad, "deep": str(deep), "pushed": str(pulled)}


def _run(capsys, args) -> tuple[int | str, list[str]]:
    """(exit status, or "model" when the arguments reached a model load; stderr lines)."""
    capsys.readouterr()
    try:
        code = main([str(x) for x in args])
    except ModelWouldLoad:
        code = "model"
    except SystemExit as e:  # argparse's own refusal (usage + one line), status 2
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err.strip().splitlines()


def _refused(capsys, args, needle: str) -> None:
    code, err = _run(capsys, args)
    assert code == 2 and len(err) == 1 and needle in err[0], (args, code, err)


def test_findings_7_and_9_are_one_line_refusals_before_any_model(world, capsys, tmp_path):
    reg, root = world["reg"], world["root"]
    gen = ["generate", "--registry", reg, "--prompt", "a star", "--steps", "2"]
    for args, needle in [
        (gen + ["--out", str(tmp_path)], "is a folder"),
        (gen + ["--out", str(root / "afile" / "x.png")], "cannot be written"),
        (gen + ["--out", "/proc/nowhere/x.png"], "cannot be written"),
        (gen + ["--out", str(tmp_path / "x.foo")], "unknown image extension"),
        (gen + ["--out", str(tmp_path / "x.png"), "--steps", "-1"], "--steps must be in 1.."),
        (gen + ["--out", str(tmp_path / "x.png"), "--steps", "0"], "--steps must be in 1.."),
        (gen + ["--out", str(tmp_path / "x.png"), "--seed", str(2**70)], "--seed must be in"),
        (gen + ["--out", str(tmp_path / "x.png"), "--guidance", "nan"], "--guidance must be"),
        (gen + ["--out", str(tmp_path / "x.png"), "--guidance", "-1"], "--guidance must be"),
        (["generate", "--registry", reg, "--prompt", "", "--out", str(tmp_path / "x.png")], "prompt is empty"),
        (["serve", "--registry", reg, "--port", "99999"], "--port must be in 0..65535"),
        (["world", "render", "--domain", "stars", "--n", "-1", "--out", str(tmp_path / "w")], "--n must be in 1.."),
        (["registry", "add", "x" * 300, str(world["adapters"]["b"]), "--registry", reg], "at most 100"),
        (["registry", "add", "d", world["deep"], "--registry", reg], "nested too deeply"),
        (["hub", "push", world["deep"], f"file://{tmp_path / 'dest'}"], "nested too deeply"),
        (["hub", "pull", world["pushed"], "--into", str(tmp_path / "p")], "nested too deeply"),
        (["hub", "pull", world["pushed"], "--into", str(root / "afile" / "p")], "cannot create"),
        (["train", "--source", str(tmp_path), "--recipe", str(tmp_path), "--out", str(tmp_path / "o")], "not a file"),
        (["train", "--source", str(tmp_path), "--recipe", str(root / "deep.toml"), "--out", str(tmp_path / "o")],
         "nested too deeply"),
    ]:
        _refused(capsys, args, needle)
    assert not (tmp_path / "x.png").exists() and not list(root.glob("afile*/**"))
    assert not [p for p in root.iterdir() if p.name.endswith((".old", ".pull"))]  # no stray folders
    code, _ = _run(capsys, gen + ["--out", str(tmp_path / "x.png")])
    assert code == "model"  # the same arguments with a good --out reach the model


def test_a_bug_is_one_line_naming_its_log(world, capsys, monkeypatch, tmp_path):
    import prompt_cdm.cli.compose as compose

    monkeypatch.setenv("PROMPT_CDM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(compose, "_read_prompts", lambda a: {}["boom"])
    code, err = _run(capsys, ["generate", "--registry", world["reg"], "--prompt", "x", "--out", tmp_path / "x.png"])
    assert code == 1 and len(err) == 1 and "internal error: KeyError" in err[0], err
    log = Path(err[0].split("traceback: ")[1].split(")")[0])
    assert log.is_file() and "Traceback" in log.read_text() and log.parent == tmp_path / "cache" / "logs"


# ---------------------------------------------------------------- fuzz

NUMBERS = st.one_of(st.integers(-2**70, 2**70), st.sampled_from(["nan", "inf", "-inf", "-0", "1e308", "0", "1.5"]))
TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["", "x" * 300, "../..", "a,b", "<cdm-c>", "a=0.5,c=0.5"]))


def _paths(root: Path):
    return st.sampled_from([str(root / "afile"), str(root / "afile" / "x.png"), str(root), "/proc/x/y.png",
                            str(root / "new" / "out.png"), str(root / "o.jpg"), str(root / "o.tiff"), "/dev/null",
                            str(root / "deep.toml"), str(root / "deep-adapter"), str(root / "missing.json")])


def _argv(root: Path, reg: str, adapter: str):
    path = _paths(root)
    val = st.one_of(NUMBERS.map(str), TEXT, path)
    gen_flags = st.lists(st.tuples(st.sampled_from(["--steps", "--guidance", "--seed", "--size", "--router",
                                                    "--weights", "--sources", "--policy", "--uncond", "--batch-size",
                                                    "--temperature", "--sparse-eps", "--sparse-warmup", "--trace",
                                                    "--caption-prior-strength", "--set"]), val), max_size=4)
    generate = st.builds(lambda p, o, fl: ["generate", "--registry", reg, "--prompt", p, "--out", o]
                         + [x for f in fl for x in f], TEXT, path, gen_flags)
    registry = st.one_of(
        st.builds(lambda n, d: ["registry", "add", n, d, "--registry", reg], TEXT, st.one_of(path, st.just(adapter))),
        st.builds(lambda n: ["registry", "forget", n, "--registry", st_reg(root)], TEXT),
        st.builds(lambda a, n, s: ["registry", "policy", a, n, s, "--registry", reg],
                  st.sampled_from(["set", "rm", "list", "zap"]), TEXT, TEXT),
        st.builds(lambda r: ["registry", "verify", "--registry", r], st.one_of(path, st.just(reg))))
    keys = st.one_of(st.builds(lambda p, n: ["keys", "create", "--registry", reg, "--policy", p, "--note", n], TEXT, TEXT),
                     st.builds(lambda k: ["keys", "revoke", k, "--registry", reg], TEXT))
    serve = st.builds(lambda port, k, v: ["serve", "--registry", reg, "--port", port, k, v],
                      NUMBERS.map(str), st.sampled_from(["--max-steps", "--queue-size", "--timeout", "--threads"]),
                      NUMBERS.map(str))
    # folders and file:// URLs only: a hub repo id would go to the network
    hub = st.one_of(st.builds(lambda d, dest: ["hub", "push", d, f"file://{dest}"], st.one_of(path, st.just(adapter)),
                              path),
                    st.builds(lambda s, into: ["hub", "pull", s, "--into", into], path, path))
    world_ = st.builds(lambda n, seed, out: ["world", "render", "--domain", "stars", "--n", n, "--seed", seed,
                                             "--out", out], st.sampled_from(["-1", "0", "1", "nan", "x", str(2**70)]),
                       NUMBERS.map(str), path)
    train = st.builds(lambda r, s: ["train", "--source", str(root), "--recipe", r, "--out", str(root / "t"), "--set", s],
                      path, TEXT)
    return st.one_of(generate, registry, keys, serve, hub, world_, train)


def st_reg(root: Path) -> str:
    return str(root / "forget-reg")  # forgetting in the fuzz happens on a scratch registry


def test_fuzz_the_command_line_finds_no_traceback(world, pipe, capsys):
    root = world["root"]
    scratch = Registry.create(st_reg(root), "tiny-random", pipe.backbone_fingerprint)
    scratch.add("a", world["adapters"]["a"])
    seen = {}

    @given(argv=_argv(root, world["reg"], str(world["adapters"]["b"])))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def fuzz(argv):
        code, err = _run(capsys, argv)
        seen[code] = seen.get(code, 0) + 1
        assert code in (0, 2, "model"), (argv, code, err)  # 1 would be a bug behind a one-line message

    with tempfile.TemporaryDirectory() as cache:
        import os

        old = os.environ.get("PROMPT_CDM_CACHE")
        os.environ["PROMPT_CDM_CACHE"] = cache
        try:
            fuzz()
        finally:
            os.environ.pop("PROMPT_CDM_CACHE") if old is None else os.environ.__setitem__("PROMPT_CDM_CACHE", old)
    print("fuzz exit codes:", seen)
    assert seen.get(2), seen
    assert Registry(world["reg"]).verify() == [], "a refused command changed the registry"
