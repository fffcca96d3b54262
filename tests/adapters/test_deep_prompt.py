"""Deep prompts on the random tiny pipeline: the processor's math, one batched pass (mixed with a LoRA and a soft
prompt) equals separate passes, one source = plain diffusers + `install`, files / validation / bad input,
registry and hub, training (only the prompts train, resumable, on the model's device)."""
from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image
from safetensors.torch import load_file, save_file

from prompt_cdm.adapters import (AdapterError, DeepPrompt, DeepPromptConfig, LoraAdapter, LoraAdapterConfig,
                                 SoftPromptConfig, load_adapter, lora, save_adapter, soft_prompt)
from helpers import default_device_trap
from prompt_cdm.adapters import deep_prompt as dp
from prompt_cdm.adapters.kinds import backbone_table
from prompt_cdm.adapters.validate import check_adapter_folder
from prompt_cdm.cli import main
from prompt_cdm.compose.denoiser import ComposedDenoiser
from prompt_cdm.compose.pipeline import compose_images
from prompt_cdm.compose.text import encode_prompts
from prompt_cdm.core.mixing import guidance
from prompt_cdm.estimators import get_estimator

STEPS, GUIDANCE, SEED = 3, 4.0, 11
CAPTIONS = ["a red circle on the left", "a small blue square at the top"]


def _random_deep(pipe, config, seed, scale=1.0):
    fresh = dp.create(pipe, config, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 100)
    return DeepPrompt(config, {k: v + scale * torch.randn(v.shape, generator=g) for k, v in fresh.tensors.items()})


def _random_lora(pipe, seed):
    fresh = lora.create(pipe, LoraAdapterConfig(rank=2, alpha=2.0))
    g = torch.Generator().manual_seed(seed)
    return LoraAdapter(fresh.config, {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in fresh.tensors.items()})


@pytest.fixture(scope="module")
def folders(pipe, exported, tmp_path_factory):
    """p: context-mode deep prompt, 3 tokens, 2 timestep buckets; q: kv-mode (the default), 2 tokens; a: UNet LoRA; c: soft
    prompt."""
    root = tmp_path_factory.mktemp("deep")
    sp = soft_prompt.create(pipe, SoftPromptConfig("<cdm-c>", 2, init_word="star"))
    sp.embeds = sp.embeds + torch.randn(sp.embeds.shape, generator=torch.Generator().manual_seed(3))
    made = {"p": _random_deep(pipe, DeepPromptConfig(num_tokens=3, mode="context", timestep_buckets=2), 1),
            "q": _random_deep(pipe, DeepPromptConfig(num_tokens=2, mode="kv"), 2),
            "a": _random_lora(pipe, 4), "c": sp}
    return {k: save_adapter(root / k, v, pipe, source_id=k) for k, v in made.items()}


@pytest.fixture(scope="module")
def handles(pipe, folders):
    hs = {k: load_adapter(f, pipe) for k, f in folders.items()}
    yield hs
    for h in reversed(list(hs.values())):
        h.remove()


def _scheduler(pipe, steps=STEPS):
    s = copy.deepcopy(pipe.scheduler)
    s.set_timesteps(steps)
    return s


# ---------------------------------------------------------------- the processor's math


