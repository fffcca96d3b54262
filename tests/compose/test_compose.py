"""The composed denoiser on the random tiny pipeline: one batched pass equals separate adapter passes,
one source equals plain diffusers, the shared unconditional row, sparse = dense when the dropped weights
are zero, access masks, the prompt prior, the ito protocol; `prompt-cdm generate`."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from prompt_cdm.adapters import LoraAdapter, LoraAdapterConfig, SoftPromptConfig, load_adapter, save_adapter
from prompt_cdm.adapters import lora, soft_prompt
from prompt_cdm.core.attribution import TraceRecorder
from prompt_cdm.cli import main
from prompt_cdm.compose.denoiser import ComposedDenoiser, ComposedSource
from prompt_cdm.compose.pipeline import build_estimator, compose_images
from prompt_cdm.compose.request import ComposeError, lambdas_for, parse_lambdas
from prompt_cdm.estimators import ItoEstimator, get_estimator
from prompt_cdm.compose.text import encode_prompts
from prompt_cdm.core.mixing import guidance
from prompt_cdm.core.sampling import sample

STEPS, GUIDANCE, SEED = 3, 4.0, 11
CAPTIONS = ["a red circle on the left", "a small blue square at the top"]
SETS = {"lora": ["a", "b"], "soft-prompt": ["c", "d"], "mixed": ["a", "c", "b"]}








def _random_lora(pipe, config, seed):
    fresh = lora.create(pipe, config)
    g = torch.Generator().manual_seed(seed)
    return LoraAdapter(config, {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in fresh.tensors.items()})


def _random_soft_prompt(pipe, placeholder, seed):
    sp = soft_prompt.create(pipe, SoftPromptConfig(placeholder, 3, init_word="star"))
    sp.embeds = sp.embeds + torch.randn(sp.embeds.shape, generator=torch.Generator().manual_seed(seed))
    return sp


@pytest.fixture(scope="module")
def folders(pipe, exported, tmp_path_factory):
    """Four saved adapters: a = LoRA on UNet + text encoder, b = UNet LoRA, c and d = soft prompts."""
    root = tmp_path_factory.mktemp("adapters")
    made = {
        "a": _random_lora(pipe, LoraAdapterConfig(rank=4, alpha=8.0, text_encoder=True), seed=1),
        "b": _random_lora(pipe, LoraAdapterConfig(rank=2, alpha=2.0), seed=2),
        "c": _random_soft_prompt(pipe, "<cdm-c>", seed=3),
        "d": _random_soft_prompt(pipe, "<cdm-d>", seed=4),
    }
    return {k: save_adapter(root / k, v, pipe, source_id=k, data_hash=f"hash-{k}") for k, v in made.items()}


@pytest.fixture(scope="module")
def handles(pipe, folders):
    """All four applied to the pipeline at once: a composition must not see the ones it does not use."""
    hs = {k: load_adapter(f, pipe) for k, f in folders.items()}
    yield hs
    for h in reversed(list(hs.values())):
        h.remove()


def _scheduler(pipe, steps=STEPS):
    s = copy.deepcopy(pipe.scheduler)
    s.set_timesteps(steps)
    return s


@torch.no_grad()
def _reference_rows(pipe, h, x, t):
    """One adapter at a time, the way a diffusers user swaps adapters: (eps_cond, eps_uncond with it)."""
    lora.set_active(pipe, [h.name] if h.kind == "lora" else [])
    cond = encode_prompts(pipe, [h.prompt(c) for c in CAPTIONS])
    uncond = encode_prompts(pipe, [""] * len(CAPTIONS))
    return (pipe.unet(x, t, encoder_hidden_states=cond).sample,
            pipe.unet(x, t, encoder_hidden_states=uncond).sample)


@torch.no_grad()
def _bare_uncond(pipe, x, t):
    lora.set_active(pipe, [])
    return pipe.unet(x, t, encoder_hidden_states=encode_prompts(pipe, [""] * len(x))).sample


# ---------------------------------------------------------------- parity: one pass = n passes


@pytest.mark.parametrize("which", list(SETS))
def test_one_batched_pass_equals_separate_single_adapter_passes(pipe, handles, which):
    hs = [handles[k] for k in SETS[which]]
    n, N = len(hs), len(CAPTIONS)
    sched = _scheduler(pipe)
    x, t = torch.randn(N, 4, 16, 16, generator=torch.Generator().manual_seed(0)), sched.timesteps[1]
    before = lora.active(pipe)
    shared = ComposedDenoiser(pipe, hs, CAPTIONS, get_estimator("uniform"), sched, guidance_scale=GUIDANCE)
    eps = shared(x, t)
    per = ComposedDenoiser(pipe, hs, CAPTIONS, get_estimator("uniform"), _scheduler(pipe), guidance_scale=GUIDANCE,
                           uncond="per-source")
    per(x, t)
    assert shared.last.rows == N * (n + 1) and per.last.rows == 2 * n * N  # one UNet call each
    assert lora.active(pipe) == before  # routing does not touch peft's active-adapter state

    refs = [_reference_rows(pipe, h, x, t) for h in hs]
    eps_u = _bare_uncond(pipe, x, t)
    lora.set_active(pipe, before)
    for i, (ref_c, ref_u) in enumerate(refs):
        assert (shared.last.eps_rows[i] - ref_c).abs().max() <= 1e-5
        assert (per.last.eps_rows[i] - ref_c).abs().max() <= 1e-5
        assert (per.last.eps_uncond[i] - ref_u).abs().max() <= 1e-5
    assert (shared.last.eps_uncond - eps_u).abs().max() <= 1e-5
    mixed = guidance(eps_u, sum(r[0] for r in refs) / n, GUIDANCE)
    assert (eps - mixed).abs().max() <= 1e-5
    # the test can fail: the sources' rows really differ from each other and from the bare backbone
    assert min((refs[i][0] - refs[i - 1][0]).abs().max() for i in range(n)) > 1e-2
    if which != "soft-prompt":  # a LoRA also changes its unconditional row
        assert max((r[1] - eps_u).abs().max() for r in refs) > 1e-2


# ---------------------------------------------------------------- parity: one source = plain diffusers


def _plain(folder, prompts, load):
    plain = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)
    load(plain)
    return plain(prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=64, width=64,
                 generator=torch.Generator().manual_seed(SEED), output_type="np").images


@pytest.mark.parametrize("key", ["a", "c"], ids=["lora+text", "soft-prompt"])
def test_one_source_at_weight_one_equals_plain_diffusers(pipe, exported, folders, handles, key):
    h = handles[key]
    if h.kind == "lora":
        ref = _plain(exported, CAPTIONS, lambda p: p.load_lora_weights(folders[key]))
    else:
        ref = _plain(exported, [h.prompt(c) for c in CAPTIONS],
                     lambda p: p.load_textual_inversion(folders[key], weight_name="learned_embeds.safetensors"))
    res = compose_images(pipe, [h], CAPTIONS, get_estimator("uniform"), steps=STEPS, guidance_scale=GUIDANCE,
                         seed=SEED, uncond="per-source", output_type="np")
    assert np.abs(res.images - ref).max() <= 1e-4
    assert res.rows_per_step == [[2 * len(CAPTIONS)] * STEPS]
    assert res.traces[0].weights.shape == (STEPS, len(CAPTIONS), 1) and bool((res.traces[0].weights == 1).all())


def test_shared_uncond_equals_adapter_disabled_for_the_unconditional_half(pipe, handles):
    h = handles["a"]  # a LoRA on the UNet and the text encoder: both are off for the shared row
    before = lora.active(pipe)

    def reference(x, t):
        lora.set_active(pipe, [])
        eps_u = pipe.unet(x, t, encoder_hidden_states=encode_prompts(pipe, [""] * len(x))).sample
        lora.set_active(pipe, [h.name])
        eps_c = pipe.unet(x, t, encoder_hidden_states=encode_prompts(pipe, CAPTIONS)).sample
        return guidance(eps_u, eps_c, GUIDANCE)

    gen = torch.Generator().manual_seed(SEED)
    noise = torch.randn(len(CAPTIONS), 4, 16, 16, generator=gen)
    with torch.no_grad():
        ref = sample(reference, copy.deepcopy(pipe.scheduler), noise, STEPS, generator=gen)
    lora.set_active(pipe, before)
    kw = dict(steps=STEPS, guidance_scale=GUIDANCE, seed=SEED, output_type="latent")
    ours = compose_images(pipe, [h], CAPTIONS, get_estimator("uniform"), **kw)
    # the random backbone's final latents are ~20 in size: float32 agreement is relative
    assert (ours.images - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert ours.rows_per_step == [[2 * len(CAPTIONS)] * STEPS]  # n + 1 = 2 rows per image
    per = compose_images(pipe, [h], CAPTIONS, get_estimator("uniform"), uncond="per-source", **kw)
    assert (per.images - ref).abs().max() > 1e-3  # the two modes really differ


# ---------------------------------------------------------------- sparse routing, access, prior


def test_sparse_equals_dense_when_the_dropped_weights_are_zero(pipe, handles):
    hs = [handles[k] for k in ("a", "c", "b")]
    N = len(CAPTIONS)
    kw = dict(steps=STEPS, guidance_scale=GUIDANCE, seed=SEED, output_type="latent")
    est = lambda: get_estimator("fixed", lambdas=[0.6, 0.0, 0.4])  # noqa: E731
    dense = compose_images(pipe, hs, CAPTIONS, est(), **kw)
    sparse = compose_images(pipe, hs, CAPTIONS, est(), sparse_eps=0.05, warmup_frac=0.2, **kw)
    assert (dense.images - sparse.images).abs().max() <= 1e-5 * dense.images.abs().max()
    assert torch.equal(dense.traces[0].weights, sparse.traces[0].weights)
    assert dense.rows_per_step == [[4 * N] * 3]
    # step 1 (past the warm-up) drops c; from step 2 its rows are gone from the batch
    assert sparse.rows_per_step == [[4 * N, 4 * N, 3 * N]]
    one = compose_images(pipe, hs, CAPTIONS, get_estimator("fixed", lambdas=[1, 0, 0]), sparse_eps=0.05,
                         warmup_frac=0.2, **kw)
    assert one.rows_per_step == [[4 * N, 4 * N, 2 * N]]  # n + 1 -> 2 rows per image


def test_access_mask_and_prompt_prior(pipe, handles):
    hs = [handles[k] for k in ("a", "c", "b")]
    N = len(CAPTIONS)
    allowed = [[True, True, False], [False, False, True]]
    sched = _scheduler(pipe)
    x, t = torch.randn(N, 4, 16, 16, generator=torch.Generator().manual_seed(5)), sched.timesteps[0]
    d = ComposedDenoiser(pipe, hs, CAPTIONS, get_estimator("uniform"), sched, guidance_scale=GUIDANCE,
                         allowed=allowed)
    eps = d(x, t)
    assert d.last.rows == N + 3  # only the allowed (image, source) rows are computed
    assert torch.equal(d.last.out.weights, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]))
    assert bool((d.last.eps_rows[2, 0] == 0).all()) and bool((d.last.eps_rows[0, 1] == 0).all())
    alone = ComposedDenoiser(pipe, [hs[2]], CAPTIONS, get_estimator("uniform"), _scheduler(pipe),
                             guidance_scale=GUIDANCE)(x, t)
    assert (eps[1] - alone[1]).abs().max() <= 1e-5  # image 1 may use only b
    with pytest.raises(ComposeError, match="no source is allowed"):
        ComposedDenoiser(pipe, hs, CAPTIONS, get_estimator("uniform"), sched,
                         allowed=[[True, False, False], [False, False, False]])

    # lambda(c) ∝ lambda p(c): a prompt prior per image times the estimator's lambdas
    d = ComposedDenoiser(pipe, hs, CAPTIONS, get_estimator("fixed", lambdas=[1, 1, 2]), _scheduler(pipe),
                         guidance_scale=GUIDANCE, prompt_prior=[[3, 1, 0], [1, 1, 1]])
    d(x, t)
    assert torch.allclose(d.last.out.weights, torch.tensor([[0.75, 0.25, 0.0], [0.25, 0.25, 0.5]]), atol=1e-6)


class SpyIto(ItoEstimator):
    """Records the order of calls and what observe() is handed."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls, self.observed, self.states = [], [], []

    def set_state(self, step, n_steps, t=None, sigma=None, sigma_next=None):
        self.calls.append("set_state")
        self.states.append((step, n_steps, sigma, sigma_next))
        super().set_state(step, n_steps, t, sigma, sigma_next)

    def weights(self, x, eps_rows=None, **extra):
        self.calls.append("weights")
        return super().weights(x, eps_rows, **extra)

    def observe(self, x_prev, x_next, eps_rows, active=None):
        self.calls.append("observe")
        self.observed.append((x_prev.clone(), x_next.clone(), eps_rows.clone()))
        super().observe(x_prev, x_next, eps_rows, active)


