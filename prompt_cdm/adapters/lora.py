"""LoRA adapters (Hu et al. 2021) on the frozen backbone, injected with peft as *named* adapters.

One source = one adapter name. The UNet's attention projections (`to_q`, `to_k`, `to_v`,
`to_out.0`) get low-rank updates W + (alpha/r) B A, optionally also the text encoder's
(`q_proj`, `k_proj`, `v_proj`, `out_proj`). Several named adapters coexist in the same peft
layers, so the composed denoiser can route rows of one batch to different adapters (peft's
mixed-batch `adapter_names` path).

Our key format ("own" format, `adapter_model.safetensors`) is peft's state-dict keys with the
component as prefix: `unet.<module>.lora_A.weight` [r x in], `unet.<module>.lora_B.weight`
[out x r], `text_encoder.<module>.lora_{A,B}.weight`. `diffusers_state_dict` converts to the
keys `pipe.load_lora_weights` reads.

peft's functional API (`peft.functional`) injects into both models. transformers>=5.24's own
`text_encoder.add_adapter` / `load_adapter` refuse peft<0.22, so we do not go through them.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
import re
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .errors import AdapterError

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
COMPONENTS = ("unet", "text_encoder")
# the update scale alpha/rank: recipes use 1-2; past 64 the update swamps the frozen weights (and a huge
# alpha overflows to inf inside the UNet: a black image)
MAX_SCALING = 64.0
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")  # peft adapter names are ModuleDict keys: no dots


class LoraError(AdapterError):
    """A LoRA adapter does not fit the pipeline (or its name is taken); the message says the fix."""


@dataclass
class LoraAdapterConfig:
    """Hyper-parameters of one LoRA adapter (they go to adapter_config.json under `params`)."""

    # rank 4: the tiny UNet's attention is 64-128 wide; SD-scale recipes use 4-16
    rank: int = field(default=4, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=4.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / rank"})
    unet_targets: tuple[str, ...] = field(default=UNET_TARGETS, metadata={"help": "UNet module-name suffixes"})
    text_encoder: bool = field(default=False, metadata={"help": "also adapt the text encoder"})
    text_targets: tuple[str, ...] = field(default=TEXT_TARGETS, metadata={"help": "text-encoder module-name suffixes"})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (training only)"})

    def __post_init__(self):
        self.unet_targets = tuple(self.unet_targets)
        self.text_targets = tuple(self.text_targets)
        if not 1 <= self.rank <= 1024:
            raise ValueError(f"lora rank must be in 1..1024, got {self.rank}")
        if not 0 < self.alpha <= MAX_SCALING * self.rank:
            raise ValueError(f"lora alpha must be in (0, {MAX_SCALING:g} x rank = {MAX_SCALING * self.rank:g}] (the "
                             f"update's scale alpha/rank), got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")
        if not self.unet_targets:
            raise ValueError("lora unet_targets must name at least one module (e.g. to_q)")
        if self.text_encoder and not self.text_targets:
            raise ValueError("lora text_targets must name at least one module when text_encoder = true")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def peft_config(self, component: str):
        """The `peft.LoraConfig` for 'unet' or 'text_encoder'."""
        from peft import LoraConfig

        targets = self.unet_targets if component == "unet" else self.text_targets
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(targets),
                          lora_dropout=self.dropout, init_lora_weights=True)

    def components(self) -> tuple[str, ...]:
        return COMPONENTS if self.text_encoder else ("unet",)


@dataclass
class LoraAdapter:
    """A LoRA adapter's data: config + tensors in our key format. Not tied to a pipeline."""

    config: LoraAdapterConfig
    tensors: dict[str, torch.Tensor]

    def __post_init__(self):
        bad = [k for k in self.tensors if k.split(".", 1)[0] not in self.config.components()]
        if bad:
            raise LoraError(f"LoRA tensor key {bad[0]!r} must start with one of {', '.join(self.config.components())}.")

    def component_state_dict(self, component: str) -> dict[str, torch.Tensor]:
        """peft-format keys of one component (prefix stripped)."""
        p = component + "."
        return {k[len(p):]: v for k, v in self.tensors.items() if k.startswith(p)}

    def diffusers_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """{'unet': ..., 'text_encoder': ...} in diffusers' key format (no component prefix yet)."""
        from diffusers.utils import convert_state_dict_to_diffusers

        out = {}
        for c in self.config.components():
            sd = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in self.component_state_dict(c).items()}
            out[c] = convert_state_dict_to_diffusers(sd)
        return out

    def diffusers_metadata(self) -> dict[str, dict]:
        """LoRA adapter metadata (peft LoraConfig dicts) that makes diffusers reproduce rank and alpha."""
        out = {}
        for c in self.config.components():
            d = self.config.peft_config(c).to_dict()
            out[c] = {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()}
        return out


