"""Real-scale settings on the CPU: placement (device, dtype), half precision, the row budget, the gathered LoRA
routing, torch.compile, the VAE upcast, fp32 trainable tensors and gradient checkpointing."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from helpers import save_random_adapters
from prompt_cdm.adapters import LoraAdapter, LoraAdapterConfig, lora
from prompt_cdm.backbone.loading import build_tiny, fingerprint, freeze, load, place
from prompt_cdm.backbone.placement import Placement, PlacementError, check_dtype
from prompt_cdm.cli import main
from prompt_cdm.compose.pipeline import CDMPipeline
from prompt_cdm.compose.request import ComposeError, ComposeRequest
from prompt_cdm.compose.rows import row_budget, rows_per_image

CPU = torch.device("cpu")


def _tiny(dtype=torch.float32):
    p = freeze(build_tiny(seed=0))
    p.backbone_fingerprint, p.backbone_name = fingerprint(p), "tiny-random"
    return place(p, CPU, dtype)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return save_random_adapters(_tiny(), tmp_path_factory.mktemp("scale"))


# ---------------------------------------------------------------- placement


def test_placement_names_and_auto():
    assert Placement().resolve() == ((torch.device("cuda:0"), torch.float16) if torch.cuda.is_available()
                                     else (CPU, torch.float32))
    assert Placement("cpu", "bf16").resolve() == (CPU, torch.bfloat16)
    assert Placement.of(CPU, torch.float16).resolve() == (CPU, torch.float16)  # fp16 runs on this CPU build
    for device, dtype, needle in (("tpu", "auto", "unknown device 'tpu'"), ("cpu", "fp8", "unknown dtype 'fp8'"),
                                  ("cuda:x", "auto", "unknown device")):
        with pytest.raises(PlacementError, match=needle):
            Placement(device, dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_cuda_without_a_gpu_is_one_line_exit_2_before_anything(tmp_path, capsys):
    out = tmp_path / "x.png"
    for args, needle in ((["--device", "cuda"], "no CUDA device is visible"),
                         (["--device", "cuda:3"], "no CUDA device is visible"),
                         (["--dtype", "fp64"], "unknown dtype"), (["--device", "npu"], "unknown device")):
        capsys.readouterr()
        assert main(["generate", "--prompt", "a red star", "--out", str(out), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_a_dtype_the_device_cannot_compute_is_refused(monkeypatch):
    import prompt_cdm.backbone.placement as placement

    def broken(*a, **k):
        raise RuntimeError('"slow_conv2d_cpu" not implemented for \'Half\'')

    monkeypatch.setattr(placement, "_CHECKED", {})
    monkeypatch.setattr(torch.nn.functional, "conv2d", broken)
    with pytest.raises(PlacementError, match="--dtype fp16 cannot run on cpu.*use --dtype fp32 or bf16"):
        check_dtype(CPU, torch.float16)
    monkeypatch.setattr(placement, "_CHECKED", {})


def test_every_model_running_command_takes_device_and_dtype():
    from prompt_cdm.cli import build_parser
    from prompt_cdm.cli.reference import commands

    flags = {c: {o for a in sub._actions for o in a.option_strings} for c, sub, _ in commands(build_parser())}
    for c in ("generate", "train", "train-all", "router cache", "router train", "serve", "eval backbone", "eval tifa",
              "demo"):
        assert {"--device", "--dtype"} <= flags[f"prompt-cdm {c}"], c
    assert "--device" in flags["prompt-cdm eval fid"]  # the feature extractor (no backbone)
    assert {"--compile", "--max-rows"} <= flags["prompt-cdm generate"]


def test_load_places_the_backbone_and_keeps_the_fingerprint():
    pipe32 = load("tiny", "fp32", "cpu")
    pipe16 = load("tiny", "bf16", "cpu")
    assert pipe16.unet.dtype == pipe16.vae.dtype == pipe16.text_encoder.dtype == torch.bfloat16
    assert pipe16.backbone_fingerprint == pipe32.backbone_fingerprint  # fingerprinted before the cast
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert all(isinstance(p, AttnProcessor2_0) for p in pipe16.unet.attn_processors.values())  # SDPA


# ---------------------------------------------------------------- half precision


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_half_precision_composition_matches_fp32(folders, dtype, tol):
    """bf16 (and fp16, which this CPU build runs) against fp32: same images within `tol` of the [0, 1] range
    (measured max 0.015 bf16, 0.002 fp16 at 5 steps), the same credit within 1e-3; estimator arithmetic in
    float32 keeps the weights close."""
    req = ComposeRequest(prompts=["a red star", "stripes"], estimator="ito", steps=5, guidance=4.0)
    outs = {}
    for dt in (torch.float32, dtype):
        with CDMPipeline(_tiny(dt), adapters=[folders["a"], folders["b"]]) as cdm:
            outs[dt] = cdm(req, output_type="np")
    ref, half = outs[torch.float32], outs[dtype]
    assert np.isfinite(half.images).all() and np.abs(half.images - ref.images).max() < tol
    assert max(abs(half.credit[k] - ref.credit[k]) for k in ref.credit) < 1e-3


def test_adapters_take_the_unets_dtype_when_applied(folders):
    from prompt_cdm.adapters import load_adapter

    pipe = _tiny(torch.bfloat16)
    h = load_adapter(folders["a"], pipe)
    try:
        assert {p.dtype for n, p in pipe.unet.named_parameters() if "lora_" in n} == {torch.bfloat16}
    finally:
        h.remove()


def test_vae_upcast_when_fp16_overflows():
    """A VAE whose fp16 decode overflows (a decoder weight scaled up) and whose config sets force_upcast
    decodes in float32 for that call, as diffusers' upcast_vae, and stays fp16 afterwards."""
    from prompt_cdm.compose.text import decode_tensor

    pipe = _tiny()
    with torch.no_grad():  # weights and latents fp16 holds, activations past its 65504 (group norm rescales them)
        pipe.vae.decoder.conv_in.weight.mul_(2e3)
    pipe.vae.to(torch.float16).to(torch.float32)  # the reference sees the fp16-rounded weights
    z = (torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 50).half().float()
    ref = decode_tensor(pipe, z)
    assert torch.isfinite(ref).all()
    pipe.vae.to(torch.float16)
    raw = pipe.vae.decode(z.half() / pipe.vae.config.scaling_factor).sample
    assert not torch.isfinite(raw).all()  # the overflow this guards against
    pipe.vae.register_to_config(force_upcast=True)
    out = decode_tensor(pipe, z.half())
    assert torch.isfinite(out).all() and pipe.vae.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))