def test_ito_sees_observe_then_set_state_then_weights_with_the_step_taken(pipe, handles):
    hs = [handles["a"], handles["b"]]
    est = SpyIto(scheduler="EulerAncestralDiscreteScheduler")
    sched = copy.deepcopy(pipe.scheduler)
    gen = torch.Generator().manual_seed(SEED)
    d = ComposedDenoiser(pipe, hs, CAPTIONS, est, sched, guidance_scale=GUIDANCE)
    inputs, rows = [], []

    def denoise(x, t):
        inputs.append(x.clone())
        out = d(x, t)
        rows.append(d.last.eps_rows.clone())
        return out

    rec = TraceRecorder()
    d.callback = rec
    sample(denoise, sched, torch.randn(2, 4, 16, 16, generator=gen), STEPS, generator=gen, callback=d.on_step)
    assert est.calls == ["set_state", "weights"] + ["observe", "set_state", "weights"] * (STEPS - 1)
    assert [s[:2] for s in est.states] == [(k, STEPS) for k in range(STEPS)]
    sig = sched.sigmas.tolist()
    assert all(abs(s[2] - sig[k]) < 1e-6 and abs(s[3] - sig[k + 1]) < 1e-6 for k, s in enumerate(est.states))
    for k, (prev, nxt, eps_rows) in enumerate(est.observed):
        assert torch.equal(prev, inputs[k]) and torch.equal(nxt, inputs[k + 1]) and torch.equal(eps_rows, rows[k])
    w = rec.weights
    assert torch.allclose(w[0], torch.full((2, 2), 0.5))  # all ll start equal: the prior
    assert (w[-1] - 0.5).abs().max() > 1e-3  # and then the trajectory moves them
    with pytest.raises(ComposeError, match="stochastic"):
        build_estimator("ito", ["a", "b"], scheduler=type("DDIMScheduler", (), {})())


