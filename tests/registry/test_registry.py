"""The registry: add (validated copies), policies, router artifacts, exact forgetting that `verify` proves,
crash recovery, refusals that change nothing on disk; `prompt-cdm registry ...` and `generate --registry`."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from PIL import Image

from prompt_cdm.adapters import LoraAdapter, LoraAdapterConfig, SoftPromptConfig, save_adapter
from prompt_cdm.adapters import lora, soft_prompt
from prompt_cdm.cli import main
from prompt_cdm.registry.registry import Registry, RegistryError






@pytest.fixture(scope="module")
def adapters(pipe, tmp_path_factory):
    """Saved adapter folders: a, b (LoRA), c (soft prompt), c2 (another soft prompt, same placeholder),
    alien (trained on another backbone)."""
    root = tmp_path_factory.mktemp("adapters")
    g = torch.Generator().manual_seed(0)

    def rl(rank):
        fresh = lora.create(pipe, LoraAdapterConfig(rank=rank, alpha=float(rank)))
        return LoraAdapter(fresh.config, {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in fresh.tensors.items()})

    def sp():
        s = soft_prompt.create(pipe, SoftPromptConfig("<cdm-c>", 2, init_word="star"))
        s.embeds = s.embeds + torch.randn(s.embeds.shape, generator=g)
        return s

    out = {
        "a": save_adapter(root / "a", rl(4), pipe, source_id="a", data_hash="hash-a"),
        "b": save_adapter(root / "b", rl(2), pipe, source_id="b", data_hash="hash-b"),
        "c": save_adapter(root / "c", sp(), pipe, source_id="c", data_hash="hash-c"),
        "c2": save_adapter(root / "c2", sp(), pipe, source_id="c2", data_hash="hash-c2"),
        "alien": save_adapter(root / "alien", rl(2), pipe, source_id="alien", fingerprint="0123456789abcdef"),
    }
    manifest = root / "manifest-b.json"
    manifest.write_text(json.dumps({"files": ["0001.png"], "hash": "hash-b"}))
    out["manifest-b"] = manifest
    return out


def _tree(folder) -> dict:
    """Every file under folder with its content hash (to prove a refusal changed nothing)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _filled(tmp_path, pipe, adapters) -> Registry:
    reg = Registry.create(tmp_path / "reg", "tiny-random", pipe.backbone_fingerprint)
    reg.add("a", adapters["a"])
    reg.add("b", adapters["b"], manifest=adapters["manifest-b"])
    reg.add("c", adapters["c"])
    return reg


def test_add_list_policies_and_refusals_change_nothing(pipe, adapters, tmp_path):
    reg = _filled(tmp_path, pipe, adapters)
    assert reg.sources == ["a", "b", "c"]
    assert sorted(p.name for p in reg.adapter_dir("a").iterdir()) == sorted(p.name for p in adapters["a"].iterdir())
    assert reg.manifest_path("b").is_file() and reg.source("c")["placeholder"] == "<cdm-c>"
    assert reg.set_policy("public", ["a", "c"]) == ["a", "c"]
    assert reg.resolve() == ["a", "b", "c"] and reg.resolve(policy="public") == ["a", "c"]
    assert reg.resolve(["c"], policy="public") == ["c"]
    assert reg.verify() == []
    assert Registry(reg.folder).policies == {"public": ["a", "c"]}  # persisted

    before = _tree(reg.folder)
    bad = tmp_path / "pickled"
    shutil.copytree(adapters["b"], bad)
    (bad / "optimizer.pt").write_bytes(b"x")
    refusals = [
        (lambda: reg.add("a", adapters["b"]), "already in the registry"),
        (lambda: reg.add("bad.name", adapters["b"]), "letters, digits"),
        (lambda: reg.add("alien", adapters["alien"]), "trained on backbone 0123456789abcdef"),
        (lambda: reg.add("c2", adapters["c2"]), "already uses the placeholder <cdm-c>"),
        (lambda: reg.add("p", bad), "pickle"),
        (lambda: reg.add("m", adapters["b"], manifest=tmp_path / "nope.json"), "not a file"),
        (lambda: reg.resolve(["zebra"]), "unknown source 'zebra'"),
        (lambda: reg.resolve(policy="vip"), "unknown policy 'vip'"),
        (lambda: reg.resolve(["b"], policy="public"), "not allowed by policy 'public'"),
        (lambda: reg.set_policy("x", ["a", "zebra"]), "unknown source 'zebra'"),
        (lambda: reg.set_policy("x", []), "at least one"),
        (lambda: reg.add_router("clf", "oracle", {"w": torch.zeros(1)}, ["a"]), "kind must be one of"),
        (lambda: reg.add_router("clf", "classifier", {"w": torch.zeros(1)}, ["zebra"]), "unknown source"),
        (lambda: reg.load_router("clf"), "no router 'clf'"),
    ]
    for fn, msg in refusals:
        with pytest.raises(RegistryError, match=msg):
            fn()
    assert _tree(reg.folder) == before
    with pytest.raises(RegistryError, match="not a registry"):
        Registry(tmp_path / "nowhere")
    with pytest.raises(RegistryError, match="already a registry"):
        Registry.create(reg.folder, "tiny", "x")


