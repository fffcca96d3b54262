"""Memorization: Carlini et al.'s tiled l2 copy detection (exact copies found, distinct images not),
threshold calibration, Wen et al.'s text-conditional noise norm through the real sampling/compose code
(parity with direct UNet calls; larger for a memorized prompt), the copy experiment, and the CLI."""
from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from eval.memorization import (COPY_THRESHOLD, calibrate, copy_rate, copy_rate_experiment, copy_scores,
                               duplicated_source, nearest_training, text_noise_norm, tiled_l2, to_unit, wen_scores)
from prompt_cdm.cli import main
from prompt_cdm.compose.text import encode_prompts

CAPTIONS = ["a red circle on the left", "a small blue square at the top"]


def _renders(domain, n, seed=0, heldout=False):
    from prompt_cdm.world.dataset import examples

    return [e.image for e in examples(domain, n, seed=seed, heldout=heldout)]


# ---------------------------------------------------------------- tiled l2


def test_tiled_l2_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 3, 8, 8, generator=g), torch.rand(4, 3, 8, 8, generator=g)
    d = tiled_l2(a, b, tiles=2, chunk=2)
    for i in range(3):
        for j in range(4):
            tiles = [((a[i, :, r:r + 4, c:c + 4] - b[j, :, r:r + 4, c:c + 4]) ** 2).mean().sqrt()
                     for r in (0, 4) for c in (0, 4)]
            assert d[i, j] == pytest.approx(float(max(tiles)), abs=1e-6)
    assert tiled_l2(a, b, tiles=1)[0, 0] == pytest.approx(float(((a[0] - b[0]) ** 2).mean().sqrt()), abs=1e-6)
    # one changed tile is enough to be far: the max over tiles, not the mean
    c = a.clone()
    c[0, :, :4, :4] = 1 - c[0, :, :4, :4]
    assert tiled_l2(c[:1], a[:1], tiles=2)[0, 0] > 2 * tiled_l2(c[:1], a[:1], tiles=1)[0, 0]
    with pytest.raises(ValueError, match="shapes differ"):
        tiled_l2(a, b[:, :, :4])


def test_exact_copies_detected_distinct_renders_not():
    train = to_unit(_renders("base", 60))
    gen = torch.cat([train[[3, 17, 42]], to_unit(_renders("base", 20, heldout=True))])
    near = nearest_training(gen, train)
    assert near["distance"][:3].max() < 1e-6 and near["nearest"][:3].tolist() == [3, 17, 42]
    flagged = near["scores"] < COPY_THRESHOLD
    assert flagged[:3].all() and flagged[3:].float().mean() <= 0.1
    # relative rule: an exact copy scores 0, a distinct image is about as far as its other neighbours
    rel = copy_scores(tiled_l2(gen, train), k=10, alpha=0.5)
    assert rel[:3].max() < 1e-5 and rel[3:].min() > 0.3
    assert copy_rate(near["scores"], COPY_THRESHOLD) == pytest.approx(float(flagged.double().mean()))


def test_calibrate_separable_and_overlapping():
    c = calibrate(torch.tensor([0.01, 0.02, 0.03]), torch.tensor([0.10, 0.20]))
    assert c["threshold"] == pytest.approx(0.065) and c["near_detected"] == 1.0 and c["far_flagged"] == 0.0
    near, far = torch.tensor([0.01, 0.02, 0.12]), torch.tensor([0.05, 0.2, 0.3, 0.4])
    c = calibrate(near, far)  # overlapping: the threshold with the fewest errors (one here)
    assert int((near >= c["threshold"]).sum() + (far < c["threshold"]).sum()) == 1
    assert c["near_max"] == pytest.approx(0.12)


# ---------------------------------------------------------------- Wen et al.


def test_text_noise_norm():
    c, u = torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    c[0, 0, 0, 0], c[1] = 3.0, 1.0
    assert text_noise_norm(c, u).tolist() == pytest.approx([3.0, 4.0])