# ---------------------------------------------------------------- shapes


def _targets(model, peft_cfg) -> dict[str, tuple[int, int]]:
    """{module name: (in, out)} of the modules peft would adapt (plain or already-wrapped Linear)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import check_target_module_exists

    out = {}
    for name, m in model.named_modules():
        if not name or not check_target_module_exists(peft_cfg, name):
            continue
        if isinstance(m, (torch.nn.Linear, LoraLayer)):
            out[name] = (m.in_features, m.out_features)
    return out


def expected_shapes(pipe, config: LoraAdapterConfig) -> dict[str, tuple[int, ...]]:
    """{our key: shape} a LoRA with `config` must have on this pipeline. Touches nothing."""
    shapes: dict[str, tuple[int, ...]] = {}
    for c in config.components():
        found = _targets(getattr(pipe, c), config.peft_config(c))
        if not found:
            targets = config.unet_targets if c == "unet" else config.text_targets
            raise LoraError(f"no {c} module matches the LoRA targets {list(targets)}")
        for name, (fan_in, fan_out) in found.items():
            shapes[f"{c}.{name}.lora_A.weight"] = (config.rank, fan_in)
            shapes[f"{c}.{name}.lora_B.weight"] = (fan_out, config.rank)
    return shapes


def linear_table(model) -> dict[str, list[int]]:
    """{module name: [in, out]} of every Linear module of the model as the bare backbone has it (a module
    wrapped by an applied LoRA counts as its base layer): what a registry keeps of its backbone so that
    `registry add` checks a LoRA's keys and shapes without loading it."""
    from peft.tuners.lora import LoraLayer

    modules = dict(model.named_modules())
    wrapped = {n for n, m in modules.items() if isinstance(m, LoraLayer)}
    out = {}
    for n, m in modules.items():
        parts = n.split(".")
        if not n or any(".".join(parts[:i]) in wrapped for i in range(1, len(parts))):
            continue  # a LoRA wrapper's own base_layer / lora_A / lora_B
        if isinstance(m, (torch.nn.Linear, LoraLayer)):
            out[n] = [m.in_features, m.out_features]
    return out


def shapes_from_table(table: dict[str, dict[str, list[int]]], config: LoraAdapterConfig) -> dict[str, tuple[int, ...]]:
    """`expected_shapes` from a `linear_table` per component (peft's list-target rule: the name or a
    dotted suffix of it)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for c in config.components():
        targets = config.unet_targets if c == "unet" else config.text_targets
        found = {n: v for n, v in table.get(c, {}).items() if any(n == t or n.endswith("." + t) for t in targets)}
        if not found:
            raise LoraError(f"no {c} module matches the LoRA targets {list(targets)}")
        for name, (fan_in, fan_out) in found.items():
            shapes[f"{c}.{name}.lora_A.weight"] = (config.rank, fan_in)
            shapes[f"{c}.{name}.lora_B.weight"] = (fan_out, config.rank)
    return shapes


def compare_shapes(want: dict[str, tuple[int, ...]], have: dict[str, tuple[int, ...]], rank: int) -> None:
    """LoraError naming the first missing, unknown or misshapen tensor of `have` against `want`."""
    missing = sorted(set(want) - set(have))
    unknown = sorted(set(have) - set(want))
    if missing:
        raise LoraError(f"LoRA weights lack {len(missing)} tensors the config implies, e.g. {missing[0]}")
    if unknown:
        raise LoraError(f"LoRA weights hold {len(unknown)} tensors this pipeline has no place for, e.g. {unknown[0]}")
    for k, shape in want.items():
        if tuple(have[k]) != tuple(shape):
            rank_note = ""
            if k.endswith("lora_A.weight") and tuple(have[k][1:]) == tuple(shape[1:]):
                rank_note = f" (rank {have[k][0]} in the file, rank {rank} in the config)"
            elif k.endswith("lora_B.weight") and tuple(have[k][:1]) == tuple(shape[:1]):
                rank_note = f" (rank {have[k][1]} in the file, rank {rank} in the config)"
            raise LoraError(f"LoRA tensor {k} has shape {list(have[k])}, expected {list(shape)}{rank_note}")


def check_name(name: str) -> None:
    if not _NAME.match(name or ""):
        raise LoraError(f"LoRA adapter name {name!r} must be letters, digits, '_' or '-' (peft names cannot hold dots)")


def names(pipe) -> list[str]:
    """Names of the LoRA adapters injected into the pipeline's UNet."""
    return list(getattr(pipe.unet, "peft_config", {}) or {})


