"""The adapter folder: the unit a source's owner trains, shares, loads and deletes (to forget).

    adapter_config.json               kind, hyper-parameters, source id, data manifest hash,
                                      backbone fingerprint, training config, library version
    adapter_model.safetensors         weights in our key format (soft_prompt.embeds | unet./text_encoder. LoRA keys |
                                      deep_prompt.<layer>.tokens|key|value; the last also read by plain diffusers
                                      through deep_prompt.install)
    learned_embeds.safetensors        soft prompts: {placeholder: [n x D]}, for pipe.load_textual_inversion
    pytorch_lora_weights.safetensors  LoRAs: diffusers keys + rank/alpha metadata, for pipe.load_lora_weights
    README.md                         model card: YAML front matter (Hub convention) + prose
    samples.png                       optional sample grid

Loading is strict (safetensors only, exact config keys, matching backbone fingerprint, exact
tensor keys and shapes) and validates everything before it touches the pipeline.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

try:
    from .. import __version__
except ImportError:  # an editable install made before prompt_cdm/__init__.py existed maps a namespace package
    from importlib.metadata import version as _version

    __version__ = _version("prompt-cdm")
from ..util.config import ConfigError, from_dict, to_dict
from ..util.io import fsync_path, read_json, replace_dir, save_image, save_safetensors, write_json, write_text
from . import card
from .errors import AdapterError
from .kinds import KINDS, get_kind, kind_of
from .kinds import LORA_DIFFUSERS_NAME, SOFT_PROMPT_DIFFUSERS_NAME, SOFT_PROMPT_KEY  # noqa: F401 (the folder's names)
from .lora import LoraAdapter, LoraAdapterConfig
from .soft_prompt import SoftPrompt, SoftPromptConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"
SAMPLES_NAME = "samples.png"
PARAMS = {name: k.params for name, k in KINDS.items()}  # kind -> hyper-parameter dataclass
# trained LoRA factors and soft-prompt rows stay within a few units (CLIP's token rows within ~0.1); a value
# past this bound is corruption or an attack, and would overflow the UNet's activations (a black image)
MAX_ABS_WEIGHT = 100.0
_SOURCE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


@dataclass
class AdapterConfig:
    """adapter_config.json. Every key is required when reading: a file is refused, not guessed at."""

    kind: str = field(metadata={"help": "soft-prompt | lora | deep-prompt"})
    source_id: str = field(metadata={"help": "the data source this adapter was trained on (and only on)"})
    params: dict = field(metadata={"help": "the kind's hyper-parameters (SoftPromptConfig | LoraAdapterConfig | DeepPromptConfig)"})
    backbone_fingerprint: str = field(metadata={"help": "prompt_cdm.backbone.fingerprint of the frozen backbone"})
    base_model: str = field(default="", metadata={"help": "backbone name or hub id, for the model card"})
    data_hash: str = field(default="", metadata={"help": "hash of the source's data manifest"})
    train_config: dict = field(default_factory=dict, metadata={"help": "the training run's config"})
    library: str = "prompt_cdm"
    library_version: str = __version__

    def __post_init__(self):
        if self.kind not in PARAMS:
            raise ValueError(f"kind must be one of {list(PARAMS)}, got {self.kind!r}")
        if not _SOURCE_ID.match(self.source_id or ""):
            raise ValueError(f"source_id {self.source_id!r} must be letters, digits, '_' or '-'")
        if self.library != "prompt_cdm":
            raise ValueError(f"library must be 'prompt_cdm', got {self.library!r}")
        self.params_config()  # validates the hyper-parameters

    def params_config(self) -> SoftPromptConfig | LoraAdapterConfig:
        cls = PARAMS[self.kind]
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in self.params]
        if missing:
            raise ValueError(f"params lacks {', '.join(repr(m) for m in missing)}; {self.kind} params are: "
                             f"{', '.join(names)}")
        try:
            return from_dict(cls, self.params, prefix="params.")
        except ConfigError as e:
            raise ValueError(str(e)) from None


@dataclass
class LoadedAdapter:
    """An adapter applied to a pipeline by `load_adapter`: its folder, config, and its name there
    (the placeholder of a soft prompt, the peft adapter name of a LoRA)."""

    folder: Path
    config: AdapterConfig
    pipe: Any = field(repr=False)
    name: str

    @property
    def kind(self) -> str:
        return self.config.kind

    def prompt(self, caption: str) -> str:
        """The conditional prompt for `caption`: a soft prompt's placeholder prefixes it; a LoRA keeps it."""
        return get_kind(self.kind).row_prompt(self.name, caption)

    def remove(self) -> SoftPrompt | LoraAdapter:
        """Take the adapter off the pipeline (exactly restoring it when this was the last one applied)."""
        return get_kind(self.kind).remove(self.pipe, self.name)


