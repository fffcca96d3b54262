"""Parameters and bytes per adapter at the recipe defaults, per kind, on one backbone (no training).

    python -m eval.adapter_size --backbone tiny --set deep_prompt.mode=kv

Each kind's fresh adapter (TrainConfig's defaults, i.e. recipes/adapter_train.toml) is saved with save_adapter;
`params` counts the tensors of adapter_model.safetensors, `bytes` that file's size, `folder_bytes` the whole
folder (config, model card and the diffusers-loadable copy).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def sizes(backbone: str = "tiny", overrides: list[str] | None = None) -> dict:
    import torch

    from prompt_cdm.adapters.kinds import KINDS
    from prompt_cdm.adapters.store import WEIGHTS_NAME, save_adapter
    from prompt_cdm.backbone.loading import load_quietly
    from prompt_cdm.training.train import TrainConfig
    from prompt_cdm.util.config import apply_overrides

    pipe = load_quietly(backbone)
    cfg = apply_overrides(TrainConfig(), overrides or [])
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind in KINDS.items():
            section = getattr(cfg, kind.train_section)
            params = section.adapter_config("s") if name == "soft-prompt" else section.adapter_config()
            adapter = kind.create(pipe, params, torch.Generator().manual_seed(0))
            folder = save_adapter(Path(tmp) / name, adapter, pipe, source_id="s")
            n = sum(v.numel() for v in kind.state(adapter).values())
            out[name] = {"params": n, "bytes": (folder / WEIGHTS_NAME).stat().st_size,
                         "folder_bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
                         "hyper": {k: v for k, v in vars(params).items()}}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args(argv)
    print(json.dumps(sizes(a.backbone, a.overrides), indent=1, default=str))


if __name__ == "__main__":
    main()