def check_fits(pipe, adapter: LoraAdapter, name: str) -> None:
    """Raise LoraError unless `adapter` can be applied to `pipe` under `name`; touches nothing."""
    check_name(name)
    for c in COMPONENTS:
        if name in (getattr(getattr(pipe, c), "peft_config", {}) or {}):
            raise LoraError(f"a LoRA adapter named {name!r} is already on the {c}; "
                            "remove it first or pick another name")
    compare_shapes(expected_shapes(pipe, adapter.config), {k: tuple(v.shape) for k, v in adapter.tensors.items()},
                   adapter.config.rank)
    for k, v in adapter.tensors.items():
        if not v.is_floating_point() or not torch.isfinite(v).all():
            raise LoraError(f"LoRA tensor {k} is not a finite floating-point tensor")


# ---------------------------------------------------------------- create / apply / remove


def create(pipe, config: LoraAdapterConfig, generator: torch.Generator | None = None) -> LoraAdapter:
    """A fresh LoRA for `pipe` with peft's initialisation (A Kaiming-uniform, B zero: the update starts at 0)."""
    tensors = {}
    for k, shape in expected_shapes(pipe, config).items():
        t = torch.zeros(shape, device="cpu")  # an adapter in memory is a CPU float32 object until applied
        if k.endswith("lora_A.weight"):
            torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
        tensors[k] = t
    return LoraAdapter(config, tensors)


def _forget_layers(model) -> None:
    model.__dict__.pop("_cdm_lora_layers", None)  # lora_layers' memory of this model's LoRA layers


def _set_flag(model, loaded: bool) -> None:
    # diffusers' ModelMixin helpers (unet.set_adapters, disable_adapters) look at this flag; transformers'
    # twin would only lead to its peft>=0.22 check, so the text encoder's flag stays untouched
    if type(model).__module__.startswith("diffusers"):
        model._hf_peft_config_loaded = loaded


def apply(pipe, adapter: LoraAdapter, name: str) -> None:
    """Inject `adapter` as peft adapter `name` (UNet, and text encoder if configured); make it the active one.

    Its layers are made on the model's device and take the model's dtype (an fp16 UNet gets fp16 LoRA
    weights; training upcasts its own trainable tensors). Validates first; on any failure the pipeline is
    left as it was."""
    from peft.functional import inject_adapter_in_model, set_peft_model_state_dict

    check_fits(pipe, adapter, name)
    before = active(pipe)
    done = []
    try:
        for c in adapter.config.components():
            model = getattr(pipe, c)
            _forget_layers(model)
            with warnings.catch_warnings(), torch.device(model.device):
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                inject_adapter_in_model(adapter.config.peft_config(c), model, adapter_name=name)
            done.append(c)
            _set_flag(model, True)
            sd = adapter.component_state_dict(c)
            res = set_peft_model_state_dict(model, sd, adapter_name=name)
            if getattr(res, "unexpected_keys", None):
                raise LoraError(f"peft did not place LoRA tensors {res.unexpected_keys[:3]} on the {c}")
        set_active(pipe, [name])
    except BaseException:
        for c in done:
            _remove_from(getattr(pipe, c), name)
        set_active(pipe, before)
        raise


