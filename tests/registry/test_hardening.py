"""Issue 16's registry findings: verify accounts for every file (3), adapters with huge values or the wrong
keys/shapes are refused by add and cannot blacken a composition (5), symbolic links are refused by add,
hub push and hub pull (6), and forget also clears the user cache and the audit log (10)."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import save_random_adapters
from prompt_cdm.adapters.errors import AdapterError
from prompt_cdm.adapters.kinds import backbone_table
from prompt_cdm.cli import main
from prompt_cdm.registry.registry import FORGOTTEN_MARK, Registry, RegistryError

W = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def adapters(pipe, tmp_path_factory):
    return save_random_adapters(pipe, tmp_path_factory.mktemp("adapters"))


def _reg(pipe, folder, table=True) -> Registry:
    return Registry.create(folder, "tiny-random", pipe.backbone_fingerprint,
                           modules=backbone_table(pipe) if table else None)


def _variant(src, dst, config=None, tensors=None):
    shutil.copytree(src, dst)
    if config is not None:
        (dst / "adapter_config.json").write_text(json.dumps(config(json.loads((dst / "adapter_config.json").read_text()))))
    if tensors is not None:
        save_file(tensors(load_file(str(dst / W))), str(dst / W))
    return dst


def test_verify_accounts_for_every_file_and_finds_forgotten_weights_anywhere(pipe, adapters, tmp_path):
    """Finding 3: a copy of a forgotten source's weights inside another source's folder passed verify, and
    files planted in a cache, router, reference or serve folder were not checked."""
    reg = _reg(pipe, tmp_path / "reg")
    reg.add("a", adapters["a"])
    reg.add("b", adapters["b"])
    reg.add_router("ratio-a", "ratio", {"w": torch.zeros(2)}, ["a"])
    reg.save_derived("caches/a/latents.safetensors", lambda p: p.write_bytes(b"x"))
    reg.forget("b")
    assert reg.verify() == []

    # a source folder carrying the forgotten weights in a subfolder cannot be added...
    smuggler = shutil.copytree(adapters["c"], tmp_path / "smuggler")
    (smuggler / "extra").mkdir()
    shutil.copyfile(adapters["b"] / W, smuggler / "extra" / "w.safetensors")
    with pytest.raises(RegistryError, match="copy of forgotten source 'b'"):
        reg.add("d", smuggler)
    # ... and planting files anywhere is a verify problem naming each
    planted = {"adapters/a/extra/w.safetensors": adapters["b"] / W, "routers/ratio-a/notes.txt": None,
               "caches/a/more.bin": None, "reference/x.png": None, "serve/other.json": None}
    for rel, src in planted.items():
        (reg.folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, reg.folder / rel) if src else (reg.folder / rel).write_text("planted")
    (reg.folder / "adapters" / "a" / "empty").mkdir()
    problems = "\n".join(reg.verify())
    for rel in planted:
        assert rel in problems, (rel, problems)
    assert "adapters/a/extra/w.safetensors is a copy of 'b''s weights" in problems
    assert "unregistered empty folder adapters/a/empty" in problems
    assert main(["registry", "verify", "--registry", str(reg.folder)]) == 2


def test_add_refuses_unbounded_or_misshapen_adapters_and_a_nan_step_fails(pipe, adapters, tmp_path):
    """Finding 5: 3e38 weights and alpha 1e308 passed add and gave black images; add skipped the key/shape
    check against the backbone (wrong rank, missing or extra keys, a soft-prompt config with LoRA tensors)."""
    from prompt_cdm.adapters import LoraAdapterConfig, lora

    for cfg in (LoraAdapterConfig(rank=3), LoraAdapterConfig(rank=2, text_encoder=True)):  # the table = the pipeline
        assert lora.shapes_from_table(backbone_table(pipe), cfg) == lora.expected_shapes(pipe, cfg)
    reg = _reg(pipe, tmp_path / "reg")
    a = adapters["a"]
    k0 = sorted(load_file(str(a / W)))[0]

    def params(**kw):
        return lambda c: dict(c, params=dict(c["params"], **kw))

    def extra(t):  # a well-formed pair for a module this backbone does not have
        a_key = next(k for k in t if k.endswith("to_k.lora_A.weight"))
        b_key = a_key.replace("lora_A", "lora_B")
        return dict(t, **{"unet.nonexistent.to_k.lora_A.weight": t[a_key].clone(),
                          "unet.nonexistent.to_k.lora_B.weight": t[b_key].clone()})

    cases = {
        "huge": (_variant(a, tmp_path / "huge", tensors=lambda t: dict(t, **{k0: torch.full_like(t[k0], 3e38)})),
                 "magnitude"),
        "alpha": (_variant(a, tmp_path / "alpha", config=params(alpha=1e308)), "alpha must be in"),
        "rank": (_variant(a, tmp_path / "rank", config=params(rank=2, alpha=2.0)), "rank"),
        "missing": (_variant(a, tmp_path / "missing", tensors=lambda t: {k: v for k, v in t.items()
                                                                         if "down_blocks" not in k}), "lack"),
        "extra": (_variant(a, tmp_path / "extra", tensors=extra), "no place for"),
        "sp-lora": (_variant(a, tmp_path / "sp", config=lambda c: dict(
            c, kind="soft-prompt", params={"placeholder": "<cdm-z>", "num_vectors": 2, "init_word": ""})),
                    "soft prompt"),
    }
    for name, (folder, needle) in cases.items():
        with pytest.raises(RegistryError, match=needle):
            reg.add(name, folder)
    assert reg.sources == [] and reg.verify() == []

    from prompt_cdm.adapters.store import load_adapter

    with pytest.raises(AdapterError, match="magnitude"):
        load_adapter(cases["huge"][0], pipe)

    # an adapter that turns the UNet's output NaN fails the composition instead of returning a black image
    from prompt_cdm.compose.pipeline import CDMPipeline
    from prompt_cdm.compose.request import ComposeError, ComposeRequest

    reg.add("a", a)
    reg.add("b", adapters["b"])

    def poison(module, args, output):
        output.sample[-1] = float("inf")
        return output

    handle = pipe.unet.register_forward_hook(poison)
    try:
        with pytest.raises(ComposeError, match=r"source\(s\) b is NaN or infinite"):
            CDMPipeline(pipe, registry=reg)(ComposeRequest(["a star"], steps=2))
    finally:
        handle.remove()
    for bad in ({"guidance": float("nan")}, {"guidance": -1.0}, {"steps": 0}, {"seed": 2**70}):
        with pytest.raises(ComposeError):
            ComposeRequest(["a star"], **bad)
    with pytest.raises(ComposeError, match="empty"):
        ComposeRequest([""])


def test_symlinks_are_refused_by_add_push_and_pull(pipe, adapters, tmp_path, capsys):
    """Finding 6: `hub push DIR file:///X` uploaded /etc/passwd through a link in DIR; `registry add` copied
    it in; `hub pull` followed remote links."""
    from prompt_cdm.hub.hub import HubError, pull, push

    linked = shutil.copytree(adapters["a"], tmp_path / "linked")
    os.symlink("/etc/passwd", linked / "notes.txt")
    reg = _reg(pipe, tmp_path / "reg")
    with pytest.raises(RegistryError, match="symbolic link"):
        reg.add("a", linked)
    assert reg.sources == [] and reg.verify() == []
    with pytest.raises(HubError, match="symbolic link"):
        push(linked, f"file://{tmp_path / 'dest'}")
    assert not (tmp_path / "dest").exists()
    # a pushed folder in which a link appears afterwards is not followed on pull
    push(adapters["a"], f"file://{tmp_path / 'remote'}")
    os.symlink("/etc/passwd", tmp_path / "remote" / "notes.txt")
    with pytest.raises(HubError, match="link"):
        pull(str(tmp_path / "remote"), tmp_path / "pulled")
    assert not (tmp_path / "pulled").exists()
    capsys.readouterr()
    assert main(["registry", "add", "a", str(linked), "--registry", str(reg.folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "symbolic link" in err[0]


def test_forget_clears_the_user_cache_and_redacts_the_audit_log(pipe, adapters, tmp_path, capsys, monkeypatch):
    """Finding 10: the cached data manifest (per-image hashes, data location) and the audit log's lines
    (source name and credit) survived forget, and forget did not mention them."""
    from prompt_cdm.serve.audit import AuditLog

    reg = _reg(pipe, tmp_path / "reg")
    reg.add("a", adapters["a"])
    reg.add("b", adapters["b"])
    cache = tmp_path / "cache"
    for d in ("b-0123456789abcdef", "bb-0123456789abcdef", "a-0123456789abcdef"):  # b's, and two others'
        (cache / "sources" / d).mkdir(parents=True)
        (cache / "sources" / d / "manifest.json").write_text("{}")
    log = AuditLog(reg.folder / "serve" / "audit.jsonl", lock_folder=reg.folder)
    log.append({"request": "r1", "key": "k", "sources": ["a", "b"], "credit": {"a": 0.25, "b": 0.75}})
    log.append({"request": "r2", "key": "k", "sources": ["a"], "credit": {"a": 1.0}})
    monkeypatch.setenv("PROMPT_CDM_CACHE", str(cache))  # the user cache root `forget` clears by default
    capsys.readouterr()
    assert main(["registry", "forget", "b", "--registry", str(reg.folder)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["user_cache"] == [str(cache / "sources" / "b-0123456789abcdef")]
    assert rep["audit_lines_redacted"] == 1 and any("audit" in k for k in rep["kept"])
    rows = log.read()
    assert rows[0]["sources"] == ["a", FORGOTTEN_MARK] and rows[0]["credit"] == {"a": 0.25, FORGOTTEN_MARK: 0.75}
    assert rows[1]["sources"] == ["a"] and '"b"' not in (reg.folder / "serve" / "audit.jsonl").read_text()
    # the user cache: forget removes exactly source b's cached manifests (by its source id)
    reg = Registry(reg.folder)
    reg.add("c", adapters["c"])
    (cache / "sources" / "c-0123456789abcdef").mkdir()
    rep = reg.forget("c", cache_dir=cache)
    assert rep.user_cache == [str(cache / "sources" / "c-0123456789abcdef")]
    left = sorted(p.name for p in (cache / "sources").iterdir())
    assert left == ["a-0123456789abcdef", "bb-0123456789abcdef"]  # not another id that starts alike
    assert reg.verify() == []
