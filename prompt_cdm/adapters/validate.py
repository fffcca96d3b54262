"""The one check of an adapter folder that needs no pipeline, used by `load_adapter`, `registry add`
and `hub push` / `hub pull` alike: no pickle files anywhere, adapter_config.json valid, every
*.safetensors parses, the weights exist, are finite floating point and agree with the config in keys
and shapes (soft prompt [n x D]; LoRA A [r x in] / B [out x r] pairs on the configured targets).
What needs the backbone (its fingerprint, the exact module shapes) is `load_adapter`'s part.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..util.io import is_pickle_name
from .errors import AdapterError
from .kinds import get_kind



def _files(folder: Path, skip: tuple[str, ...]) -> list[str]:
    """Relative POSIX paths of the files under `folder`, minus those under the `skip` paths."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if any(rel == n or rel.startswith(n + "/") for n in skip):
            continue
        if p.is_symlink():
            raise AdapterError(f"{folder}/{rel} is a symbolic link; an adapter folder holds regular files only -- "
                               "replace it with the file itself")
        if p.is_file():
            out.append(rel)
    return out


def check_pickles(folder: Path, label: str, skip: tuple[str, ...] = ()) -> list[str]:
    """The folder's files (relative paths); AdapterError on the first pickle file among them."""
    files = _files(folder, skip)
    pickles = [rel for rel in files if is_pickle_name(rel)]
    if pickles:
        raise AdapterError(f"{label}/{pickles[0]} is a pickle file; prompt_cdm loads safetensors only (pickle can "
                           "run code) -- delete it, or convert it to safetensors and re-save the adapter with "
                           "save_adapter")
    return files


def check_adapter_folder(folder: str | os.PathLike, label: str | None = None, skip: tuple[str, ...] = (),
                         backbone: dict | None = None):
    """Validate an adapter folder without a pipeline; return its AdapterConfig. `label` names the folder in
    messages (default: its path); files under the `skip` paths are not the adapter's (e.g. a hub's .git).
    `backbone`: a `kinds.backbone_table` (a registry keeps its backbone's): the weights' keys and shapes are
    checked against it exactly as `load_adapter` checks them against a pipeline."""
    from .store import WEIGHTS_NAME, read_adapter_config, read_weights

    folder = Path(folder)
    label = label or str(folder)
    if not folder.is_dir():
        raise AdapterError(f"{label} is not a folder; pass an adapter folder written by save_adapter")
    files = check_pickles(folder, label, skip)
    try:
        config = read_adapter_config(folder)
    except AdapterError as e:
        raise AdapterError(str(e).replace(str(folder), label)) from None
    headers = {rel: _safetensors_header(folder / rel, f"{label}/{rel}") for rel in files if rel.endswith(".safetensors")}
    if WEIGHTS_NAME not in headers:
        raise AdapterError(f"{label}/{WEIGHTS_NAME} is missing: the adapter has no weights -- re-save it with "
                           "save_adapter")
    weights = headers.pop(WEIGHTS_NAME)
    get_kind(config.kind).check_weights(config.params_config(), weights, headers, f"{label}/{WEIGHTS_NAME}")
    try:
        for rel in sorted([WEIGHTS_NAME, *headers]):
            read_weights(folder / rel)  # every value finite floating point, within MAX_ABS_WEIGHT
    except AdapterError as e:
        raise AdapterError(str(e).replace(str(folder), label)) from None
    if backbone is not None:
        get_kind(config.kind).check_backbone(config.params_config(), weights, backbone, f"{label}/{WEIGHTS_NAME}")
    return config


def _safetensors_header(path: Path, label: str) -> dict[str, tuple[str, list[int]]]:
    """{key: (dtype, shape)} read with safetensors' own parser (header, offsets and file length)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AdapterError(f"{label} is truncated or corrupt ({first}); re-save the adapter with save_adapter "
                       "(or download it again)") from None
