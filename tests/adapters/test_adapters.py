"""Adapters: soft prompts and LoRAs on the random tiny pipeline -- apply/remove exactness, the adapter
folder, parity with plain diffusers' own loaders, strict loading (every refusal leaves the pipeline as it was)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

from prompt_cdm.adapters import (AdapterError, LoraAdapter, LoraAdapterConfig, SoftPromptConfig, load_adapter,
                                 read_adapter_config, save_adapter)
from prompt_cdm.adapters import lora, soft_prompt
from prompt_cdm.adapters.card import read_front_matter
from prompt_cdm.adapters.store import CONFIG_NAME, WEIGHTS_NAME
from prompt_cdm.compose.pipeline import text_to_image
from prompt_cdm.compose.text import encode_prompts

STEPS, GUIDANCE, SEED = 3, 4.0, 11
CAPTIONS = ["a red circle on the left", "a small blue square at the top"]








def _random_soft_prompt(pipe, placeholder="<cdm-stars>", n=3, seed=1):
    sp = soft_prompt.create(pipe, SoftPromptConfig(placeholder, n, init_word="star"))
    sp.embeds = sp.embeds + torch.randn(sp.embeds.shape, generator=torch.Generator().manual_seed(seed))
    return sp


def _random_lora(pipe, config, seed=2, scale=0.1):
    fresh = lora.create(pipe, config)
    g = torch.Generator().manual_seed(seed)
    return LoraAdapter(config, {k: torch.randn(v.shape, generator=g) * scale for k, v in fresh.tensors.items()})


def _tokenizer_state(tokenizer) -> dict:
    # padding/truncation are per-call settings transformers leaves on the backend: not state we restore
    state = json.loads(tokenizer._tokenizer.to_str())
    return {k: v for k, v in state.items() if k not in ("padding", "truncation")}


def _snapshot(pipe) -> dict:
    return {
        "tokenizer": _tokenizer_state(pipe.tokenizer),
        "len": len(pipe.tokenizer),
        "embedding": pipe.text_encoder.get_input_embeddings().weight.detach().clone(),
        "unet": {k: v.clone() for k, v in pipe.unet.state_dict().items()},
        "text_encoder_keys": list(pipe.text_encoder.state_dict()),
        "modules": [(n, type(m).__name__) for c in (pipe.unet, pipe.text_encoder) for n, m in c.named_modules()],
    }


def _assert_unchanged(pipe, snap) -> None:
    now = _snapshot(pipe)
    assert now["len"] == snap["len"]
    assert now["tokenizer"] == snap["tokenizer"]
    assert torch.equal(now["embedding"], snap["embedding"])
    assert list(now["unet"]) == list(snap["unet"])
    assert all(torch.equal(now["unet"][k], snap["unet"][k]) for k in snap["unet"])
    assert now["text_encoder_keys"] == snap["text_encoder_keys"]
    assert now["modules"] == snap["modules"]


def _plain_images(folder, prompts, load):
    plain = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)
    load(plain)
    return plain(prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=64, width=64,
                 generator=torch.Generator().manual_seed(SEED), output_type="np").images


def _ours(pipe, prompts):
    return text_to_image(pipe, prompts, steps=STEPS, guidance_scale=GUIDANCE, seed=SEED, output_type="np")


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    """One saved folder per kind: {kind: folder}."""
    root = tmp_path_factory.mktemp("adapters")
    sp = _random_soft_prompt(pipe)
    lo = _random_lora(pipe, LoraAdapterConfig(rank=4, alpha=8.0, text_encoder=True))
    return {
        "soft-prompt": save_adapter(root / "stars-sp", sp, pipe, source_id="stars", data_hash="abc123"),
        "lora": save_adapter(root / "stars-lora", lo, pipe, source_id="stars", data_hash="abc123"),
    }


# ---------------------------------------------------------------- soft prompts


def test_soft_prompt_apply_remove_is_exact_and_trains_only_its_rows(pipe):
    snap = _snapshot(pipe)
    a, b = _random_soft_prompt(pipe, "<cdm-a>", 3), _random_soft_prompt(pipe, "<cdm-b>", 2, seed=5)
    ids_a, ids_b = soft_prompt.apply(pipe, a), soft_prompt.apply(pipe, b)
    assert ids_a == [snap["len"] + i for i in range(3)] and ids_b == [snap["len"] + 3, snap["len"] + 4]
    weight = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(weight[ids_a], a.embeds) and torch.equal(weight[: snap["len"]], snap["embedding"])
    prompts = ["<cdm-a> a red star", "<cdm-b> x <cdm-a>", "plain words"]
    # diffusers' own expansion (StableDiffusionPipeline is a TextualInversionLoaderMixin)
    assert soft_prompt.expand_prompts(pipe.tokenizer, prompts) == pipe.maybe_convert_prompt(prompts, pipe.tokenizer)
    assert soft_prompt.expand_prompt(pipe.tokenizer, prompts[0]) == "<cdm-a> <cdm-a>_1 <cdm-a>_2 a red star"

    hook = soft_prompt.mask_gradients(pipe, "<cdm-b>")
    try:
        ids = pipe.tokenizer(soft_prompt.expand_prompts(pipe.tokenizer, ["<cdm-a> <cdm-b> a"]), return_tensors="pt")
        out = pipe.text_encoder(ids.input_ids)[0]
        (out[..., 0] * 3 + out[..., 1] ** 2).sum().backward()  # not out.sum(): LayerNorm makes that constant
        rows = weight.grad.abs().sum(1).nonzero().flatten().tolist()
        assert rows == ids_b
    finally:
        hook.remove()
        weight.requires_grad_(False)
        weight.grad = None

    removed = soft_prompt.remove(pipe, "<cdm-a>")  # not the last one applied: <cdm-b> moves down
    assert torch.equal(removed.embeds, a.embeds)
    assert soft_prompt.trainable_rows(pipe, "<cdm-b>").tolist() == [snap["len"], snap["len"] + 1]
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[snap["len"]:], b.embeds)
    soft_prompt.remove(pipe, "<cdm-b>")
    _assert_unchanged(pipe, snap)


def test_soft_prompt_folder_and_parity_with_diffusers_textual_inversion(pipe, exported, saved):
    folder = saved["soft-prompt"]
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["README.md", "adapter_config.json", "adapter_model.safetensors", "learned_embeds.safetensors"]
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    assert cfg["kind"] == "soft-prompt" and cfg["source_id"] == "stars"
    assert cfg["backbone_fingerprint"] == pipe.backbone_fingerprint
    assert cfg["params"] == {"placeholder": "<cdm-stars>", "num_vectors": 3, "init_word": "star"}
    assert cfg["library_version"] and cfg["data_hash"] == "abc123"
    meta = read_front_matter((folder / "README.md").read_text())
    assert meta["library_name"] == "prompt_cdm" and meta["base_model"] == "tiny-random" and meta["license"]
    assert {"soft-prompt", "source:stars"} <= set(meta["tags"]) and meta["instance_prompt"] == "<cdm-stars>"
    assert list(load_file(folder / "learned_embeds.safetensors")) == ["<cdm-stars>"]

    snap = _snapshot(pipe)
    prompts = [f"<cdm-stars> {c}" for c in CAPTIONS]
    ref = _plain_images(exported, prompts,
                        lambda p: p.load_textual_inversion(folder, weight_name="learned_embeds.safetensors"))
    base = _ours(pipe, CAPTIONS)
    handle = load_adapter(folder, pipe)
    assert handle.name == "<cdm-stars>" and handle.prompt(CAPTIONS[0]) == prompts[0]
    mine = _ours(pipe, [handle.prompt(c) for c in CAPTIONS])
    assert np.abs(mine - ref).max() <= 1e-4
    assert np.abs(mine - base).max() > 1e-2  # the soft prompt really shapes the image
    handle.remove()
    _assert_unchanged(pipe, snap)


# ---------------------------------------------------------------- LoRA


@pytest.mark.parametrize("text_encoder", [False, True], ids=["unet", "unet+text"])
def test_lora_folder_and_parity_with_diffusers_load_lora_weights(pipe, exported, tmp_path, text_encoder):
    config = LoraAdapterConfig(rank=4, alpha=2.0, text_encoder=text_encoder)  # alpha != rank: scaling 0.5 must survive
    folder = save_adapter(tmp_path / "lora", _random_lora(pipe, config), pipe, source_id="cars",
                          train_config={"lr": 1e-4, "steps": 10}, figures={"steps": 10, "final loss": 0.0812},
                          sample_grid=Image.new("RGB", (8, 8)))
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                     "pytorch_lora_weights.safetensors", "samples.png"]
    assert not [p for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".ckpt", ".pth", ".pkl")]
    card = (folder / "README.md").read_text()
    meta = read_front_matter(card)
    assert {"lora", "source:cars"} <= set(meta["tags"]) and "instance_prompt" not in meta
    assert "| final loss | 0.0812 |" in card and "samples.png" in card
    assert read_adapter_config(folder).train_config == {"lr": 1e-4, "steps": 10}
    keys = list(load_file(folder / "pytorch_lora_weights.safetensors"))
    assert all(k.startswith(("unet.", "text_encoder.")) and ".lora" in k for k in keys)
    assert any(k.startswith("text_encoder.") for k in keys) == text_encoder

    snap = _snapshot(pipe)
    ref = _plain_images(exported, CAPTIONS, lambda p: p.load_lora_weights(folder))
    base = _ours(pipe, CAPTIONS)
    handle = load_adapter(folder, pipe)
    assert handle.name == "cars" and lora.names(pipe) == ["cars"]
    assert not any(p.requires_grad for p in pipe.unet.parameters())
    mine = _ours(pipe, CAPTIONS)
    assert np.abs(mine - ref).max() <= 1e-4
    assert np.abs(mine - base).max() > 1e-2  # the LoRA really shapes the image
    handle.remove()
    _assert_unchanged(pipe, snap)


def test_two_named_lora_adapters_coexist(pipe, saved, tmp_path):
    snap = _snapshot(pipe)
    other = save_adapter(tmp_path / "birds", _random_lora(pipe, LoraAdapterConfig(rank=2, alpha=2.0), seed=9), pipe,
                         source_id="birds")
    base = _ours(pipe, CAPTIONS[:1])
    h1 = load_adapter(saved["lora"], pipe)
    only_first = _ours(pipe, CAPTIONS[:1])
    h2 = load_adapter(other, pipe)
    assert lora.names(pipe) == ["stars", "birds"] and lora.active(pipe) == ["birds"]  # the last loaded is active
    only_second = _ours(pipe, CAPTIONS[:1])
    assert np.abs(only_first - only_second).max() > 1e-2
    lora.set_active(pipe, ["stars"])
    assert np.abs(_ours(pipe, CAPTIONS[:1]) - only_first).max() <= 1e-6
    # the composition's route: peft's mixed batch sends each row through its own adapter in one call
    layer = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q")
    x = torch.randn(3, 5, layer.in_features)
    with torch.no_grad():
        mixed = layer(x, adapter_names=["stars", "birds", "__base__"])
        lora.set_active(pipe, ["birds"])
        assert torch.allclose(mixed[1], layer(x[1:2])[0], atol=1e-6)
        lora.set_active(pipe, ["stars"])
        assert torch.allclose(mixed[0], layer(x[:1])[0], atol=1e-6)
        assert torch.allclose(mixed[2], layer.base_layer(x[2:]), atol=1e-6)
    with pytest.raises(AdapterError, match="already"):
        load_adapter(other, pipe)  # same name twice
    h3 = load_adapter(other, pipe, name="birds-2")
    assert lora.names(pipe) == ["stars", "birds", "birds-2"] and lora.active(pipe) == ["birds-2"]
    h1.remove()
    assert lora.active(pipe) == ["birds-2"]
    h3.remove()  # the active one: none is switched on in its place
    assert lora.names(pipe) == ["birds"] and lora.active(pipe) == []
    assert np.abs(_ours(pipe, CAPTIONS[:1]) - base).max() <= 1e-6
    lora.set_active(pipe, ["birds"])
    assert np.abs(_ours(pipe, CAPTIONS[:1]) - only_second).max() <= 1e-6
    h2.remove()
    _assert_unchanged(pipe, snap)


# ---------------------------------------------------------------- strict loading


def _edit_config(folder, fn):
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    fn(cfg)
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))


def _wrong_shapes(folder):
    tensors = load_file(folder / WEIGHTS_NAME)
    if "soft_prompt.embeds" in tensors:
        tensors["soft_prompt.embeds"] = torch.randn(3, 65)  # the text encoder is 64 wide
    else:  # rank 2 tensors under a rank-4 config
        tensors = {k: (v[:2] if ".lora_A." in k else v[:, :2]).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(folder / WEIGHTS_NAME))


def _drop_a_tensor(folder):
    tensors = load_file(folder / WEIGHTS_NAME)
    tensors.pop(sorted(tensors)[0])
    if not tensors:
        tensors["soft_prompt.other"] = torch.zeros(3, 64)
    save_file(tensors, str(folder / WEIGHTS_NAME))


def _truncate(folder):
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])


BREAKAGES = {
    "pickle file": (lambda f: (f / "optimizer.bin").write_bytes(b"\x80\x04N."),
                    r"optimizer\.bin.*pickle.*safetensors only"),
    "pickle in subfolder": (lambda f: ((f / "ckpt").mkdir(), (f / "ckpt" / "model.pt").write_bytes(b"x")),
                            r"model\.pt.*pickle"),
    "truncated weights": (_truncate, r"adapter_model\.safetensors is truncated or corrupt.*re-save"),
    "garbage weights": (lambda f: (f / WEIGHTS_NAME).write_bytes(b"\x00" * 40), r"truncated or corrupt"),
    "missing weights": (lambda f: (f / WEIGHTS_NAME).unlink(), r"adapter_model\.safetensors is missing.*re-save"),
    "missing config": (lambda f: (f / CONFIG_NAME).unlink(), r"adapter_config\.json is missing"),
    "other backbone": (lambda f: _edit_config(f, lambda c: c.update(backbone_fingerprint="0123456789abcdef")),
                       r"adapter_config\.json.*backbone 0123456789abcdef.*load the backbone it was trained on"),
    "unknown config key": (lambda f: _edit_config(f, lambda c: c.update(rank_bonus=1)),
                           r"adapter_config\.json: unknown key 'rank_bonus'; valid keys.*kind, source_id"),
    "missing config key": (lambda f: _edit_config(f, lambda c: c.pop("data_hash")),
                           r"adapter_config\.json: missing key 'data_hash'; valid keys"),
    "missing param": (lambda f: _edit_config(f, lambda c: c["params"].pop(sorted(c["params"])[0])),
                      r"adapter_config\.json: .*params lacks"),
    "unknown param": (lambda f: _edit_config(f, lambda c: c["params"].update(temperature=2)),
                      r"adapter_config\.json: .*unknown config key 'params\.temperature'"),
    "bad kind": (lambda f: _edit_config(f, lambda c: c.update(kind="hypernetwork")), r"kind must be one of"),
    "wrong shapes": (_wrong_shapes, r"adapter_model\.safetensors: .*(wide|rank 2 in the file, rank 4 in the config)"),
    "missing tensor": (_drop_a_tensor, r"adapter_model\.safetensors: .*(lack|one tensor)"),
}


@pytest.mark.parametrize("kind", ["soft-prompt", "lora"])
@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_strict_load_refuses_and_leaves_pipeline_unchanged(pipe, saved, tmp_path, kind, breakage):
    folder = tmp_path / "broken"
    shutil.copytree(saved[kind], folder)
    damage, message = BREAKAGES[breakage]
    damage(folder)
    snap = _snapshot(pipe)
    with pytest.raises(AdapterError, match=message):
        load_adapter(folder, pipe)
    _assert_unchanged(pipe, snap)


def test_refusals_with_an_adapter_already_applied(pipe, saved, monkeypatch):
    snap0 = _snapshot(pipe)
    fp = pipe.backbone_fingerprint
    del pipe.backbone_fingerprint  # a plain diffusers pipeline: the loader fingerprints it, then remembers
    try:
        handles = [load_adapter(saved["soft-prompt"], pipe)]
        assert pipe.backbone_fingerprint == fp
        del pipe.backbone_fingerprint  # with an adapter on, hashing the weights would be wrong: refuse
        with pytest.raises(AdapterError, match="cannot be fingerprinted"):
            load_adapter(saved["lora"], pipe)
    finally:
        pipe.backbone_fingerprint = fp
    handles.append(load_adapter(saved["lora"], pipe))
    snap = _snapshot(pipe)
    with pytest.raises(AdapterError, match=r"<cdm-stars> is already in the tokenizer"):
        load_adapter(saved["soft-prompt"], pipe)
    with pytest.raises(AdapterError, match=r"named 'stars' is already"):
        load_adapter(saved["lora"], pipe)
    _assert_unchanged(pipe, snap)

    import peft.functional

    def fail(*a, **k):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(peft.functional, "set_peft_model_state_dict", fail)  # fails after injection: roll back
    with pytest.raises(RuntimeError, match="disk gone"):
        load_adapter(saved["lora"], pipe, name="again")
    monkeypatch.undo()
    assert lora.names(pipe) == ["stars"] and lora.active(pipe) == ["stars"]
    _assert_unchanged(pipe, snap)
    for h in reversed(handles):
        h.remove()
    _assert_unchanged(pipe, snap0)


def test_configs_validate_and_save_refuses_to_clobber(pipe, saved, tmp_path):
    with pytest.raises(ValueError, match="placeholder"):
        SoftPromptConfig("Stars")
    with pytest.raises(ValueError, match="rank"):
        LoraAdapterConfig(rank=0)
    with pytest.raises(AdapterError, match="one token"):
        soft_prompt.create(pipe, SoftPromptConfig("<cdm-x>", 2, init_word="supercalifragilistic"))
    cfg = read_adapter_config(saved["lora"])
    assert cfg.kind == "lora" and cfg.params_config() == LoraAdapterConfig(rank=4, alpha=8.0, text_encoder=True)
    sp = _random_soft_prompt(pipe, "<cdm-y>", 2)
    with pytest.raises(AdapterError, match="not an empty folder; pass overwrite=True"):
        save_adapter(saved["lora"], sp, pipe, source_id="y")
    folder = save_adapter(tmp_path / "y", sp, pipe, source_id="y")
    save_adapter(folder, sp, pipe, source_id="y", data_hash="new", overwrite=True)
    assert read_adapter_config(folder).data_hash == "new"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind


def test_encode_prompts_expands_placeholders_like_diffusers(pipe):
    sp = _random_soft_prompt(pipe, "<cdm-z>", 2)
    soft_prompt.apply(pipe, sp)
    try:
        a = encode_prompts(pipe, ["<cdm-z> a star"])
        ids = pipe.tokenizer(["<cdm-z> <cdm-z>_1 a star"], padding="max_length", max_length=77,
                             return_tensors="pt").input_ids  # expanded by hand, not re-expanded
        assert ids[0, 1:3].tolist() == soft_prompt.trainable_rows(pipe, "<cdm-z>").tolist()
        with torch.no_grad():
            assert torch.equal(a, pipe.text_encoder(ids)[0])
        # diffusers' rule re-expands an already expanded prompt ("<x>_1" contains "<x>"): so do we
        done = "<cdm-z> <cdm-z>_1 a star"
        assert soft_prompt.expand_prompt(pipe.tokenizer, done) == pipe.maybe_convert_prompt(done, pipe.tokenizer)
        assert soft_prompt.expand_prompt(pipe.tokenizer, done) != done
    finally:
        soft_prompt.remove(pipe, "<cdm-z>")