@torch.no_grad()
def test_wen_score_first_step_equals_direct_unet_calls(pipe):
    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(10)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    t = sched.timesteps[0]
    x = sched.scale_model_input(noise * sched.init_noise_sigma, t)
    cond, unc = encode_prompts(pipe, CAPTIONS), encode_prompts(pipe, ["", ""])
    ref = text_noise_norm(pipe.unet(x, t, encoder_hidden_states=cond).sample,
                          pipe.unet(x, t, encoder_hidden_states=unc).sample)
    got = wen_scores(pipe, CAPTIONS, steps=10, first_steps=1, guidance=7.5, seed=5)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert wen_scores(pipe, CAPTIONS, steps=10, first_steps=3, seed=5).shape == (2,)
    with pytest.raises(ValueError, match="guidance scale other than 1"):
        wen_scores(pipe, CAPTIONS, guidance=1.0)


@pytest.fixture()
def soft_prompts(pipe):
    from prompt_cdm.adapters import SoftPromptConfig, soft_prompt
    from prompt_cdm.compose.denoiser import ComposedSource

    made = []
    for k, ph in enumerate(["<mem-a>", "<mem-b>"]):
        sp = soft_prompt.create(pipe, SoftPromptConfig(ph, 2, init_word="star"))
        sp.embeds = sp.embeds + torch.randn(sp.embeds.shape, generator=torch.Generator().manual_seed(k))
        soft_prompt.apply(pipe, sp)
        made.append(ComposedSource(ph.strip("<>"), "soft-prompt", ph))
    yield made
    for s in made:
        soft_prompt.remove(pipe, s.handle)


@torch.no_grad()
def test_wen_score_composed_parity(pipe, soft_prompts):
    """One soft-prompt source (per-source uncond) = the plain backbone on its prompts, every step; two
    sources mixed uniformly = the mean of their conditional rows against the bare backbone's uncond row."""
    a, b = soft_prompts
    one = wen_scores(pipe, CAPTIONS, [a], steps=6, first_steps=4, seed=2)
    plain = wen_scores(pipe, [a.prompt(c) for c in CAPTIONS], steps=6, first_steps=4, seed=2)
    assert torch.allclose(one, plain, rtol=1e-4, atol=1e-5)

    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(6)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    t = sched.timesteps[0]
    x = sched.scale_model_input(noise * sched.init_noise_sigma, t)
    rows = [pipe.unet(x, t, encoder_hidden_states=encode_prompts(pipe, [s.prompt(c) for c in CAPTIONS])).sample
            for s in (a, b)]
    unc = pipe.unet(x, t, encoder_hidden_states=encode_prompts(pipe, ["", ""])).sample
    two = wen_scores(pipe, CAPTIONS, [a, b], steps=6, first_steps=1, seed=2)
    assert torch.allclose(two, text_noise_norm((rows[0] + rows[1]) / 2, unc), rtol=1e-5, atol=1e-6)


class _MemorizingUNet(torch.nn.Module):
    """A synthetic denoiser: data ~ N(0, I) for every prompt but one, which it memorized as a single
    training latent x0 (the exact eps of a point mass: (x_t - sqrt(abar) x0) / sqrt(1 - abar))."""

    def __init__(self, unet, abar, memorized_embedding):
        super().__init__()
        self.config, self.abar, self.mem = unet.config, abar, memorized_embedding
        self.x0 = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(9)) * 2

    @property
    def device(self):
        return torch.device("cpu")

    def forward(self, x, t, encoder_hidden_states):
        a = self.abar[int(t)]
        eps = (1 - a).sqrt() * x  # eps of N(0, I) data: -sqrt(1 - abar) * score, score = -x
        is_mem = (encoder_hidden_states - self.mem).flatten(1).abs().amax(1) < 1e-5
        eps_mem = (x - a.sqrt() * self.x0) / (1 - a).sqrt()
        return SimpleNamespace(sample=torch.where(is_mem[:, None, None, None], eps_mem, eps))


@torch.no_grad()
def test_wen_score_is_larger_for_a_memorized_prompt(pipe):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    mem = encode_prompts(pipe, ["a memorized caption"])[0]
    fake = SimpleNamespace(unet=_MemorizingUNet(pipe.unet, sched.alphas_cumprod, mem), tokenizer=pipe.tokenizer,
                           text_encoder=pipe.text_encoder, scheduler=sched)
    prompts = ["a memorized caption", "a red circle on the left", "a memorized caption", "a blue star"]
    s = wen_scores(fake, prompts, steps=20, first_steps=3, seed=0)
    assert s[0] > 5 * s[1] and s[2] > 5 * s[3]


# ---------------------------------------------------------------- the experiment and the CLI