def test_refusals(pipe, handles):
    with pytest.raises(ComposeError, match="unique"):
        ComposedDenoiser(pipe, [handles["a"], handles["a"]], CAPTIONS, get_estimator("uniform"), _scheduler(pipe))
    with pytest.raises(ComposeError, match="uncond"):
        ComposedDenoiser(pipe, [handles["a"]], CAPTIONS, get_estimator("uniform"), _scheduler(pipe), uncond="none")
    with pytest.raises(ComposeError, match="no LoRA adapter named"):
        ComposedDenoiser(pipe, [ComposedSource("z", "lora", "zz")], CAPTIONS, get_estimator("uniform"),
                         _scheduler(pipe))(torch.zeros(2, 4, 16, 16), 999)
    with pytest.raises(ComposeError, match="unknown router 'magic'"):
        build_estimator("magic", ["a"])
    with pytest.raises(ComposeError, match="uniform takes no lambdas"):
        build_estimator("uniform", ["a"], [1.0])
    assert lambdas_for(parse_lambdas("a=0.25, b=0.75"), ["a", "b"]) == [0.25, 0.75]
    for bad, msg in [("a=0,b=0", "positive sum"), ("a=1", "missing b"), ("a=1,b=1,z=1", "unknown source 'z'"),
                     ("a=x,b=1", "not a number"), ("a=-1,b=2", "non-negative")]:
        with pytest.raises(ComposeError, match=msg):
            lambdas_for(parse_lambdas(bad), ["a", "b"])