def test_context_tokens_are_extra_context_through_the_frozen_projections(pipe):
    """Mode context = AttnProcessor2_0 on [context ; tokens]; mode kv = attention over [W_k C ; K] / [W_v C ; V];
    a row without a prompt = AttnProcessor2_0 exactly; the bucket follows the timestep."""
    layer, attn = next(iter(dp.cross_attention_layers(pipe.unet).items()))
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 16, attn.to_q.in_features, generator=g)
    ctx = torch.randn(2, 77, attn.to_k.in_features, generator=g)
    bank = dp.DeepPromptBank()
    tokens = torch.randn(2, 3, attn.to_k.in_features, generator=g)  # 2 buckets x 3 tokens
    bank.prompts["s"] = (DeepPromptConfig(num_tokens=3, mode="context", timestep_buckets=2), {layer: {"tokens": tokens}})
    proc = dp.DeepPromptAttnProcessor(layer, bank)
    with torch.no_grad():
        bank.rows, bank.t = ["s", dp.BASE], torch.tensor(999)  # the last bucket
        got = proc(attn, h, ctx)
        want = AttnProcessor2_0()(attn, h[:1], torch.cat([ctx[:1], tokens[1:2]], dim=1))
        assert (got[:1] - want).abs().max() <= 1e-5
        assert (got[1:] - AttnProcessor2_0()(attn, h[1:], ctx[1:])).abs().max() <= 1e-6
        bank.t = torch.tensor(10)  # the first bucket
        got0 = proc(attn, h, ctx)
        assert (got0[:1] - AttnProcessor2_0()(attn, h[:1], torch.cat([ctx[:1], tokens[:1]], dim=1))).abs().max() <= 1e-5
        # kv: the prefixes of the frozen projections of the same tokens give the same output
        kv = {"key": attn.to_k(tokens), "value": attn.to_v(tokens)}
        bank.prompts["s"] = (DeepPromptConfig(num_tokens=3, mode="kv", timestep_buckets=2), {layer: kv})
        assert (proc(attn, h, ctx) - got0).abs().max() <= 1e-5


# ---------------------------------------------------------------- parity: one pass = n passes


@torch.no_grad()
def _reference(pipe, h, x, t):
    """One source alone (the deep prompt on every row; no LoRA): (eps_cond, eps_uncond with it)."""
    deep = dp.BASE if h.kind != "deep-prompt" else h.name
    lora.set_active(pipe, [h.name] if h.kind == "lora" else [])
    cond = encode_prompts(pipe, [h.prompt(c) for c in CAPTIONS])
    uncond = encode_prompts(pipe, [""] * len(CAPTIONS))
    with dp.route_rows(pipe.unet, [deep] * len(CAPTIONS)):
        return (pipe.unet(x, t, encoder_hidden_states=cond).sample,
                pipe.unet(x, t, encoder_hidden_states=uncond).sample)


@pytest.mark.parametrize("which", [["p", "q"], ["p", "a", "c", "q"]], ids=["deep", "deep+lora+soft"])
@pytest.mark.parametrize("split", [False, True], ids=["one-pass", "row-budget"])
def test_one_batched_pass_equals_separate_passes(pipe, handles, which, split):
    hs = [handles[k] for k in which]
    n, N = len(hs), len(CAPTIONS)
    max_rows = 2 * n + 1 if split else None  # the row budget splits a step into passes mid-source
    sched = _scheduler(pipe)
    x, t = torch.randn(N, 4, 16, 16, generator=torch.Generator().manual_seed(0)), sched.timesteps[0]
    before = lora.active(pipe)
    shared = ComposedDenoiser(pipe, hs, CAPTIONS, get_estimator("uniform"), sched, guidance_scale=GUIDANCE,
                              max_rows=max_rows)
    eps = shared(x, t)
    per = ComposedDenoiser(pipe, hs, CAPTIONS, get_estimator("uniform"), _scheduler(pipe), guidance_scale=GUIDANCE,
                           uncond="per-source", max_rows=max_rows)
    per(x, t)
    refs = [_reference(pipe, h, x, t) for h in hs]
    with dp.route_rows(pipe.unet, [dp.BASE] * N), torch.no_grad():
        lora.set_active(pipe, [])
        eps_u = pipe.unet(x, t, encoder_hidden_states=encode_prompts(pipe, [""] * N)).sample
    lora.set_active(pipe, before)
    for i, (ref_c, ref_u) in enumerate(refs):
        assert (shared.last.eps_rows[i] - ref_c).abs().max() <= 1e-5
        assert (per.last.eps_rows[i] - ref_c).abs().max() <= 1e-5
        assert (per.last.eps_uncond[i] - ref_u).abs().max() <= 1e-5
    assert (shared.last.eps_uncond - eps_u).abs().max() <= 1e-5
    assert (eps - guidance(eps_u, sum(r[0] for r in refs) / n, GUIDANCE)).abs().max() <= 1e-5
    # the test can fail: each source's rows differ from the others' and a deep prompt changes its uncond row
    assert min((refs[i][0] - refs[i - 1][0]).abs().max() for i in range(n)) > 1e-2
    assert (refs[0][1] - eps_u).abs().max() > 1e-2


