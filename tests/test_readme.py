"""The README's Python example runs as written (on the shipped tiny backbone, with two adapter folders
made here with random weights under the names it uses)."""
import contextlib
import io
import re
from pathlib import Path

import torch

from helpers import have_tiny_weights

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_one_python_example():
    assert len(python_blocks()) == 1


def test_readme_python_example_runs(tmp_path, monkeypatch):
    if not have_tiny_weights():
        import pytest

        pytest.skip("the tiny backbone's weights are not installed")
    from prompt_cdm.adapters import LoraAdapter, LoraAdapterConfig, lora, save_adapter
    from prompt_cdm.backbone.loading import load

    pipe = load("tiny")
    g = torch.Generator().manual_seed(0)
    for name in ("stars", "striped"):
        fresh = lora.create(pipe, LoraAdapterConfig(rank=4, alpha=4.0))
        ad = LoraAdapter(fresh.config, {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in fresh.tensors.items()})
        save_adapter(tmp_path / "adapters" / name, ad, pipe, source_id=name, data_hash=f"hash-{name}")
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(python_blocks()[0], str(README), "exec"), {"__name__": "readme"})
    assert (tmp_path / "composed.png").is_file()
    credit = eval(out.getvalue().strip().splitlines()[-1])  # the example prints the credit dict
    assert set(credit) == {"stars", "striped"} and abs(sum(credit.values()) - 1) < 1e-4