# ---------------------------------------------------------------- the CLI


def test_cli_generate_one_adapter_equals_plain_diffusers(pipe, exported, folders, tmp_path):
    out, trace = tmp_path / "img.png", tmp_path / "t.json"
    args = ["generate", "--backbone", str(exported), "--adapter", str(folders["a"]), "--prompt", CAPTIONS[0],
            "--steps", str(STEPS), "--guidance", str(GUIDANCE), "--seed", str(SEED), "--out", str(out),
            "--trace", str(trace)]
    assert main(args) == 0
    ref = _plain(exported, CAPTIONS[:1], lambda p: p.load_lora_weights(folders["a"]))[0]
    mine = np.asarray(Image.open(out)).astype(np.float64)
    assert mine.shape == (64, 64, 3) and np.abs(mine - np.round(ref * 255)).max() <= 1
    data = json.loads(trace.read_text())
    assert set(data) >= {"sources", "timesteps", "weights", "credit"} and data["sources"] == ["a"]
    assert len(data["weights"]) == STEPS and data["credit"] == {"a": 1.0}
    assert Image.open(trace.with_suffix(".png")).size[0] > 100


def _one_line_exit_2(capsys, args, needle):
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_cli_generate_bad_input_one_line_exit_2_nothing_written(exported, folders, tmp_path, capsys):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(folders["b"], other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["backbone_fingerprint"] = "0123456789abcdef"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "x.png"
    base = ["generate", "--backbone", str(exported), "--prompt", "a star", "--steps", "2", "--out", str(out)]
    two = ["--adapter", str(folders["a"]), "--adapter", str(folders["b"])]
    _one_line_exit_2(capsys, base + two + ["--router", "oracle"], "unknown router 'oracle'")
    _one_line_exit_2(capsys, base + two + ["--router", "fixed", "--weights", "a=0,b=0"], "positive sum")
    _one_line_exit_2(capsys, base + two + ["--router", "fixed"], "router 'fixed' needs weights")
    _one_line_exit_2(capsys, base + two + ["--sparse", "--sparse-warmup", "1.5"], "--sparse-warmup must be in [0, 1]")
    _one_line_exit_2(capsys, base + two + ["--weights", "a=1,q=1"], "unknown source 'q'")
    _one_line_exit_2(capsys, base + ["--adapter", str(other)], "load the backbone it was trained on")
    _one_line_exit_2(capsys, base + two + ["--router", "ito", "--scheduler", "DDIMScheduler"], "stochastic sampler")
    _one_line_exit_2(capsys, base + two + ["--scheduler", "MagicScheduler"], "unknown scheduler")
    _one_line_exit_2(capsys, base + two + ["--router", "path", "--scheduler", "DDIMScheduler"], "stochastic sampler")
    # the trace's plot would land on the image itself
    _one_line_exit_2(capsys, base + two + ["--trace", str(tmp_path / "x.json")], "which is --out")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_watched_estimator_draws_with_the_drive_and_attributes_with_the_watcher(pipe, handles):
    from prompt_cdm.estimators import WatchedEstimator

    hs = [handles["a"], handles["b"]]
    kw = dict(steps=STEPS, guidance_scale=GUIDANCE, seed=SEED, output_type="latent", uncond="per-source")
    alone = compose_images(pipe, hs, CAPTIONS, get_estimator("fixed", lambdas=[0, 1]), **kw)
    est = WatchedEstimator(get_estimator("fixed", lambdas=[0, 1]),
                           ItoEstimator(scheduler="EulerAncestralDiscreteScheduler"))
    watched = compose_images(pipe, hs, CAPTIONS, est, **kw)
    assert torch.equal(watched.images, alone.images)  # the watcher never touches the sample
    assert torch.equal(watched.traces[0].weights[-1], torch.tensor([[0.0, 1.0]] * 2))  # the mix: b alone
    tr = est.watched_trace()
    assert tr.shape == (STEPS, 2, 2) and torch.allclose(tr[0], torch.full((2, 2), 0.5))
    assert (tr[-1] - 0.5).abs().max() > 1e-3  # the watcher's own evidence moved


@pytest.mark.parametrize("uncond", ["shared", "per-source"])
def test_path_observes_each_sources_guided_rows(pipe, handles, uncond):
    from prompt_cdm.estimators import PathEstimator
    from prompt_cdm.core.mixing import guided_rows

    seen = []

    class SpyPath(PathEstimator):
        def observe(self, x_prev, x_next, eps_rows, active=None):
            seen.append(eps_rows.clone())
            super().observe(x_prev, x_next, eps_rows, active)

    hs = [handles["a"], handles["b"]]
    d = ComposedDenoiser(pipe, hs, CAPTIONS, SpyPath(scheduler="EulerAncestralDiscreteScheduler"),
                         _scheduler(pipe), guidance_scale=GUIDANCE, uncond=uncond)
    records = []

    def denoise(x, t):
        out = d(x, t)
        records.append(d.last)
        return out

    gen = torch.Generator().manual_seed(SEED)
    sample(denoise, d.scheduler, torch.randn(2, 4, 16, 16, generator=gen), STEPS, generator=gen,
           callback=d.on_step)
    assert len(seen) == STEPS - 1
    for k, rows in enumerate(seen):
        r = records[k]
        want = guided_rows(r.eps_uncond, r.eps_rows, GUIDANCE)
        assert torch.equal(rows, want) and not torch.equal(rows, r.eps_rows)
        # mixing the guided rows is the step the sampler took (guidance is affine, weights sum to 1)
        assert torch.allclose((r.out.weights.t()[..., None, None, None] * rows).sum(0), r.out.eps, atol=1e-5)
    assert build_estimator("path", ["a", "b"], scheduler=d.scheduler)[0].name == "path"