# ---------------------------------------------------------------- the row budget


def test_row_budget_rule():
    assert rows_per_image(4, "shared") == 5 and rows_per_image(4, "per-source") == 8 and rows_per_image(4, "x", False) == 4
    assert row_budget(10 * 2**30, 2**28) == 32 and row_budget(100, 10**6) == 1
    with pytest.raises(ValueError):
        row_budget(1, 0)


@pytest.mark.parametrize("uncond", ["shared", "per-source"])
def test_max_rows_changes_nothing_but_the_passes(folders, uncond):
    """2 images x 3 sources (8 / 12 rows a step) in passes of 6 rows equal one pass, up to the rounding of
    batch-size-dependent convolution kernels (measured up to 4.4e-5 on latents of unit scale)."""
    pipe = _tiny()
    outs = []
    with CDMPipeline(pipe, adapters=[folders["a"], folders["b"], folders["c"]]) as cdm:
        for max_rows in (None, 6):
            req = ComposeRequest(prompts=["a red star", "stripes"], estimator="ito", steps=3, guidance=4.0,
                                 uncond=uncond, max_rows=max_rows)
            outs.append(cdm(req, output_type="latent"))
    torch.testing.assert_close(outs[1].images, outs[0].images, rtol=1e-4, atol=2e-4)
    assert outs[0].credit == pytest.approx(outs[1].credit, abs=1e-5)