def set_active(pipe, active: list[str]) -> None:
    """Make exactly the adapters `active` participate in forward passes (frozen: inference mode)."""
    from peft.functional import set_adapter

    for c in COMPONENTS:
        model = getattr(pipe, c)
        if getattr(model, "peft_config", None):
            set_adapter(model, list(active), inference_mode=True)


def active(pipe) -> list[str]:
    """The LoRA adapters that take part in the UNet's forward passes."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in pipe.unet.modules():
        if isinstance(m, BaseTunerLayer):
            return list(m.active_adapters)
    return []


def trainable_parameters(pipe, name: str) -> list[torch.nn.Parameter]:
    """Turn on gradients for adapter `name` only and return its parameters (for the optimizer)."""
    params = []
    for c in COMPONENTS:
        model = getattr(pipe, c)
        for pname, p in model.named_parameters():
            own = ".lora_" in pname and f".{name}." in pname
            if own:
                p.requires_grad_(True)
                params.append(p)
    if not params:
        raise LoraError(f"no LoRA adapter named {name!r} on this pipeline (have: {names(pipe)})")
    return params


def read_back(pipe, name: str, config: LoraAdapterConfig | None = None) -> LoraAdapter:
    """The current weights of applied adapter `name` (e.g. after training) as a LoraAdapter."""
    from peft.functional import get_peft_model_state_dict

    if name not in names(pipe):
        raise LoraError(f"no LoRA adapter named {name!r} on this pipeline (have: {names(pipe)})")
    if config is None:
        pc = pipe.unet.peft_config[name]
        tpc = (getattr(pipe.text_encoder, "peft_config", {}) or {}).get(name)
        config = LoraAdapterConfig(rank=pc.r, alpha=float(pc.lora_alpha), dropout=pc.lora_dropout,
                                   unet_targets=tuple(sorted(pc.target_modules)), text_encoder=tpc is not None,
                                   text_targets=tuple(sorted(tpc.target_modules)) if tpc else TEXT_TARGETS)
    tensors = {}
    for c in config.components():
        sd = get_peft_model_state_dict(getattr(pipe, c), adapter_name=name)
        tensors.update({f"{c}.{k}": v.detach().to(torch.float32).cpu().clone() for k, v in sd.items()})
    return LoraAdapter(config, tensors)


def _remove_from(model, name: str) -> None:
    from peft.functional import delete_adapter

    cfgs = getattr(model, "peft_config", None)
    if not cfgs or name not in cfgs:
        return
    _forget_layers(model)
    with warnings.catch_warnings():
        # peft activates some other adapter when the active one goes; remove() sets the active set itself
        warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
        delete_adapter(model, adapter_name=name, prefix="lora_")
    cfgs.pop(name, None)
    if not cfgs:
        # last adapter gone: unwrap the peft layers so the model is the plain backbone again
        from diffusers.utils import recurse_remove_peft_layers

        recurse_remove_peft_layers(model)
        del model.peft_config
        _set_flag(model, False)


def remove(pipe, name: str) -> LoraAdapter:
    """Delete adapter `name` from the UNet and text encoder; return its weights.

    The other adapters keep their active/inactive state (none is switched on in its place; with
    no active adapter left the pipeline acts as the bare backbone). When the last adapter goes,
    the peft wrappers go too: module tree and state dict are the backbone's again."""
    adapter = read_back(pipe, name)
    still_active = [a for a in active(pipe) if a != name]
    for c in COMPONENTS:
        _remove_from(getattr(pipe, c), name)
    set_active(pipe, still_active)
    return adapter


# ---------------------------------------------------------------- peft's mixed-adapter batch

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


