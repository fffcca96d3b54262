import json
import subprocess
import sys

import pytest
from helpers import have_tiny_weights

from prompt_cdm.cli import main


def _run(*args):
    return subprocess.run([sys.executable, "-m", "prompt_cdm.cli", *args], capture_output=True, text=True)


def _one_line_error(r, *needles):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0]


def test_render_and_questions(tmp_path):
    out = tmp_path / "stars"
    assert main(["world", "render", "--domain", "stars", "--n", "6", "--seed", "3", "--out", str(out)]) == 0
    rows = [json.loads(l) for l in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all((out / r["file_name"]).exists() for r in rows)
    assert all("star" in r["text"] for r in rows)
    q = tmp_path / "q.json"
    assert main(["world", "questions", "--from", str(out), "--out", str(q)]) == 0
    recs = json.loads(q.read_text())
    assert {r["caption_id"] for r in recs} == {r["file_name"][:-4] for r in rows}
    assert all(r["answer"] in r["choices"] for r in recs)


def test_render_splits(tmp_path):
    assert main(["world", "render", "--domain", "base", "--n", "9", "--splits", "3", "--out", str(tmp_path)]) == 0
    sizes = [len((tmp_path / f"split_{k}" / "metadata.jsonl").read_text().splitlines()) for k in range(3)]
    assert sizes == [3, 3, 3]


def test_unknown_domain_one_line_exit_2(tmp_path):
    r = _run("world", "render", "--domain", "birds", "--n", "2", "--out", str(tmp_path))
    _one_line_error(r, "unknown domain 'birds'", "base")


def test_unknown_recipe_key_lists_valid_keys(tmp_path):
    r = _run("backbone", "pretrain", "recipes/tiny_backbone.toml", "--set", "unet.stepz=3")
    _one_line_error(r, "stepz", "unet.steps")


def test_bad_recipe_value_type(tmp_path):
    r = _run("backbone", "pretrain", "recipes/tiny_backbone.toml", "--set", "unet.steps=many")
    _one_line_error(r, "unet.steps")


def test_unreadable_and_missing_recipe(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("out = [unclosed\n")
    _one_line_error(_run("backbone", "pretrain", str(bad)), "not valid TOML")
    _one_line_error(_run("backbone", "pretrain", str(tmp_path / "none.toml")), "does not exist")


def test_unknown_key_in_recipe_file(tmp_path):
    bad = tmp_path / "r.toml"
    bad.write_text("outt = 'x'\n")
    _one_line_error(_run("world", "train-judge", str(bad)), "outt", "steps")


def test_backbone_not_a_pipeline_folder(tmp_path):
    (tmp_path / "f").mkdir()
    _one_line_error(_run("backbone", "export", str(tmp_path / "f"), str(tmp_path / "o")), "not a diffusers pipeline")


def test_pretrain_smoke_resumes(tmp_path):
    """The recipe's smoke section runs both stages; a second run resumes (nothing left to do)."""
    out = tmp_path / "bb"
    args = ["backbone", "pretrain", "recipes/tiny_backbone.toml", "--smoke", "--set", f"out='{out}'"]
    assert main(args) == 0
    log = (out / "unet_log.jsonl").read_text().splitlines()
    assert len(log) == 3
    assert (out / "weights" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert main(args + ["--set", "unet.steps=4"]) == 0
    log = (out / "unet_log.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in log] == [1, 2, 3, 4]


def test_pretrain_warm_start_from_weights(tmp_path):
    out = tmp_path / "bb"
    base = ["backbone", "pretrain", "recipes/tiny_backbone.toml", "--smoke"]
    assert main(base + ["--set", f"out='{out}'"]) == 0
    more = tmp_path / "more"
    assert main(base + ["--set", f"out='{more}'", "--set", f"init_from='{out / 'weights'}'"]) == 0
    assert not (more / "vae_ckpt").exists()  # the VAE stage is skipped
    s1 = json.loads((out / "weights" / "vae" / "config.json").read_text())["scaling_factor"]
    s2 = json.loads((more / "weights" / "vae" / "config.json").read_text())["scaling_factor"]
    assert s1 == s2
    r = _run(*base, "--set", f"out='{tmp_path / 'x'}'", "--set", f"init_from='{tmp_path / 'nothing'}'")
    _one_line_error(r, "init_from")


@pytest.mark.skipif(not have_tiny_weights(), reason="shipped tiny weights not present")
def test_pretrain_wide_recipe_mixes_domains_with_generic_captions(tmp_path):
    """The wide recipe continues the shipped weights on every domain, captioned in the base vocabulary;
    its cache refuses a run that asks for other data; its weight folder loads as a backbone as it is."""
    from safetensors import safe_open

    from prompt_cdm.backbone.loading import load

    out = tmp_path / "wide"
    args = ["backbone", "pretrain", "recipes/tiny_backbone_wide.toml", "--smoke", "--set", f"out='{out}'"]
    assert main(args) == 0
    with safe_open(str(out / "latents.safetensors"), "pt") as f:
        meta = f.metadata()
        ids = f.get_tensor("input_ids")
    assert meta["captions"] == "generic" and meta["domains"].split(",")[0] == "base"
    assert len(meta["domains"].split(",")) == 9 and ids.shape[0] == 18
    _one_line_error(_run(*args, "--set", "captions='named'", "--set", "unet.steps=4"), "was built for captions=generic")
    pipe = load(str(out / "weights"))
    assert pipe.backbone_fingerprint != load("tiny").backbone_fingerprint
    assert pipe.unet.config.sample_size == load("tiny").unet.config.sample_size


def test_judge_smoke(tmp_path):
    out = tmp_path / "j"
    assert main(["world", "train-judge", "recipes/judge.toml", "--smoke", "--set", f"out='{out}'"]) == 0
    acc = json.loads((out / "accuracy.json").read_text())
    assert set(acc["renders"]) >= {"base", "stars"}
    assert (out / "weights" / "judge.safetensors").exists()
