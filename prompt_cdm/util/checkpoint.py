"""Training checkpoints in safetensors only: module weights, optimizer state and metadata.

An optimizer's state dict is flattened to tensors (`opt.<param>.<key>`) plus a JSON header
holding its non-tensor parts, so resuming never unpickles anything.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .io import atomic_path, save_safetensors, write_json


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v.detach().clone()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(opt: torch.optim.Optimizer, tensors: dict, header: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        if not key.startswith("opt."):
            continue
        _, pid, k = key.split(".", 2)
        state.setdefault(int(pid), {})[k] = v
    for key, v in header["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": header["param_groups"]})


def save(folder: str | Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer | None,
         meta: dict) -> None:
    """Write `state.safetensors` + `state.json` into `folder` (each atomically; json last = commit)."""
    folder = Path(folder)
    tensors = {}
    for name, m in modules.items():
        for k, v in m.state_dict().items():
            tensors[f"{name}.{k}"] = v.detach().clone()
    header = None
    if optimizer is not None:
        t, header = _flatten_optimizer(optimizer)
        tensors.update(t)
    tensors["rng.torch"] = torch.get_rng_state()
    save_safetensors(folder / "state.safetensors", tensors)
    write_json(folder / "state.json", {"meta": meta, "optimizer": header, "modules": list(modules)})


def exists(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / "state.json").exists() and (folder / "state.safetensors").exists()


def load(folder: str | Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore modules/optimizer/torch RNG from `folder`; return the saved metadata."""
    folder = Path(folder)
    try:
        header = json.loads((folder / "state.json").read_text())
        tensors = load_file(str(folder / "state.safetensors"))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise ValueError(f"checkpoint in {folder} is unreadable ({e}); delete the folder to start over") from None
    for name, m in modules.items():
        prefix = f"{name}."
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        m.load_state_dict(sd)
    if optimizer is not None and header.get("optimizer"):
        _unflatten_optimizer(optimizer, tensors, header["optimizer"])
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    return header["meta"]


__all__ = ["save", "load", "exists", "atomic_path"]
