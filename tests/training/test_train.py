"""Adapter training on the random tiny backbone (saved to a folder and loaded like any SD pipeline):
only the adapter trains, the folder loads, a killed run resumes to bit-identical weights, the CLI."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from prompt_cdm.util import config
from prompt_cdm.adapters import load_adapter, read_adapter_config, soft_prompt
from prompt_cdm.adapters.store import WEIGHTS_NAME
from prompt_cdm.backbone.loading import build_tiny, load
from prompt_cdm.cli import main
from prompt_cdm.data.sources import open_source
from prompt_cdm.training.train import (TrainConfig, TrainError, _seed, batch_indices, is_complete, train_adapter,
                              work_dir)

RECIPE = "recipes/adapter_train.toml"




@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("backbone") / "tiny-random"
    build_tiny(0).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def pipe(backbone_dir):
    return load(str(backbone_dir))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from prompt_cdm.world.dataset import render_domain

    root = tmp_path_factory.mktemp("data")
    return render_domain("stars", 8, root / "stars", seed=1)[0]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPT_CDM_CACHE", str(tmp_path / "cache"))


def _cfg(kind, **kw):
    base = dict(kind=kind, steps=3, batch_size=4, checkpoint_every=2, n_samples=2, sample_steps=2)
    return TrainConfig(**{**base, **kw})


def _state(pipe) -> dict:
    out = {f"{c}.{k}": v.clone() for c in ("unet", "vae", "text_encoder")
           for k, v in getattr(pipe, c).state_dict().items()}
    out["len(tokenizer)"] = len(pipe.tokenizer)
    return out


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]) if not torch.is_tensor(a[k]) else torch.equal(a[k], b[k]), k


def _check_folder(out, pipe, source, kind):
    assert is_complete(out) and not work_dir(out).exists()  # the data-derived cache went with the run
    for f in ("README.md", "samples.png", "loss_curve.png", "train_log.jsonl"):
        assert (out / f).is_file(), f
    cfg = read_adapter_config(out)
    assert cfg.kind == kind and cfg.source_id == "stars"
    assert cfg.data_hash == source.manifest().hash
    assert cfg.backbone_fingerprint == pipe.backbone_fingerprint
    assert cfg.train_config["steps"] == 3 and cfg.train_config["sources"][0]["n_items"] == 8
    card = (out / "README.md").read_text()
    assert "steps/s" in card and "final loss" in card and "wall time" in card
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] > 0 for r in rows)


def test_soft_prompt_trains_only_its_rows(pipe, data, tmp_path):
    before = _state(pipe)
    source = open_source(data)
    out = tmp_path / "stars-sp"
    r = train_adapter(source, pipe, _cfg("soft-prompt"), out, progress=False)
    _assert_same(_state(pipe), before)  # the frozen backbone is unchanged bit for bit, tokenizer included
    _check_folder(out, pipe, source, "soft-prompt")
    assert r.steps == 3 and r.final_loss > 0 and r.steps_per_s > 0

    # the rows moved away from their seeded initialisation; nothing else is in the file
    sp_cfg = TrainConfig().soft_prompt.adapter_config("stars")
    init = soft_prompt.create(pipe, sp_cfg, generator=torch.Generator().manual_seed(_seed("init", 0)))
    trained = load_file(str(out / WEIGHTS_NAME))
    assert set(trained) == {"soft_prompt.embeds"}
    assert not torch.equal(trained["soft_prompt.embeds"], init.embeds)
    handle = load_adapter(out, pipe)
    try:
        assert handle.name == "<cdm-stars>" and handle.prompt("a star") == "<cdm-stars> a star"
    finally:
        handle.remove()
    _assert_same(_state(pipe), before)


def test_lora_trains_only_lora(pipe, data, tmp_path):
    before = _state(pipe)
    source = open_source(data)
    out = tmp_path / "stars-lora"
    # the text encoder's LoRA too (its cache then holds token ids), and caption dropout ("" captions)
    lora = {"rank": 2, "alpha": 2.0, "lr": 1e-2, "text_encoder": True}
    train_adapter(source, pipe, _cfg("lora", lora=lora, caption_dropout=0.5), out, progress=False)
    _assert_same(_state(pipe), before)
    _check_folder(out, pipe, source, "lora")
    trained = load_file(str(out / WEIGHTS_NAME))
    assert trained and all(".lora_" in k for k in trained)
    assert {k.split(".")[0] for k in trained} == {"unet", "text_encoder"}
    # peft starts B at zero: a non-zero B means the LoRA trained
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)
    handle = load_adapter(out, pipe)
    handle.remove()
    _assert_same(_state(pipe), before)


class _Kill(Exception):
    pass


@pytest.mark.parametrize("kind", ["lora", "soft-prompt"])
def test_resume_after_a_kill_equals_an_uninterrupted_run(backbone_dir, data, tmp_path, kind):
    cfg = dict(steps=4, checkpoint_every=2, n_samples=0, caption_dropout=0.3)
    whole = tmp_path / "whole"
    train_adapter(open_source(data), load(str(backbone_dir)), _cfg(kind, **cfg), whole, progress=False)

    def kill_at_2(step, loss):
        if step == 2:
            raise _Kill()

    out = tmp_path / "resumed"
    with pytest.raises(_Kill):
        train_adapter(open_source(data), load(str(backbone_dir)), _cfg(kind, **cfg), out, progress=False,
                      on_step=kill_at_2)
    assert not is_complete(out) and (work_dir(out) / "checkpoint" / "state.safetensors").is_file()
    # other settings refuse to resume (never mixes two runs) ...
    with pytest.raises(TrainError, match="seed"):
        train_adapter(open_source(data), load(str(backbone_dir)), _cfg(kind, seed=1, **cfg), out, progress=False)
    # ... the same ones resume, in new objects (fresh pipeline, source and config)
    seen = []
    train_adapter(open_source(data), load(str(backbone_dir)), _cfg(kind, **cfg), out, progress=False,
                  on_step=lambda s, _: seen.append(s))
    assert seen == [3, 4]
    a, b = load_file(str(whole / WEIGHTS_NAME)), load_file(str(out / WEIGHTS_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = lambda f: [json.loads(x)["loss"] for x in (f / "train_log.jsonl").read_text().splitlines()]  # noqa: E731
    assert log(whole) == log(out)


def test_latent_cache_batches_by_pixel_budget(pipe, data, monkeypatch):
    """16 images per VAE call at 64 px, one at a time at 256 px and above (SD's 512 px would need ~0.5 GB
    of encoder activations per image); the latents do not depend on the batching."""
    from prompt_cdm.data.sources import open_source
    from prompt_cdm.training.train import encode_latents

    source = open_source(data)
    sizes = []
    real = pipe.vae.encode
    monkeypatch.setattr(pipe.vae, "encode", lambda x: sizes.append(x.shape[0]) or real(x))
    small = encode_latents(pipe, source, 64, progress=False)
    assert sizes == [8]  # all 8 items in one call
    sizes.clear()
    large = encode_latents(pipe, source, 256, progress=False)
    assert sizes == [1] * 8 and large.shape[-1] == 4 * small.shape[-1]
    sizes.clear()
    one = encode_latents(pipe, source, 64, batch=1, progress=False)
    assert sizes == [1] * 8 and torch.allclose(one, small, atol=1e-5)


def test_batches_cover_each_epoch_and_depend_only_on_the_step():
    n, bs = 10, 4
    stream = torch.cat([batch_indices(n, bs, 0, s) for s in range(5)])  # 20 = two epochs
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:].tolist()) == list(range(10))
    assert torch.equal(batch_indices(n, bs, 0, 3), batch_indices(n, bs, 0, 3))
    assert not torch.equal(batch_indices(n, bs, 0, 3), batch_indices(n, bs, 1, 3))


def test_recipe_defaults_equal_the_config_and_smoke_is_small():
    assert config.load(TrainConfig, RECIPE) == TrainConfig()
    smoke = config.load(TrainConfig, RECIPE, smoke=True)
    assert smoke.steps <= 3 and smoke.n_samples <= 2
    with pytest.raises(config.ConfigError, match="kind"):
        config.load(TrainConfig, RECIPE, ["kind=dreambooth"])
    with pytest.raises(config.ConfigError, match="rank"):
        config.load(TrainConfig, RECIPE, ["lora.rank=0"])
    with pytest.raises(config.ConfigError, match="placeholder"):
        config.load(TrainConfig, RECIPE, ["soft_prompt.placeholder=NoBrackets"])


def test_cli_train_smoke_recipe(backbone_dir, data, tmp_path, capsys):
    out = tmp_path / "a" / "stars"
    assert main(["train", "--backbone", str(backbone_dir), "--source", str(data), "--kind", "soft-prompt",
                 "--out", str(out), "--recipe", RECIPE, "--smoke"]) == 0
    assert "adapter ->" in capsys.readouterr().out
    cfg = read_adapter_config(out)
    assert cfg.kind == "soft-prompt" and cfg.train_config["steps"] == 3 and cfg.base_model == str(backbone_dir)
    # a finished adapter is not overwritten by accident
    assert main(["train", "--backbone", str(backbone_dir), "--source", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0]


def test_cli_paragon_and_train_all(backbone_dir, tmp_path, capsys):
    out = tmp_path / "cdm"
    args = ["train-all", "--backbone", str(backbone_dir), "--world-domains", "stars,crosses", "--n-images", "4",
            "--kind", "lora", "--out", str(out), "--recipe", RECIPE, "--smoke", "--set", "n_samples=0",
            "--steps", "2"]
    assert main(args) == 0
    for d in ("stars", "crosses"):
        assert (out / "data" / d / "metadata.jsonl").is_file() and is_complete(out / "adapters" / d)
    capsys.readouterr()
    assert main(args) == 0  # finished adapters are skipped
    printed = capsys.readouterr().out
    assert printed.count("skipped") == 2
    # a finished adapter whose source changed since is not silently kept
    meta = out / "data" / "stars" / "metadata.jsonl"
    meta.write_text(meta.read_text().replace('"text": "', '"text": "now ', 1))
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other data" in err[0]

    paragon = tmp_path / "paragon"
    assert main(["train", "--backbone", str(backbone_dir), "--source", str(out / "data" / "stars"),
                 "--source", str(out / "data" / "crosses"), "--out", str(paragon), "--recipe", RECIPE, "--smoke",
                 "--set", "n_samples=0", "--steps", "1"]) == 0
    cfg = read_adapter_config(paragon)
    assert cfg.source_id == "paragon" and [s["source_id"] for s in cfg.train_config["sources"]] == ["crosses", "stars"]
    parts = {read_adapter_config(out / "adapters" / d).data_hash for d in ("stars", "crosses")}
    assert cfg.data_hash not in parts


@pytest.mark.parametrize("args, needles", [
    (["train", "--source", "{tmp}/missing", "--out", "{tmp}/o"], ["does not exist"]),
    (["train", "--source", "{data}", "--out", "{tmp}/o", "--set", "lora.rnk=3"], ["lora.rnk", "lora.rank"]),
    (["train", "--source", "{data}", "--out", "{tmp}/o", "--steps", "0"], ["steps must be >= 1"]),
    (["train", "--source", "{data}", "--out", "{tmp}/o", "--smoke"], ["--recipe"]),
    (["train", "--source", "datasets:someone/birds", "--out", "{tmp}/o"], ["pip install datasets"]),
    (["train", "--source", "{bad}", "--out", "{tmp}/o", "--backbone", "{backbone}"], ["000001.png", "readable image"]),
    (["train-all", "--world-domains", "birds", "--out", "{tmp}/o"], ["unknown domain 'birds'"]),
    (["train-all", "--sources", "{data}", "--out", "{tmp}/o", "--executor", "ray"], ["pip install 'prompt-cdm[ray]'"]),
])
def test_cli_bad_inputs_exit_2_with_one_line(args, needles, backbone_dir, data, tmp_path, capsys):
    import shutil

    if "--executor" in args:
        try:
            import ray  # noqa: F401
            pytest.skip("ray is installed")
        except ImportError:
            pass
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    (bad / "000001.png").write_bytes(b"not an image")
    fill = dict(tmp=tmp_path, data=data, bad=bad, backbone=backbone_dir)
    assert main([a.format(**fill) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for n in needles:
        assert n in err[0], err[0]


@pytest.mark.slow
def test_train_all_with_ray(backbone_dir, tmp_path):
    ray = pytest.importorskip("ray")
    from prompt_cdm.training.train import render_world_sources, train_all

    ray.init(num_cpus=1, include_dashboard=False)
    try:
        sources = render_world_sources("stars,crosses", tmp_path, 4)
        cfg = _cfg("lora", steps=2, n_samples=0)
        results = train_all(str(backbone_dir), sources, cfg, tmp_path, executor="ray", cpus_per_job=1)
        assert [r.source_id for r in results] == ["stars", "crosses"] and not any(r.skipped for r in results)
        assert all(is_complete(tmp_path / "adapters" / d) for d in ("stars", "crosses"))
    finally:
        ray.shutdown()


def _double(x):
    return 2 * x


def test_ray_executor_glue_with_a_stand_in_ray(monkeypatch):
    """The Ray path without Ray: a stand-in module records what the executor asks of it."""
    import sys
    import types

    from prompt_cdm.training.executors import get_executor

    calls = {}
    fake = types.ModuleType("ray")
    fake.is_initialized = lambda: calls.get("init") is not None
    fake.init = lambda **kw: calls.__setitem__("init", kw)

    def remote(num_cpus):
        calls["num_cpus"] = num_cpus
        return lambda fn: types.SimpleNamespace(remote=lambda job: ("ref", fn(job)))

    fake.remote = remote
    fake.get = lambda refs: [r[1] for r in refs]
    monkeypatch.setitem(sys.modules, "ray", fake)
    run = get_executor("ray", cpus_per_job=2)
    assert run.threads_per_job == 2
    assert run(_double, [1, 2, 3]) == [2, 4, 6]
    assert calls["num_cpus"] == 2 and calls["init"]["address"] is None