# ---------------------------------------------------------------- fingerprint


def _has_adapters(pipe) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    from .deep_prompt import bank

    if any(not t.special for t in pipe.tokenizer.added_tokens_decoder.values()) or bank(pipe.unet) is not None:
        return True
    return any(isinstance(m, BaseTunerLayer) for c in ("unet", "text_encoder") for m in getattr(pipe, c).modules())


def backbone_fingerprint(pipe) -> str:
    """`pipe.backbone_fingerprint` (set by backbone.load and by our first load), else the fingerprint of
    the pipeline, which must then carry no adapter (their weights would enter the hash)."""
    fp = getattr(pipe, "backbone_fingerprint", None)
    if fp:
        return fp
    if _has_adapters(pipe):
        raise AdapterError(
            "this pipeline has adapters applied and no `backbone_fingerprint` attribute, so its backbone cannot be "
            "fingerprinted; load it with prompt_cdm.backbone.load (or set pipe.backbone_fingerprint = "
            "prompt_cdm.backbone.fingerprint(pipe) before applying adapters)"
        )
    from ..backbone.loading import fingerprint

    return fingerprint(pipe)


# ---------------------------------------------------------------- saving


def save_adapter(
    folder: str | os.PathLike,
    adapter: SoftPrompt | LoraAdapter,
    pipe=None,
    *,
    source_id: str,
    fingerprint: str | None = None,
    base_model: str | None = None,
    data_hash: str = "",
    train_config: dict | None = None,
    figures: dict[str, Any] | None = None,
    sample_grid=None,
    license: str = "apache-2.0",
    overwrite: bool = False,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write an adapter folder (all files, then one rename: readers never see half a folder).

    `adapter` is the data (soft_prompt.read_back / lora.read_back after training); `pipe` gives the
    backbone fingerprint and name unless `fingerprint` / `base_model` are passed.
    `figures` (e.g. {"steps": 500, "final loss": 0.08}) become a table in README.md;
    `sample_grid` (a PIL image) is saved as samples.png; `extra(folder)` writes more files (a training log)
    into the folder before it is renamed into place, so that a folder in place is always whole. Temp
    folders that an earlier, killed save to `folder` left beside it are deleted first."""
    folder = Path(folder)
    kind_impl = kind_of(adapter)
    kind, tensors, params = kind_impl.name, kind_impl.state(adapter), to_dict(adapter.config)
    if fingerprint is None:
        if pipe is None:
            raise AdapterError("save_adapter needs the pipeline (or fingerprint=...) to record the backbone")
        fingerprint = backbone_fingerprint(pipe)
    if base_model is None:
        base_model = str(getattr(pipe, "backbone_name", None) or getattr(pipe, "name_or_path", None) or "unknown")
    try:
        config = AdapterConfig(kind=kind, source_id=source_id, params=params, backbone_fingerprint=fingerprint,
                               base_model=base_model, data_hash=data_hash, train_config=dict(train_config or {}))
    except ValueError as e:
        raise AdapterError(f"cannot save adapter to {folder}: {e}") from None
    try:
        json.dumps(config.train_config)
    except TypeError as e:
        raise AdapterError(f"train_config must be JSON-serialisable ({e}); "
                           "pass prompt_cdm.config.to_dict(cfg)") from None
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not overwrite)):
        raise AdapterError(f"{folder} exists and is not an empty folder; pass overwrite=True to replace it")

    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".{glob.escape(folder.name)}.*"):  # a killed save's (or replace_dir's) leftovers
        if stale.name.endswith((".tmp", ".old")) and stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        write_json(tmp / CONFIG_NAME, to_dict(config))
        save_safetensors(tmp / WEIGHTS_NAME, tensors, metadata={"format": "pt", "prompt_cdm_kind": kind})
        kind_impl.export(tmp, adapter)  # the diffusers-loadable copy
        if sample_grid is not None:
            save_image(tmp / SAMPLES_NAME, sample_grid)
        write_text(tmp / CARD_NAME, card.render(config, figures, license, SAMPLES_NAME if sample_grid is not None
                                                 else None, folder.name))
        if extra is not None:
            extra(tmp)
        for p in tmp.iterdir():
            fsync_path(p)
        fsync_path(tmp)
        replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# ---------------------------------------------------------------- reading


def _check_folder(folder: Path) -> None:
    from .validate import check_pickles

    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist; pass a folder written by save_adapter")
    check_pickles(folder, str(folder))


def read_adapter_config(folder: str | os.PathLike) -> AdapterConfig:
    """Read and validate `folder`/adapter_config.json (exact keys, valid values)."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{path} is missing; an adapter folder needs it -- re-save the adapter with save_adapter")
    data = read_json(path, AdapterError, "re-save the adapter with save_adapter")
    if not isinstance(data, dict):
        raise AdapterError(f"{path} must hold a JSON object; re-save the adapter with save_adapter")
    valid = [f.name for f in dataclasses.fields(AdapterConfig)]
    unknown = [k for k in data if k not in valid]
    missing = [k for k in valid if k not in data]
    if unknown or missing:
        what = f"unknown key {unknown[0]!r}" if unknown else f"missing key {missing[0]!r}"
        raise AdapterError(f"{path}: {what}; valid keys (all required): {', '.join(valid)} "
                           "-- fix the file or re-save it")
    try:
        return from_dict(AdapterConfig, data)
    except (ConfigError, ValueError) as e:
        raise AdapterError(f"{path}: {e} -- fix the file or re-save it") from None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise AdapterError(f"{path} is missing: the adapter has no weights -- re-save it with save_adapter "
                           "or download the whole folder again")
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        first = str(e).splitlines()[0] if str(e) else ""
        raise AdapterError(f"{path} is truncated or corrupt ({type(e).__name__}: {first}); "
                           "download the adapter again or re-save it") from None
    bad = [k for k, v in tensors.items() if not v.is_floating_point() or not torch.isfinite(v).all()]
    if bad:
        raise AdapterError(f"{path}: tensor {bad[0]} is not finite floating point (corrupt?); re-save the adapter")
    big = [k for k, v in tensors.items() if v.numel() and float(v.abs().max()) > MAX_ABS_WEIGHT]
    if big:
        raise AdapterError(f"{path}: tensor {big[0]} holds values of magnitude {float(tensors[big[0]].abs().max()):.3g}, "
                           f"over the bound {MAX_ABS_WEIGHT:g} of a trained adapter (corrupt, or made to break the "
                           "backbone); retrain or re-save the adapter")
    return tensors