def test_max_rows_below_one_images_rows_is_refused(folders, tmp_path, capsys):
    with CDMPipeline(_tiny(), adapters=[folders["a"], folders["b"]]) as cdm:
        with pytest.raises(ComposeError, match="--max-rows 3 is below one image's 4 UNet rows"):
            cdm.plan(ComposeRequest(prompts=["x"], uncond="per-source", max_rows=3))
        cdm.plan(ComposeRequest(prompts=["x"], uncond="shared", max_rows=3))  # n + 1 = 3 fits
    with pytest.raises(ComposeError, match="--max-rows must be >= 1"):
        ComposeRequest(prompts=["x"], max_rows=0)
    out = tmp_path / "x.png"
    capsys.readouterr()
    args = ["generate", "--adapter", str(folders["a"]), "--adapter", str(folders["b"]), "--prompt", "a red star",
            "--uncond", "per-source", "--max-rows", "2", "--steps", "2", "--out", str(out), "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "below one image's 4 UNet rows" in err[0] and not out.exists()


# ---------------------------------------------------------------- LoRA row routing


def _random_loras(pipe, configs):
    g = torch.Generator().manual_seed(7)
    for name, cfg in configs.items():
        fresh = lora.create(pipe, cfg)
        lora.apply(pipe, LoraAdapter(cfg, {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in fresh.tensors.items()}),
                   name)


@pytest.mark.parametrize("layout", ["interleaved", "grouped"])
def test_routing_methods_equal_peft_mixed_batch(layout):
    """Ranks 2/4/8, a text-encoder LoRA, an adapter on to_q/to_v only (absent from other layers), rows without
    adapter, in any order or grouped by adapter as a composition stacks them: the segmented and the gathered
    paths equal peft's mixed batch to 1e-5 on the UNet and the text encoder."""
    pipe = _tiny()
    _random_loras(pipe, {"r2": LoraAdapterConfig(rank=2, alpha=2.0),
                         "r4": LoraAdapterConfig(rank=4, alpha=8.0, text_encoder=True),
                         "r8qv": LoraAdapterConfig(rank=8, alpha=4.0, unet_targets=("to_q", "to_v"))})
    names = ["r2", lora.BASE, "r4", "r8qv", "r4", "r2", lora.BASE, "r8qv", "r2", "r4", lora.BASE, "r8qv"]
    if layout == "grouped":  # a composition's unconditional block, then its conditional block
        names = [lora.BASE, "r2", "r2", "r4", "r8qv", "r8qv", lora.BASE, "r2", "r2", "r4", "r8qv", "r8qv"]
    methods = ("peft", "segments", "gather")
    R = len(names)
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(R, 4, 16, 16, generator=g), torch.randn(R, 77, 64, generator=g)
    t = torch.tensor(400)
    ids = torch.randint(0, 1000, (R, 77), generator=g)
    with torch.no_grad():
        outs = {}
        for method in methods:
            with lora.route_rows(pipe.unet, names, method=method):
                u = pipe.unet(x, t, encoder_hidden_states=e).sample
            with lora.route_rows(pipe.text_encoder, [n if n == "r4" else lora.BASE for n in names], method=method):
                te = pipe.text_encoder(ids)[0]
            outs[method] = (u, te)
        with lora.route_rows(pipe.unet, [lora.BASE] * R):
            bare = pipe.unet(x, t, encoder_hidden_states=e).sample
    for method in methods[1:]:
        for a, b in zip(outs["peft"], outs[method]):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert (outs["peft"][0] - bare).abs().max() > 1e-3  # the adapters do act
    with torch.no_grad():  # every row one adapter: one run, no slicing
        uni = {}
        for method in methods:
            with lora.route_rows(pipe.unet, ["r8qv"] * R, method=method):
                uni[method] = pipe.unet(x, t, encoder_hidden_states=e).sample
    for method in methods[1:]:
        torch.testing.assert_close(uni[method], uni["peft"], rtol=1e-5, atol=1e-5)
    with pytest.raises(lora.LoraError, match="unknown LoRA routing"):
        with lora.route_rows(pipe.unet, names, method="punica"):
            pass


@pytest.mark.parametrize("method", ["segments", "gather"])
def test_routing_under_autograd_trains_each_adapter_on_its_rows(method):
    """Gradients reach the LoRA weights through the routing (the gathered path's stacks are detached copies, so
    it takes the segmented computation under autograd): a loss on r2's rows alone reaches r2's weights, none
    of r4's, and equals the gradient of r2 applied alone to those rows."""
    pipe = _tiny()
    _random_loras(pipe, {"r2": LoraAdapterConfig(rank=2, alpha=2.0), "r4": LoraAdapterConfig(rank=4, alpha=4.0)})
    for n, p in pipe.unet.named_parameters():
        p.requires_grad_("lora_" in n)
    g = torch.Generator().manual_seed(0)
    x, e, t = torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 77, 64, generator=g), torch.tensor(400)

    def grads(names, rows):
        pipe.unet.zero_grad(set_to_none=True)
        with lora.route_rows(pipe.unet, names, method=method):
            pipe.unet(x[rows], t, encoder_hidden_states=e[rows]).sample[:2].square().mean().backward()
        return {n: p.grad for n, p in pipe.unet.named_parameters() if "lora_B" in n}

    mixed = grads(["r2", "r2", "r4", "r4"], slice(0, 4))
    assert any(v is not None and v.abs().max() > 0 for n, v in mixed.items() if ".r2." in n)
    assert all(v is None or v.abs().max() == 0 for n, v in mixed.items() if ".r4." in n)
    alone = grads(["r2", "r2"], slice(0, 2))
    for n, v in alone.items():
        if ".r2." in n:
            torch.testing.assert_close(mixed[n], v, rtol=1e-4, atol=1e-6)