# ---------------------------------------------------------------- parity: one source = plain diffusers


@pytest.mark.parametrize("key", ["p", "q"])
def test_one_deep_prompt_equals_plain_diffusers_with_the_exported_processor(pipe, exported, folders, handles, key):
    plain = StableDiffusionPipeline.from_pretrained(exported, safety_checker=None, requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)
    dp.install(plain.unet, folders[key])  # the documented install
    ref = plain(CAPTIONS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=64, width=64,
                generator=torch.Generator().manual_seed(SEED), output_type="np").images
    res = compose_images(pipe, [handles[key]], CAPTIONS, get_estimator("uniform"), steps=STEPS,
                         guidance_scale=GUIDANCE, seed=SEED, uncond="per-source", output_type="np")
    assert np.abs(res.images - ref).max() <= 1e-4
    bare = StableDiffusionPipeline.from_pretrained(exported, safety_checker=None, requires_safety_checker=False)
    bare.set_progress_bar_config(disable=True)
    frozen = bare(CAPTIONS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=64, width=64,
                  generator=torch.Generator().manual_seed(SEED), output_type="np").images
    assert np.abs(frozen - ref).max() > 1e-2  # the prompt changes the image


def test_cli_generate_one_deep_prompt_equals_plain_diffusers(exported, folders, tmp_path):
    out = tmp_path / "img.png"
    assert main(["generate", "--backbone", str(exported), "--adapter", str(folders["p"]), "--prompt", CAPTIONS[0],
                 "--steps", str(STEPS), "--guidance", str(GUIDANCE), "--seed", str(SEED), "--out", str(out)]) == 0
    plain = StableDiffusionPipeline.from_pretrained(exported, safety_checker=None, requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)
    dp.install(plain.unet, folders["p"])
    ref = plain(CAPTIONS[:1], num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=64, width=64,
                generator=torch.Generator().manual_seed(SEED), output_type="np").images[0]
    mine = np.asarray(Image.open(out)).astype(np.float64)
    assert np.abs(mine - np.round(ref * 255)).max() <= 1


def test_composition_on_the_models_device(pipe, handles):
    with default_device_trap():
        res = compose_images(pipe, [handles["p"], handles["a"], handles["q"]], CAPTIONS, get_estimator("uniform"),
                             steps=2, guidance_scale=GUIDANCE, seed=SEED, output_type="latent")
    assert res.images.shape[0] == len(CAPTIONS)


# ---------------------------------------------------------------- files, validation, bad input


def test_files_round_trip_and_remove_restores_the_processors(pipe, folders, tmp_path):
    procs = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    h = load_adapter(folders["q"], pipe, name="q2")
    assert dp.names(pipe)[-1] == "q2"
    back = dp.read_back(pipe, "q2")
    saved = load_file(str(folders["q"] / "adapter_model.safetensors"))
    assert back.tensors.keys() == saved.keys() and all(torch.equal(back.tensors[k], saved[k]) for k in saved)
    h.remove()
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == procs
    cfg = check_adapter_folder(folders["p"], backbone=backbone_table(pipe))
    assert cfg.kind == "deep-prompt" and cfg.params["timestep_buckets"] == 2
    card = (folders["p"] / "README.md").read_text()
    assert "deep_prompt import install" in card and "cross-attention layer" in card