def test_duplicated_source_and_copy_experiment(pipe, tmp_path):
    from prompt_cdm.adapters import SoftPromptConfig, save_adapter, soft_prompt

    folder = duplicated_source("stars", tmp_path / "dup", n_unique=3, n_duplicated=2, copies=3)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 3 + 2 * 3 and sum(r["duplicated"] for r in rows) == 6
    adapters = {}
    for k, name in enumerate(["dup", "other"]):
        sp = soft_prompt.create(pipe, SoftPromptConfig(f"<{name}>", 2, init_word="star"))
        adapters[name] = save_adapter(tmp_path / "adapters" / name, sp, pipe, source_id=name, data_hash=f"h{k}")
    res = copy_rate_experiment(pipe, adapters, "dup", folder, n_per_prompt=2, steps=2, wen_first_steps=1, n_floor=10)
    assert res["n_training"] == 5 and res["n_generations"] == 4 and 0 <= res["heldout_floor"] <= 1
    for setting in ("alone", "composed"):
        r = res[setting]
        assert 0.0 <= r["copy_rate"] <= 1.0 and r["mean_nearest_distance"] > 0 and r["wen_mean"] > 0
    assert res["composed"]["sources"] == ["dup", "other"]
    assert soft_prompt.applied_tokens(pipe, "<dup>") == []  # the adapters were removed again
    # the composition weighed by the caption prior of each source's training captions
    from prompt_cdm.world.dataset import render_domain

    other_data = render_domain("striped", 4, tmp_path / "striped", seed=1)[0]
    with pytest.raises(ValueError, match=r"lacks the training data of \['other'\]"):
        copy_rate_experiment(pipe, adapters, "dup", folder, n_per_prompt=1, steps=2, wen_first_steps=1, n_floor=2,
                             prior_data={"dup": folder})
    res = copy_rate_experiment(pipe, adapters, "dup", folder, n_per_prompt=2, steps=2, wen_first_steps=1, n_floor=10,
                               prior_data={"dup": folder, "other": other_data})
    assert res["caption_prior"] and 0.0 <= res["composed"]["copy_rate"] <= 1.0


def test_copy_experiment_command(tmp_path):
    from helpers import save_random_adapters
    from prompt_cdm.backbone.loading import load_quietly
    from eval.memorization import main as copy_experiment

    other = save_random_adapters(load_quietly("tiny"), tmp_path / "others")["a"]
    copy_experiment(["--domain", "stars", "--unique", "3", "--duplicated", "1", "--copies", "2", "--steps", "2",
                     "--rank", "4", "--compose-with", str(other), "--per-prompt", "2", "--sample-steps", "2",
                     "--threads", "1", "--out", str(tmp_path / "mem")])
    res = json.loads((tmp_path / "mem" / "copy_experiment.json").read_text())
    assert res["n_training"] == 4 and res["n_generations"] == 2 and res["uncond"] == "per-source"
    assert res["alone"]["sources"] == ["stars_dup"] and res["composed"]["sources"] == ["stars_dup", "a"]
    assert (tmp_path / "mem" / "adapters" / "stars_dup" / "adapter_config.json").is_file()


def test_cli_eval_memorization(tmp_path, capsys):
    assert main(["world", "render", "--domain", "base", "--n", "8", "--out", str(tmp_path / "train")]) == 0
    gen = tmp_path / "gen"
    gen.mkdir()
    for k, name in enumerate(["000001.png", "000004.png"]):  # two exact copies + two new renders
        (gen / f"copy{k}.png").write_bytes((tmp_path / "train" / name).read_bytes())
    for k, im in enumerate(_renders("base", 2, heldout=True)):
        im.save(gen / f"new{k}.png")
    capsys.readouterr()
    out = tmp_path / "mem.json"
    assert main(["eval", "memorization", "--train", str(tmp_path / "train"), "--images", str(gen),
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    by = {r["image"]: r for r in res["images"]}
    assert by["copy0.png"]["copy"] and by["copy0.png"]["nearest"] == "000001.png" and by["copy1.png"]["copy"]
    assert res["threshold"] == COPY_THRESHOLD and res["n_generated"] == 4
    assert main(["eval", "memorization", "--train", str(tmp_path / "train"), "--images", str(gen), "--k", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass --threshold" in err[0]