def test_forget_deletes_everything_derived_and_verify_proves_it(pipe, adapters, tmp_path):
    reg = _filled(tmp_path, pipe, adapters)
    reg.set_policy("public", ["a", "b"])
    reg.set_policy("b-only", ["b"])
    reg.add_router("classifier", "classifier", {"w": torch.randn(3, 4)}, ["a", "b", "c"])
    for s in reg.sources:
        reg.add_router(f"ratio-{s}", "ratio", {"w": torch.randn(4)}, [s])
    for s in ("a", "b"):
        reg.save_derived(f"caches/{s}/latents.safetensors", lambda p, s=s: p.write_bytes(b"derived from " + s.encode()))
    assert reg.verify() == []
    assert reg.summary()[1]["routers"] == ["classifier", "ratio-b"]

    rep = reg.forget("b")
    assert set(rep.deleted) >= {"adapters/b", "caches/b", "manifests/b.json", "routers/ratio-b"}
    assert rep.stale_routers == ["classifier"] and sorted(rep.policies) == ["b-only", "public"]
    assert not any((reg.folder / p).exists() for p in rep.deleted)
    clf = reg.router("classifier")
    assert clf["stale"] and clf["sources_seen"] == [] and clf["retrain_on"] == ["a", "c"]
    assert not (reg.router_dir("classifier") / "weights.safetensors").exists()  # it held b's information
    with pytest.raises(RegistryError, match="stale"):
        reg.load_router("classifier")
    assert reg.policies == {"public": ["a"], "b-only": []}
    assert reg.verify() == [] and Registry(reg.folder).verify() == []
    assert (reg.cache_dir("a") / "latents.safetensors").exists() and reg.load_router("ratio-a")[0]["sources_seen"] == ["a"]
    text = "".join(p.read_text(errors="ignore") for p in reg.folder.rglob("*.json") if p.name != "registry.json")
    assert '"b"' not in text  # no artifact beside the index mentions it

    # forgotten data cannot come back, under its name or another
    with pytest.raises(RegistryError, match="forgotten source"):
        reg.add("b", adapters["b"])
    with pytest.raises(RegistryError, match="forgotten"):
        reg.add("b-again", adapters["b"])
    # verify notices anything of b that reappears, and any tampering
    (reg.folder / "caches" / "b").mkdir()
    (reg.folder / "adapters" / "a" / "adapter_model.safetensors").write_bytes(b"tampered")
    problems = reg.verify()
    assert any("caches/b still exists" in p for p in problems)
    assert any("orphan caches/b" in p for p in problems)
    assert any("adapter_model.safetensors was modified" in p for p in problems)