def _adapter_names_hook(module, args, kwargs, adapter_names):
    # the same pre-forward hook PeftModel._enable_peft_forward_hooks registers on every LoraLayer
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def lora_layers(model) -> list:
    """The peft LoRA layers of a model (empty when no LoRA is injected); remembered on the model until its
    set of peft adapters changes (every step of a composition asks)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return []
    key = tuple(sorted(getattr(model, "peft_config", None) or ()))
    cached = model.__dict__.get("_cdm_lora_layers")
    if cached is not None and cached[0] == key and key:
        return cached[1]
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    model.__dict__["_cdm_lora_layers"] = (key, layers)
    return layers


ROUTING = ("gather", "segments", "peft")


def _gather_stacks(m, adapters: tuple[str, ...]):
    """(A [K+1 x r x in], B [K+1 x out x r], scale [K+1]) of LoRA layer `m` for `adapters` (index 0: no
    adapter; an adapter this layer lacks: zeros), ranks zero-padded to the largest -- cached on the layer
    until a weight changes."""
    ws = {a: (m.lora_A[a].weight, m.lora_B[a].weight) for a in adapters if a in m.lora_A}
    key = (adapters, tuple((a, id(w), w._version, id(v), v._version) for a, (w, v) in ws.items()))
    cache = getattr(m, "_cdm_gather", None)
    if cache is not None and cache[0] == key:
        return cache[1]
    r = max(w.shape[0] for w, _ in ws.values())
    a0, b0 = next(iter(ws.values()))
    A = a0.new_zeros((len(adapters) + 1, r, a0.shape[1]))
    B = b0.new_zeros((len(adapters) + 1, b0.shape[0], r))
    for k, name in enumerate(adapters, start=1):
        if name in ws:
            a, b = ws[name]
            A[k, : a.shape[0]] = a.detach()
            B[k, :, : b.shape[1]] = b.detach()
    scale = torch.tensor([0.0] + [float(m.scaling[a]) if a in ws else 0.0 for a in adapters], dtype=A.dtype,
                         device=A.device)
    stacks = (A, B, scale)
    m._cdm_gather = (key, stacks)
    return stacks


def _runs(index: torch.Tensor) -> list[tuple[int, int, int]]:
    """index [R] -> its contiguous runs (start, end, adapter k)."""
    v = index.tolist()
    out, start = [], 0
    for r in range(1, len(v) + 1):
        if r == len(v) or v[r] != v[start]:
            out.append((start, r, v[start]))
            start = r
    return out


def _lora_delta(m, name: str, x: torch.Tensor) -> torch.Tensor:
    a, b = m.lora_A[name].weight, m.lora_B[name].weight
    return torch.nn.functional.linear(torch.nn.functional.linear(x.to(a.dtype), a), b) * m.scaling[name]


def _segmented(m, runs: list[tuple[int, int, str]], x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """`result` (the base layer's output) plus each contiguous run's slice through its own adapter's A and B:
    two matrix products per run, no gather, no masked copy, on the live weights (so gradients reach them)."""
    if not runs:
        return result
    if len(runs) == 1 and runs[0][:2] == (0, x.shape[0]):
        return result + _lora_delta(m, runs[0][2], x).to(result.dtype)
    parts, at = [], 0
    for s, e, name in runs:
        if s > at:
            parts.append(result[at:s])
        parts.append(result[s:e] + _lora_delta(m, name, x[s:e]).to(result.dtype))
        at = e
    if at < x.shape[0]:
        parts.append(result[at:])
    return torch.cat(parts)


def _routed_forward(m, index: torch.Tensor, index_runs: list[tuple[int, int, int]], adapters: tuple[str, ...],
                    method: str):
    """LoRA layer `m`'s forward with row k through adapter index[k] (0 = none).

    "gather": each row's A and B gathered, two batched matrix products for the whole batch (the Punica / S-LoRA
    idea) instead of peft's loop over adapters with masked copies; when every row takes one adapter (one run)
    or gradients must reach the LoRA weights (the gathered stacks are detached copies), the segmented
    computation instead. "segments": always the segmented computation (`_segmented`), a pair of matrix products
    per contiguous run of rows. Both equal peft's mixed batch for plain LoRA (tested to 1e-5). index_runs:
    `_runs(index)`, the same for every layer of one routing."""
    runs = [(s, e, adapters[k - 1]) for s, e, k in index_runs if k and adapters[k - 1] in m.lora_A]
    one_run = len(index_runs) == 1
    rows = index.shape[0]
    cached: dict = {}

    def forward(x, *args, **kwargs):
        result = m.base_layer(x, *args, **kwargs)
        if x.shape[0] != rows:
            raise LoraError(f"a routed batch has {x.shape[0]} rows but {rows} adapter names")
        if method == "segments" or one_run or not runs or (
                torch.is_grad_enabled() and any(m.lora_A[n].weight.requires_grad for _, _, n in runs)):
            return _segmented(m, runs, x, result)
        A, B, scale = _gather_stacks(m, adapters)
        if "idx" not in cached or cached["idx"].device != x.device:
            cached["idx"] = index.to(x.device)
        idx = cached["idx"]
        flat = x.to(A.dtype).reshape(x.shape[0], -1, x.shape[-1])             # [R x L x in]
        h = torch.bmm(flat, A[idx].transpose(1, 2))                          # [R x L x r]
        d = torch.bmm(h, B[idx].transpose(1, 2)) * scale[idx].view(-1, 1, 1)  # [R x L x out]
        return result + d.reshape(*result.shape).to(result.dtype)

    return forward


@contextmanager
def route_rows(model, adapter_names: Sequence[str], error: type[Exception] = None, method: str = "gather"):
    """Inside the block, row k of every forward batch goes through LoRA adapter adapter_names[k]
    ("__base__" = none) in every peft LoRA layer of `model`. diffusers has no public switch for this
    (`cross_attention_kwargs` does not route adapters).

    method "gather" (default): each Linear LoRA layer gathers its rows' A and B and runs two batched matrix
    products (`_routed_forward`; one adapter for all rows, or gradients on the LoRA weights: a matrix product
    pair per contiguous run instead). "segments": a matrix product pair per contiguous run of rows always (on
    the CPU bench it beats the gather only when all rows take one adapter, docs/benchmarks.md). Layers these do
    not cover (convolutions, DoRA and other peft variants, dropout in training mode) take peft's path. "peft":
    peft's mixed-batch forward (`LoraLayer._mixed_batch_forward`, a loop over adapters with masked copies)
    everywhere. All equal peft's mixed batch for plain LoRA (tests/compose/test_scale.py).

    Independent of peft's active-adapter state: an adapter not named for a row never touches it.
    Every batch the model's layers see inside the block must have len(adapter_names) rows. Raises
    `error` (default LoraError) for unknown names, merged or disabled adapters."""
    error = error or LoraError
    names = list(adapter_names)
    layers = lora_layers(model)
    wanted = {n for n in names if n != BASE}
    if not layers:
        if wanted:
            raise error(f"no LoRA layers on {type(model).__name__}, but rows ask for {sorted(wanted)}")
        yield
        return
    known = set().union(*(set(m.lora_A.keys()) for m in layers))
    if wanted - known:
        raise error(f"no LoRA adapter named {sorted(wanted - known)} on {type(model).__name__} "
                           f"(have: {sorted(known)})")
    if any(m.merged for m in layers):
        raise error("a LoRA adapter is merged into the weights; unmerge it before composing "
                           "(rows cannot be routed through merged weights)")
    if any(m.disable_adapters for m in layers):
        raise error("the LoRA adapters are disabled on this model (disable_adapters); "
                           "enable them before composing")
    if method not in ROUTING:
        raise error(f"unknown LoRA routing {method!r}; valid: {', '.join(ROUTING)}")
    from functools import partial

    from peft.tuners.lora import Linear as LoraLinear

    adapters = tuple(sorted(wanted))
    position = {a: k for k, a in enumerate(adapters, start=1)}
    index = torch.tensor([position.get(n, 0) for n in names], dtype=torch.long, device="cpu")
    index_runs = _runs(index)
    hook = partial(_adapter_names_hook, adapter_names=names)
    handles, patched = [], []
    try:
        for m in layers:
            present = [a for a in adapters if a in m.lora_A]
            plain = (method != "peft" and type(m) is LoraLinear and present
                     and not any(a in m.lora_variant for a in present)  # DoRA & co: peft's own forward
                     and (not m.training or all(isinstance(m.lora_dropout[a], torch.nn.Identity) for a in present)))
            if plain:
                m.forward = _routed_forward(m, index, index_runs, adapters, method)
                patched.append(m)
            else:
                handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
        for m in patched:
            del m.forward  # back to the class's forward