def _variant(folder, tmp_path, name, weights=None, params=None, extra=None):
    out = tmp_path / name
    shutil.copytree(folder, out)
    if weights is not None:
        tensors = weights(load_file(str(out / "adapter_model.safetensors")))
        save_file(tensors, str(out / "adapter_model.safetensors"))
    if params is not None:
        cfg = json.loads((out / "adapter_config.json").read_text())
        cfg["params"].update(params)
        (out / "adapter_config.json").write_text(json.dumps(cfg))
    if extra is not None:
        extra(out)
    return out


def _bad_inputs(folder, tmp_path):
    def drop_layer(t):
        return dict(list(t.items())[1:])

    def wider(t):
        return {k: torch.zeros(*v.shape[:2], v.shape[2] + 8) for k, v in t.items()}

    def truncate(out):
        data = (out / "adapter_model.safetensors").read_bytes()
        (out / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])

    def pickle(out):
        torch.save({"x": torch.zeros(1)}, out / "extra.bin")

    return {
        "layers": (_variant(folder, tmp_path, "layers", weights=drop_layer), "another UNet"),
        "widths": (_variant(folder, tmp_path, "widths", weights=wider), "another UNet"),
        "truncated": (_variant(folder, tmp_path, "truncated", extra=truncate), "truncated or corrupt"),
        "pickle": (_variant(folder, tmp_path, "pickle", extra=pickle), "pickle"),
        "tokens": (_variant(folder, tmp_path, "tokens", params={"num_tokens": 65}), "num_tokens must be in 1..64"),
        "buckets": (_variant(folder, tmp_path, "buckets", params={"timestep_buckets": 4}), "timestep buckets"),
    }


def test_bad_files_refused_with_one_line_and_nothing_applied(pipe, exported, folders, tmp_path, capsys):
    bad = _bad_inputs(folders["p"], tmp_path)
    procs = dict(pipe.unet.attn_processors)
    names = dp.names(pipe)
    table = backbone_table(pipe)
    for what, (folder, needle) in bad.items():
        with pytest.raises(AdapterError, match=needle.split()[0]):
            load_adapter(folder, pipe, name="bad")
        assert dp.names(pipe) == names and dict(pipe.unet.attn_processors) == procs, what
        if what in ("layers", "widths"):  # the registry's pipeline-free check finds the same
            with pytest.raises(AdapterError, match="another UNet"):
                check_adapter_folder(folder, backbone=table)
        capsys.readouterr()
        out = tmp_path / f"{what}.png"
        assert main(["generate", "--backbone", str(exported), "--adapter", str(folder), "--prompt", "a star",
                     "--steps", "2", "--out", str(out)]) == 2, what
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and not out.exists(), (what, err)


def test_registry_add_and_hub_round_trip(pipe, folders, tmp_path):
    from prompt_cdm.hub.hub import pull, push
    from prompt_cdm.registry.registry import Registry, RegistryError

    reg = Registry.create(tmp_path / "reg", "tiny-random", pipe.backbone_fingerprint, modules=backbone_table(pipe))
    reg.add("p", folders["p"])
    reg.add("a", folders["a"])  # a mixed registry: one deep prompt, one LoRA
    with pytest.raises((RegistryError, AdapterError), match="another UNet"):
        reg.add("w", _bad_inputs(folders["q"], tmp_path)["widths"][0])
    url = f"file://{tmp_path / 'hub' / 'p'}"
    push(folders["p"], url)
    got = pull(url, tmp_path / "pulled" / "p", backbone=pipe)
    assert (got / "adapter_model.safetensors").read_bytes() == (folders["p"] / "adapter_model.safetensors").read_bytes()
    reg.forget("p")  # forget = delete the folder
    assert "p" not in reg.sources


# ---------------------------------------------------------------- training