def test_forget_after_a_crash_finishes_on_the_second_run(pipe, adapters, tmp_path, monkeypatch):
    reg = _filled(tmp_path, pipe, adapters)
    reg.add_router("ratio-c", "ratio", {"w": torch.randn(4)}, ["c"])
    real = shutil.rmtree
    calls = []

    def flaky(path, *a, **k):
        calls.append(path)
        if len(calls) == 1:
            raise OSError("disk hiccup")
        return real(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", flaky)
    with pytest.raises(OSError, match="disk hiccup"):
        reg.forget("c")
    monkeypatch.setattr(shutil, "rmtree", real)
    reg = Registry(reg.folder)
    assert "c" not in reg.sources and any("adapters/c still exists" in p for p in reg.verify())
    reg.forget("c")
    assert reg.verify() == []
    with pytest.raises(RegistryError, match="unknown source 'zebra'"):
        reg.forget("zebra")


# ---------------------------------------------------------------- the CLI


def _one_line_exit_2(capsys, args, needle):
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_cli_registry_and_generate_from_it(pipe, adapters, tmp_path, capsys):
    backbone = tmp_path / "backbone"
    pipe.save_pretrained(backbone, safe_serialization=True)
    reg = str(tmp_path / "reg")
    assert main(["registry", "init", "--registry", reg, "--backbone", str(backbone)]) == 0
    for name in ("a", "b", "c"):
        assert main(["registry", "add", name, str(adapters[name]), "--registry", reg]) == 0
    assert main(["registry", "policy", "set", "public", "a,c", "--registry", reg]) == 0
    capsys.readouterr()
    assert main(["registry", "list", "--registry", reg]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in listed["sources"]] == ["a", "b", "c"] and listed["policies"] == {"public": ["a", "c"]}

    before = _tree(tmp_path / "reg")
    _one_line_exit_2(capsys, ["registry", "add", "x", str(adapters["alien"]), "--registry", reg], "0123456789abcdef")
    _one_line_exit_2(capsys, ["registry", "forget", "zebra", "--registry", reg], "unknown source 'zebra'")
    _one_line_exit_2(capsys, ["registry", "policy", "set", "p", "a,zebra", "--registry", reg], "unknown source")
    out = tmp_path / "grid.png"
    gen = ["generate", "--registry", reg, "--steps", "2", "--out", str(out)]
    _one_line_exit_2(capsys, gen + ["--prompt", "a star", "--sources", "a,zebra"], "unknown source 'zebra'")
    _one_line_exit_2(capsys, gen + ["--prompt", "a star", "--policy", "vip"], "unknown policy 'vip'")
    _one_line_exit_2(capsys, gen + ["--prompt", "a star", "--policy", "public", "--sources", "b"], "not allowed")
    _one_line_exit_2(capsys, gen + ["--prompt", "a star", "--router", "ratio"], "no router")
    assert _tree(tmp_path / "reg") == before and not out.exists()

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square on the left\n")
    trace = tmp_path / "trace.json"
    assert main(gen + ["--prompts", str(prompts), "--policy", "public", "--router", "fixed", "--weights",
                       "a=0.25,c=0.75", "--sparse", "--trace", str(trace)]) == 0
    assert Image.open(out).size[0] > 2 * 64  # a grid of two
    data = json.loads(trace.read_text())
    assert data["sources"] == ["a", "c"] and len(data["images"]) == 2
    assert data["credit"] == pytest.approx({"a": 0.25, "c": 0.75})
    assert data["images"][1]["prompt"] == "a blue square on the left"
    assert trace.with_suffix(".png").is_file()

    capsys.readouterr()
    assert main(["registry", "forget", "c", "--registry", reg]) == 0
    assert main(["registry", "verify", "--registry", reg]) == 0
    assert "ok: 2 source(s)" in capsys.readouterr().out
    (tmp_path / "reg" / "caches").mkdir()
    (tmp_path / "reg" / "caches" / "c").mkdir()
    _one_line_exit_2(capsys, ["registry", "verify", "--registry", reg], "problem")


# ---------------------------------------------------------------- routers (classifier, ratio heads)


def _synthetic_cache(reg, name, mean, g, m=64):
    from safetensors.torch import save_file

    from prompt_cdm.routing.routers import CACHE_FILE

    tensors = {"latents": mean + 0.5 * torch.randn(m, 4, 16, 16, generator=g), "context": torch.randn(m, 64, generator=g)}
    reg.save_derived(f"caches/{name}/{CACHE_FILE}" if name else f"reference/{CACHE_FILE}",
                     lambda p: save_file(tensors, str(p)))


def test_routers_train_from_caches_route_and_forget(pipe, adapters, tmp_path):
    from prompt_cdm.compose.pipeline import build_estimator
    from prompt_cdm.compose.request import ComposeError
    from prompt_cdm.routing.routers import RouterTrainConfig, train_router

    reg = _filled(tmp_path, pipe, adapters)
    g = torch.Generator().manual_seed(0)
    for name, mean in (("a", 1.5), ("b", -1.5), ("c", 0.0), (None, 0.0)):
        _synthetic_cache(reg, name, mean, g)
    abar = pipe.scheduler.alphas_cumprod
    cfg = RouterTrainConfig(steps=60, batch_size=32, use_context=False)
    with pytest.raises(RegistryError, match="no router"):
        build_estimator("ratio", ["a", "b"], heads=reg.heads)
    rep = train_router(reg, "classifier", abar, cfg)
    assert set(rep) == {"classifier"} and rep["classifier"]["final_loss"] < 0.9  # chance: log 3 = 1.10
    assert set(train_router(reg, "ratio", abar, cfg, ["a", "b"])) == {"ratio-a", "ratio-b"}
    assert reg.router("classifier")["sources_seen"] == ["a", "b", "c"]
    assert reg.router("ratio-a")["sources_seen"] == ["a"] and reg.verify() == []

    x = torch.cat([1.5 + 0.5 * torch.randn(8, 4, 16, 16, generator=g), -1.5 + 0.5 * torch.randn(8, 4, 16, 16, generator=g)])
    for kind in ("classifier", "ratio"):
        est, ctx = build_estimator(kind, ["a", "b"], heads=reg.heads)
        assert ctx  # compose hands the router the caption embedding
        est.reset(2, 16)
        est.set_state(0, 1, torch.tensor(20))  # little noise: the sources are easy to tell apart
        w = est.weights(x)
        assert (w[:8, 0] > 0.5).all() and (w[8:, 1] > 0.5).all(), (kind, w)

    reg.forget("b")
    assert reg.verify() == [] and "ratio-b" not in reg.routers
    with pytest.raises(RegistryError, match="stale"):
        build_estimator("classifier", ["a", "c"], heads=reg.heads)
    build_estimator("ratio", ["a"], heads=reg.heads)  # a's own head is untouched by forgetting b
    with pytest.raises(ComposeError, match="needs trained heads"):
        build_estimator("ratio", ["a"])


def test_cli_router_cache_train_and_generate(pipe, adapters, tmp_path, capsys):
    backbone = tmp_path / "backbone"
    pipe.save_pretrained(backbone, safe_serialization=True)
    reg = str(tmp_path / "reg")
    assert main(["registry", "init", "--registry", reg, "--backbone", str(backbone)]) == 0
    for name in ("a", "c"):
        assert main(["registry", "add", name, str(adapters[name]), "--registry", reg]) == 0
    for i, domain in enumerate(("stars", "striped", "base")):
        assert main(["world", "render", "--domain", domain, "--n", "3", "--seed", str(i), "--out",
                     str(tmp_path / domain)]) == 0
    _one_line_exit_2(capsys, ["router", "train", "--kind", "ratio", "--registry", reg, "--steps", "3"], "no reference")
    for name, domain in (("a", "stars"), ("c", "striped")):
        assert main(["router", "cache", "--registry", reg, "--source", name, "--data", str(tmp_path / domain)]) == 0
    assert main(["router", "cache", "--registry", reg, "--reference", "--data", str(tmp_path / "base")]) == 0
    assert main(["router", "train", "--kind", "ratio", "--registry", reg, "--steps", "3", "--batch-size", "4"]) == 0
    assert main(["router", "train", "--kind", "classifier", "--registry", reg, "--steps", "3",
                 "--batch-size", "4"]) == 0
    assert main(["registry", "verify", "--registry", reg]) == 0
    for router in ("ratio", "classifier"):
        out, trace = tmp_path / f"{router}.png", tmp_path / f"{router}_trace.json"
        assert main(["generate", "--registry", reg, "--prompt", "a red star", "--router", router, "--steps", "2",
                     "--out", str(out), "--trace", str(trace)]) == 0
        data = json.loads(trace.read_text())
        assert data["sources"] == ["a", "c"] and abs(sum(data["credit"].values()) - 1) < 1e-5
    # the caption prior: `router cache` counted each source's captions; a prompt naming one source's
    # distinctive words routes to it even under the uniform router
    assert (tmp_path / "reg" / "caches" / "a" / "caption_stats.json").is_file()
    for prompt, favoured in (("a red star", "a"), ("a red circle on a striped background", "c")):
        trace = tmp_path / "prior_trace.json"
        assert main(["generate", "--registry", reg, "--prompt", prompt, "--router", "uniform", "--caption-prior",
                     "--steps", "2", "--out", str(tmp_path / "prior.png"), "--trace", str(trace)]) == 0
        credit = json.loads(trace.read_text())["credit"]
        assert credit[favoured] > 0.9, (prompt, credit)
    _one_line_exit_2(capsys, ["generate", "--adapter", str(adapters["a"]), "--prompt", "a", "--caption-prior",
                              "--out", str(tmp_path / "x.png")], "--caption-prior reads")
    assert main(["registry", "forget", "a", "--registry", reg]) == 0
    assert not (tmp_path / "reg" / "caches" / "a").exists()
    assert main(["registry", "verify", "--registry", reg]) == 0
