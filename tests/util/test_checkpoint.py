"""safetensors-only training checkpoints (resume is exact) and atomic file writes."""
from __future__ import annotations

import json
import os

import pytest
import torch

from prompt_cdm.util import checkpoint
from prompt_cdm.util.io import atomic_path, save_image, write_json, write_jsonl, write_text


@pytest.fixture(autouse=True)
def _keep_global_rng():
    """checkpoint.load restores the global torch RNG; don't leak that into other tests."""
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    # BatchNorm brings buffers (incl. an int64 counter); Dropout makes training use the RNG
    return torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Dropout(0.2),
        torch.nn.Linear(16, 2),
    )


def _opt(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _train(model, opt, steps: int) -> None:
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 4)  # data from the global RNG, which the checkpoint carries
        loss = (model(x) - x[:, :2]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_is_exact(tmp_path):
    folder = tmp_path / "ckpt"
    a = _model(0)
    opt_a = _opt(a)
    _train(a, opt_a, 3)
    assert not checkpoint.exists(folder)
    checkpoint.save(folder, {"net": a}, opt_a, {"step": 3, "note": "hello"})
    assert checkpoint.exists(folder)
    saved = _state(a)

    # only safetensors + json, no temp files or pickles left behind
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["state.json", "state.safetensors"]
    assert all(p.suffix in (".safetensors", ".json") for p in folder.rglob("*") if p.is_file())

    _train(a, opt_a, 3)  # the uninterrupted run

    torch.manual_seed(123)  # a different RNG state that load must undo
    b = _model(1)  # different initial weights
    opt_b = _opt(b)
    assert any(not torch.equal(v, saved[k]) for k, v in b.state_dict().items() if v.is_floating_point())
    meta = checkpoint.load(folder, {"net": b}, opt_b)
    assert meta == {"step": 3, "note": "hello"}
    for k, v in b.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert len(opt_b.state) == len(list(b.parameters()))
    _train(b, opt_b, 3)  # the resumed run

    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for pa, pb in zip(a.parameters(), b.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(opt_a.state[pa][key]), torch.as_tensor(opt_b.state[pb][key])), key
    assert opt_b.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"]
    assert opt_b.param_groups[0]["weight_decay"] == 0.1


def test_save_without_optimizer_and_several_modules(tmp_path):
    a, b = _model(0), _model(1)
    checkpoint.save(tmp_path, {"a": a, "b": b}, None, {"step": 0})
    header = json.loads((tmp_path / "state.json").read_text())
    assert header["optimizer"] is None and header["modules"] == ["a", "b"]
    a2, b2 = _model(2), _model(3)
    assert checkpoint.load(tmp_path, {"a": a2, "b": b2}, None) == {"step": 0}
    for src, dst in ((a, a2), (b, b2)):
        for k, v in src.state_dict().items():
            assert torch.equal(v, dst.state_dict()[k])
    # loading into a model of the wrong shape fails loudly
    with pytest.raises(RuntimeError):
        checkpoint.load(tmp_path, {"a": torch.nn.Linear(4, 2)}, None)


def test_save_overwrites_atomically(tmp_path):
    m = _model(0)
    opt = _opt(m)
    checkpoint.save(tmp_path, {"m": m}, opt, {"step": 1})
    _train(m, opt, 1)
    checkpoint.save(tmp_path, {"m": m}, opt, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]
    assert checkpoint.load(tmp_path, {"m": _model(5)}, _opt(_model(5))) == {"step": 2}


@pytest.mark.parametrize("keep", ["half", "few"])
def test_truncated_safetensors_is_a_clear_error(tmp_path, keep):
    folder = tmp_path / "ckpt"
    m = _model(0)
    opt = _opt(m)
    _train(m, opt, 1)
    checkpoint.save(folder, {"m": m}, opt, {"step": 1})
    st = folder / "state.safetensors"
    size = st.stat().st_size
    with open(st, "r+b") as f:
        f.truncate(size // 2 if keep == "half" else 5)
    with pytest.raises(ValueError) as ei:
        checkpoint.load(folder, {"m": _model(0)}, _opt(_model(0)))
    assert str(folder) in str(ei.value)


def test_corrupt_or_missing_json_is_a_clear_error(tmp_path):
    m = _model(0)
    checkpoint.save(tmp_path, {"m": m}, None, {"step": 1})
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match=str(tmp_path)):
        checkpoint.load(tmp_path, {"m": m}, None)
    (tmp_path / "state.json").unlink()
    assert not checkpoint.exists(tmp_path)
    with pytest.raises(ValueError, match=str(tmp_path)):
        checkpoint.load(tmp_path, {"m": m}, None)


# ---------------------------------------------------------------- io


def test_atomic_path_leaves_nothing_when_the_body_raises(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp != target
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert list(target.parent.iterdir()) == []  # no target, no temp file

    # an existing file survives a failed rewrite untouched
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("new")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_atomic_path_replaces_on_success(tmp_path):
    target = tmp_path / "a" / "b" / "x.json"  # parents are created
    with atomic_path(target) as tmp:
        tmp.write_text("1")
        assert not target.exists()  # nothing visible until the body finishes
    assert target.read_text() == "1"
    write_json(target, {"k": [1, 2]})
    assert json.loads(target.read_text()) == {"k": [1, 2]}
    write_jsonl(tmp_path / "r.jsonl", [{"a": 1}, {"b": 2}])
    assert (tmp_path / "r.jsonl").read_text() == '{"a": 1}\n{"b": 2}\n'
    write_text(tmp_path / "t.txt", "hi")
    assert (tmp_path / "t.txt").read_text() == "hi"
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_save_image_failure_leaves_no_temp(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (4, 4), (1, 2, 3))
    save_image(tmp_path / "ok.png", img)
    assert Image.open(tmp_path / "ok.png").getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises((KeyError, ValueError, OSError)):
        save_image(tmp_path / "bad.notaformat", img)
    assert sorted(os.listdir(tmp_path)) == ["ok.png"]