def load_adapter(folder: str | os.PathLike, pipe, name: str | None = None) -> LoadedAdapter:
    """Validate the folder against `pipe`, then apply the adapter; return its handle.

    `name` is the LoRA's peft adapter name (default: the source id); soft prompts use their
    placeholder. Raises AdapterError (and leaves `pipe` untouched) on: pickle files in the folder,
    a missing/corrupt weights file, a missing or malformed config, another backbone, wrong tensor
    keys, shapes or rank, a name or placeholder already applied."""
    folder = Path(folder)
    _check_folder(folder)
    config = read_adapter_config(folder)
    weights_path = folder / WEIGHTS_NAME
    tensors = read_weights(weights_path)
    fp = backbone_fingerprint(pipe)
    if config.backbone_fingerprint != fp:
        raise AdapterError(
            f"{folder / CONFIG_NAME}: the adapter was trained on backbone {config.backbone_fingerprint} "
            f"({config.base_model}), this pipeline is {fp}; load the backbone it was trained on, or retrain the adapter"
        )
    params = config.params_config()
    try:
        name = get_kind(config.kind).apply(pipe, params, tensors, name or config.source_id)
    except AdapterError as e:
        raise AdapterError(f"{weights_path}: {e}") from None
    if getattr(pipe, "backbone_fingerprint", None) is None:
        pipe.backbone_fingerprint = fp  # later loads must not hash a pipeline that now carries adapters
    return LoadedAdapter(folder, config, pipe, name)