def test_compiled_unet_keeps_multi_lora_routing_exact(folders):
    """torch.compile of the UNet (dynamo; the 'eager' backend keeps CI fast) composes two LoRA sources with their
    rows routed exactly as the uncompiled UNet."""
    from prompt_cdm.backbone.loading import compile_unet

    req = ComposeRequest(prompts=["a red star"], estimator="uniform", steps=1, guidance=4.0)
    outs = []
    for compiled in (False, True):
        pipe = _tiny()
        if compiled:
            compile_unet(pipe, backend="eager")
        with CDMPipeline(pipe, adapters=[folders["a"], folders["b"]]) as cdm:
            outs.append(cdm(req, output_type="latent").images)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- training at scale


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from prompt_cdm.data.sources import open_source
    from prompt_cdm.world.dataset import render_domain

    folder = tmp_path_factory.mktemp("src") / "stars"
    render_domain("stars", 8, folder, seed=0)
    return open_source(folder)


@pytest.mark.parametrize("kind", ["lora", "soft-prompt"])
def test_half_precision_backbone_trains_float32_adapter_tensors(source, kind, tmp_path):
    from prompt_cdm.adapters.store import read_weights
    from prompt_cdm.training.train import TrainConfig, train_adapter

    pipe = _tiny(torch.bfloat16)
    cfg = TrainConfig(kind=kind, steps=2, batch_size=2, n_samples=0, checkpoint_every=1)
    r = train_adapter(source, pipe, cfg, tmp_path / kind, progress=False, cache_dir=tmp_path / "cache")
    assert r.final_loss is not None and np.isfinite(r.final_loss)
    assert {v.dtype for v in read_weights(tmp_path / kind / "adapter_model.safetensors").values()} == {torch.float32}
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.bfloat16  # the backbone comes back as it was
    assert not any("lora_" in n for n, _ in pipe.unet.named_parameters())


def test_gradient_checkpointing_changes_memory_not_the_run(source, tmp_path):
    from prompt_cdm.training.train import TrainConfig, train_adapter

    losses = []
    for ckpt in (False, True):
        pipe = _tiny()
        cfg = TrainConfig(steps=2, batch_size=2, n_samples=0, gradient_checkpointing=ckpt)
        r = train_adapter(source, pipe, cfg, tmp_path / f"ckpt{ckpt}", progress=False, cache_dir=tmp_path / "c")
        losses.append(r.final_loss)
        assert not pipe.unet.is_gradient_checkpointing
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
