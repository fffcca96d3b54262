"""Every tensor of a generation, a composition (every estimator), a training step and a router step is made
on the model's device.

CI has no GPU, so the test makes the CPU show the mistake: the default device is set to `meta` while the
models stay on the CPU. A tensor made without naming its device (`torch.zeros(n)`, `torch.randn(shape,
generator=g)` never moved, a tokenizer's `return_tensors="pt"`) then lands on `meta` and fails the first
time it meets real data -- exactly where it would have met a CUDA tensor on a GPU. Code that is right on a
GPU names the device (the model's, or "cpu" for a CPU generator's draw that is then moved, diffusers'
`randn_tensor`).
"""
from __future__ import annotations

import pytest
import torch

from helpers import default_device_trap, save_random_adapters


def test_the_trap_catches_a_tensor_made_off_the_models_device(pipe):
    x = torch.ones(2, 4, device=pipe.unet.device)
    with default_device_trap():
        with pytest.raises((RuntimeError, NotImplementedError)):
            _ = x + torch.randn(2, 4)  # drawn without naming a device: the bug this file hunts
        assert (x + torch.randn(2, 4, device=x.device)).device == x.device


@pytest.fixture(scope="module")
def registry(pipe, tmp_path_factory):
    """Two LoRA sources with small world data, caches, caption statistics and a reference set -- built under
    the trap (router caches go through the VAE)."""
    from prompt_cdm.registry.registry import Registry
    from prompt_cdm.routing.routers import cache_caption_stats, cache_latents
    from prompt_cdm.world.dataset import render_domain

    root = tmp_path_factory.mktemp("device")
    adapters = save_random_adapters(pipe, root / "adapters")
    reg = Registry.create(root / "reg", pipe.backbone_name, pipe.backbone_fingerprint)
    for name, domain in (("a", "stars"), ("b", "striped")):
        render_domain(domain, 6, root / "data" / name, seed=1)
        reg.add(name, adapters[name])
    render_domain("base", 6, root / "data" / "ref", seed=2)
    with default_device_trap():
        for name in ("a", "b"):
            cache_latents(reg, name, pipe, root / "data" / name)
            cache_caption_stats(reg, name, pipe.tokenizer, root / "data" / name)
        cache_latents(reg, None, pipe, root / "data" / "ref")
    return reg, root


def test_router_training_steps_on_the_models_device(pipe, registry):
    from prompt_cdm.routing.routers import RouterTrainConfig, train_router

    reg, _ = registry
    with default_device_trap():
        for kind in ("classifier", "ratio"):
            report = train_router(reg, kind, pipe.scheduler.alphas_cumprod, RouterTrainConfig(steps=2, batch_size=4))
            assert report


@pytest.mark.parametrize("estimator", ["uniform", "fixed", "classifier", "ratio", "ito", "path"])
def test_every_estimator_composes_on_the_models_device(pipe, registry, estimator):
    from prompt_cdm.compose.pipeline import CDMPipeline
    from prompt_cdm.compose.request import ComposeRequest
    from prompt_cdm.routing.routers import RouterTrainConfig, train_router

    reg, _ = registry
    if estimator in ("classifier", "ratio") and not any(r.startswith(estimator) for r in reg.routers):
        train_router(reg, estimator, pipe.scheduler.alphas_cumprod, RouterTrainConfig(steps=2, batch_size=4))
    lambdas = {"a": 0.6, "b": 0.4} if estimator == "fixed" else None
    with CDMPipeline(pipe, registry=reg) as cdm:
        cdm.apply()  # loading the adapters is not the point here
        with default_device_trap():
            for uncond, sparse in (("shared", True), ("per-source", False)):
                out = cdm(ComposeRequest(prompts=["a red star", "stripes"], estimator=estimator, lambdas=lambdas,
                                         caption_prior=1.0, sparse=sparse, sparse_warmup=0.0, uncond=uncond,
                                         steps=3, guidance=3.0), output_type="np")
                assert out.images.shape[0] == 2 and sorted(out.credit) == ["a", "b"]


def test_plain_generation_on_the_models_device(pipe):
    from prompt_cdm.compose.pipeline import text_to_image

    with default_device_trap():
        images = text_to_image(pipe, ["a red star"], steps=2)
    assert images[0].size[0] > 0


@pytest.mark.parametrize("kind", ["lora", "soft-prompt"])
def test_training_steps_on_the_models_device(pipe, registry, kind, tmp_path):
    from prompt_cdm.data.sources import open_source
    from prompt_cdm.training.train import TrainConfig, train_adapter

    _, root = registry
    cfg = TrainConfig(kind=kind, steps=2, batch_size=2, n_samples=1, sample_steps=2, checkpoint_every=1,
                      caption_dropout=0.5)
    with default_device_trap():
        result = train_adapter(open_source(root / "data" / "a"), pipe, cfg, tmp_path / kind, progress=False,
                               cache_dir=tmp_path / "cache")
    assert result.steps == 2
