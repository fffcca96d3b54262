import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from prompt_cdm.backbone.loading import BackboneError, fingerprint, load
from prompt_cdm.compose.pipeline import text_to_image

from helpers import have_tiny_weights


def _plain_diffusers_images(folder, prompts, steps, guidance, seed):
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
               generator=torch.Generator().manual_seed(seed), output_type="np")
    return pipe, out.images


def test_export_loads_in_plain_diffusers_and_matches_our_loop(random_tiny, tmp_path):
    folder = tmp_path / "exported"
    random_tiny.save_pretrained(folder, safe_serialization=True)
    assert (folder / "model_index.json").exists()
    assert not list(folder.rglob("*.bin"))
    prompts = ["a red circle on the left", "a small blue square at the top"]
    plain, ref = _plain_diffusers_images(folder, prompts, steps=3, guidance=4.0, seed=7)
    ours = load(str(folder))
    assert ours.backbone_fingerprint == fingerprint(plain)
    imgs = text_to_image(ours, prompts, steps=3, guidance_scale=4.0, seed=7)
    mine = np.stack([np.asarray(i, dtype=np.float32) / 255 for i in imgs])
    # diffusers returns floats; ours are uint8-rounded: equal up to rounding
    assert np.abs(mine - ref).max() <= 0.5 / 255 + 1e-4


def test_frozen_and_fingerprint_changes_with_weights(random_tiny):
    assert not any(p.requires_grad for p in random_tiny.unet.parameters())
    fp = fingerprint(random_tiny)
    with torch.no_grad():
        p = next(random_tiny.unet.parameters())
        saved = p.clone()
        p.add_(1.0)
        try:
            assert fingerprint(random_tiny) != fp
        finally:
            p.copy_(saved)
    assert fingerprint(random_tiny) == fp


def test_load_refuses_missing_and_non_pipeline_folders(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        load(str(tmp_path / "nope"))
    (tmp_path / "x").mkdir()
    with pytest.raises(BackboneError, match="not a diffusers pipeline folder"):
        load(str(tmp_path / "x"))
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "model_index.json").write_text(json.dumps({"_class_name": "Foo", "unet": ["d", "U"]}))
    with pytest.raises(BackboneError, match="not a Stable Diffusion pipeline"):
        load(str(tmp_path / "y"))


def test_cli_bad_backbone_is_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "prompt_cdm.cli", "backbone", "info", str(tmp_path / "missing")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "does not exist" in r.stderr


@pytest.mark.skipif(not have_tiny_weights(), reason="shipped tiny weights not present")
def test_shipped_tiny_loads_exports_and_draws(tmp_path):
    from prompt_cdm.backbone.loading import export

    pipe = load("tiny")
    folder = export("tiny", tmp_path / "tiny")
    plain, ref = _plain_diffusers_images(folder, ["a red circle"], steps=2, guidance=5.0, seed=0)
    assert fingerprint(plain) == pipe.backbone_fingerprint
    assert ref.shape == (1, 64, 64, 3) and np.isfinite(ref).all()
