"""FID/KID through torchmetrics with pluggable features (= our float64 Fréchet distance), the judge as
feature extractor, Inception only from a weights file, CLIPScore with open_clip; `prompt-cdm eval fid`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eval.errors import EvalError
from eval.fid import (FEATURES, JudgeFeatures, clip_score, feature_extractor, fid_kid, fid_kid_features,
                      frechet_distance, read_folder, to_uint8)
from helpers import have_judge_weights
from prompt_cdm.cli import main


def _renders(domain, n, seed=0):
    from prompt_cdm.world.dataset import examples

    return [e.image for e in examples(domain, n, seed=seed, heldout=True)]


def test_torchmetrics_fid_equals_frechet_distance_and_kid_is_unbiased():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 8, generator=g, dtype=torch.float64)
    b = torch.randn(200, 8, generator=g, dtype=torch.float64) * 1.5 + 0.3
    res = fid_kid_features(a, b, kid_subsets=20, kid_subset_size=100)
    assert res["fid"] == pytest.approx(frechet_distance(a, b), rel=1e-6)
    assert res["kid_mean"] > 0.05 and res["kid_subset_size"] == 100
    same = fid_kid_features(a[:150], a[150:], kid_subsets=50, kid_subset_size=100)
    assert abs(same["kid_mean"]) < 3 * same["kid_std"] + 1e-3  # unbiased MMD^2: about 0 for one distribution
    assert fid_kid_features(a, b, kid_subsets=20, kid_subset_size=100, seed=0)["kid_mean"] == res["kid_mean"]
    with pytest.raises(EvalError, match="at least 2"):
        fid_kid_features(a[:1], b)


@pytest.mark.skipif(not have_judge_weights(), reason="judge weights not shipped")
def test_judge_features_fid_renders_vs_noise():
    ref, other = _renders("base", 64, seed=0), _renders("base", 64, seed=1)
    noise = torch.randint(0, 256, (64, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    net = JudgeFeatures()
    assert net.num_features == net(to_uint8(ref[:2])).shape[1] == 320
    # the extractor through torchmetrics = judge.features + our Fréchet distance
    direct = frechet_distance(net.judge.features(ref), net.judge.features(other))
    close = fid_kid(ref, other, features=net, kid_subsets=10)
    far = fid_kid(ref, noise, features="judge", kid_subsets=10)
    assert close["fid"] == pytest.approx(direct, rel=1e-5)
    assert far["fid"] > 5 * close["fid"] and far["kid_mean"] > close["kid_mean"] and far["features"] == "judge"


def test_inception_needs_its_weights_file_and_nothing_downloads(tmp_path):
    assert set(FEATURES) == {"judge", "inception"}
    with pytest.raises(EvalError, match="need the FID weights file"):
        feature_extractor("inception")
    w = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    w.write_bytes(b"\0")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        with pytest.raises(EvalError, match="torch-fidelity"):
            feature_extractor("inception", w)
    with pytest.raises(EvalError, match="unknown FID features 'clip'"):
        feature_extractor("clip")


TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def test_clip_score_with_open_clip_weights_file(tmp_path):
    import open_clip
    from PIL import Image

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "tiny-test-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path / "cfg")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-test-clip")
    weights = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), weights)
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    caps = ["a red circle", "a blue square", "a star"]
    s = clip_score(ims, caps, "tiny-test-clip", weights)
    # the same number by hand: 100 * max(cos, 0), averaged
    _, _, pre = open_clip.create_model_and_transforms("tiny-test-clip", pretrained=str(weights))
    model.eval()
    with torch.no_grad():
        a = torch.nn.functional.normalize(model.encode_image(torch.stack([pre(i) for i in ims])), dim=-1)
        b = torch.nn.functional.normalize(model.encode_text(open_clip.get_tokenizer("tiny-test-clip")(caps)), dim=-1)
    assert s == pytest.approx(float((100 * (a * b).sum(-1).clamp(min=0)).mean()), rel=1e-5, abs=1e-4)
    with pytest.raises(EvalError, match="does not exist -- nothing is downloaded"):
        clip_score(ims, caps, "ViT-B-32", "openai")
    with pytest.raises(EvalError, match="3 images for 2 captions"):
        clip_score(ims, caps[:2], "tiny-test-clip", weights)


@pytest.mark.skipif(not have_judge_weights(), reason="judge weights not shipped")
def test_cli_eval_fid(tmp_path, capsys):
    for name, seed in (("real", 0), ("fake", 1)):
        assert main(["world", "render", "--domain", "base", "--n", "12", "--seed", str(seed), "--out",
                     str(tmp_path / name)]) == 0
    capsys.readouterr()
    out = tmp_path / "fid.json"
    assert main(["eval", "fid", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["fid"] > 0 and res["n_real"] == res["n_fake"] == 12 and res["kid_subset_size"] == 12
    assert read_folder(tmp_path / "fake").captions is not None  # CLIPScore would read these
    assert main(["eval", "fid", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
                 "--features", "inception"]) == 2
    assert "need the FID weights file" in capsys.readouterr().err
    assert main(["eval", "fid", "--real", str(tmp_path / "none"), "--fake", str(tmp_path / "fake")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
