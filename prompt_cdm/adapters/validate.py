"""The one check of an adapter folder that needs no pipeline, used by `load_adapter`, `registry add`
and `hub push` / `hub pull` alike: no pickle files anywhere, adapter_config.json valid, every
*.safetensors parses, the weights exist, are finite floating point and agree with the config in keys
and shapes (soft prompt [n x D]; LoRA A [r x in] / B [out x r] pairs on the configured targets).
What needs the backbone (its fingerprint, the exact module shapes) is `load_adapter`'s part.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..util.io import is_pickle_name
from .errors import AdapterError

_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_LORA_KEY = re.compile(r"^(?P<component>unet|text_encoder)\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def _files(folder: Path, skip: tuple[str, ...]) -> list[str]:
    """Relative POSIX paths of the files under `folder`, minus those under the `skip` paths."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if any(rel == n or rel.startswith(n + "/") for n in skip):
            continue
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


def check_adapter_folder(folder: str | os.PathLike, label: str | None = None, skip: tuple[str, ...] = ()):
    """Validate an adapter folder without a pipeline; return its AdapterConfig. `label` names the folder in
    messages (default: its path); files under the `skip` paths are not the adapter's (e.g. a hub's .git)."""
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
    params = config.params_config()
    if config.kind == "soft-prompt":
        _check_soft_prompt(params, weights, headers, f"{label}/{WEIGHTS_NAME}")
    else:
        _check_lora(params, weights, f"{label}/{WEIGHTS_NAME}")
    try:
        read_weights(folder / WEIGHTS_NAME)  # every value finite
    except AdapterError as e:
        raise AdapterError(str(e).replace(str(folder), label)) from None
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


def _check_soft_prompt(params, weights: dict, others: dict, label: str) -> None:
    from .store import SOFT_PROMPT_DIFFUSERS_NAME, SOFT_PROMPT_KEY

    if set(weights) != {SOFT_PROMPT_KEY}:
        raise AdapterError(f"{label}: a soft prompt's weights are one tensor {SOFT_PROMPT_KEY!r}, found {sorted(weights)}; "
                       "re-save the adapter with save_adapter")
    dtype, shape = weights[SOFT_PROMPT_KEY]
    if len(shape) != 2 or shape[0] != params.num_vectors or shape[1] < 1 or dtype not in _FLOAT_DTYPES:
        raise AdapterError(f"{label}: {SOFT_PROMPT_KEY} is {dtype} {shape}, the config implies floating point "
                       f"[num_vectors={params.num_vectors} x D]; re-save the adapter with save_adapter")
    te = others.get(SOFT_PROMPT_DIFFUSERS_NAME)  # optional copy for pipe.load_textual_inversion
    if te is not None and (set(te) != {params.placeholder} or te[params.placeholder][1] != shape):
        found = {k: v[1] for k, v in te.items()}
        raise AdapterError(f"{label.rsplit('/', 1)[0]}/{SOFT_PROMPT_DIFFUSERS_NAME}: expected one tensor "
                       f"{params.placeholder!r} of shape {shape} (the soft prompt's rows), found {found}; "
                       "re-save the adapter with save_adapter")


def _check_lora(params, weights: dict, label: str) -> None:
    pairs: dict[tuple[str, str], dict[str, list[int]]] = {}
    for key, (dtype, shape) in weights.items():
        m = _LORA_KEY.match(key)
        if m is None or m["component"] not in params.components():
            raise AdapterError(f"{label}: tensor {key!r} is not a LoRA key of this config "
                           f"(<{'|'.join(params.components())}>.<module>.lora_A|B.weight); re-save the adapter")
        targets = params.unet_targets if m["component"] == "unet" else params.text_targets
        if not any(m["module"] == t or m["module"].endswith("." + t) for t in targets):
            raise AdapterError(f"{label}: tensor {key!r} adapts a module outside the config's targets {list(targets)}; "
                           "re-save the adapter")
        if len(shape) != 2 or dtype not in _FLOAT_DTYPES:
            raise AdapterError(f"{label}: tensor {key!r} is {dtype} {shape}, expected a floating-point matrix; re-save it")
        pairs.setdefault((m["component"], m["module"]), {})[m["ab"]] = shape
    for (component, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{label}: {component}.{module} has lora_{''.join(ab)} but not its partner; re-save it")
        if ab["A"][0] != params.rank or ab["B"][1] != params.rank:
            raise AdapterError(f"{label}: {component}.{module} has rank {ab['A'][0]}/{ab['B'][1]} (lora_A/lora_B), the "
                           f"config says rank {params.rank}; re-save the adapter")
    for component in params.components():
        if not any(c == component for c, _ in pairs):
            raise AdapterError(f"{label}: no {component} LoRA tensors, but the config adapts the {component}; re-save it")