def test_parameter_count_at_the_recipe_defaults_is_at_most_loras(pipe):
    from prompt_cdm.training.train import TrainConfig

    cfg = TrainConfig()
    n_deep = dp.create(pipe, cfg.deep_prompt.adapter_config()).num_parameters()
    n_lora = sum(v.numel() for v in lora.create(pipe, cfg.lora.adapter_config()).tensors.values())
    assert 0 < n_deep <= n_lora


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from prompt_cdm.world.dataset import render_domain

    return render_domain("stars", 8, tmp_path_factory.mktemp("data") / "stars", seed=1)[0]


@pytest.fixture(scope="module")
def bare():
    """A bare tiny pipeline to train on (the module's `pipe` carries the loaded adapters)."""
    from prompt_cdm.backbone.loading import build_tiny, fingerprint, freeze

    p = freeze(build_tiny(seed=0))
    p.backbone_fingerprint = fingerprint(p)
    return p


@pytest.mark.parametrize("mode,buckets", [("context", 1), ("kv", 2)])
def test_training_changes_only_the_prompts_and_resumes(bare, data, tmp_path, monkeypatch, mode, buckets):
    from prompt_cdm.data.sources import open_source
    from prompt_cdm.training.train import TrainConfig, _seed, is_complete, train_adapter, work_dir

    monkeypatch.setenv("PROMPT_CDM_CACHE", str(tmp_path / "cache"))
    state = {k: v.clone() for k, v in bare.unet.state_dict().items()}
    procs = dict(bare.unet.attn_processors)
    cfg = TrainConfig(kind="deep-prompt", steps=4, batch_size=4, checkpoint_every=2, n_samples=1, sample_steps=2,
                      caption_dropout=0.3, deep_prompt={"num_tokens": 2, "mode": mode, "timestep_buckets": buckets,
                                                       "lr": 1e-2})
    whole = tmp_path / "whole"
    with default_device_trap():
        r = train_adapter(open_source(data), bare, cfg, whole, progress=False)
    assert r.steps == 4 and is_complete(whole) and r.final_loss > 0
    assert dict(bare.unet.attn_processors) == procs and not dp.names(bare)
    assert all(torch.equal(v, state[k]) for k, v in bare.unet.state_dict().items())
    init = dp.create(bare, cfg.deep_prompt.adapter_config(), generator=torch.Generator().manual_seed(_seed("init", 0)))
    trained = load_file(str(whole / "adapter_model.safetensors"))
    assert trained.keys() == init.tensors.keys() and any(not torch.equal(trained[k], init.tensors[k]) for k in trained)

    class Kill(Exception):
        pass

    def kill_at_2(step, loss):
        if step == 2:
            raise Kill()

    out = tmp_path / "resumed"
    with pytest.raises(Kill):
        train_adapter(open_source(data), bare, cfg, out, progress=False, on_step=kill_at_2)
    assert not is_complete(out) and work_dir(out).exists() and not dp.names(bare)
    seen = []
    train_adapter(open_source(data), bare, cfg, out, progress=False, on_step=lambda s, _: seen.append(s))
    assert seen == [3, 4]
    resumed = load_file(str(out / "adapter_model.safetensors"))
    assert all(torch.equal(trained[k], resumed[k]) for k in trained)


def test_cli_train_deep_prompt_smoke_recipe(exported, data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PROMPT_CDM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "stars"
    assert main(["train", "--backbone", str(exported), "--source", str(data), "--kind", "deep-prompt", "--out",
                 str(out), "--recipe", "recipes/adapter_train.toml", "--smoke", "--set", "deep_prompt.num_tokens=4"]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["kind"] == "deep-prompt" and cfg["params"]["num_tokens"] == 4
    capsys.readouterr()
    assert main(["train", "--backbone", str(exported), "--source", str(data), "--kind", "deep-prompt", "--out",
                 str(tmp_path / "x"), "--set", "deep_prompt.num_tokens=65"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_tokens must be in 1..64" in err[0]
