"""Deep prompts: m learned tokens in every cross-attention layer of the frozen UNet, per source.

Prompt tuning inside the network rather than only at its input: prefix tuning (Li & Liang 2021),
VPT-deep (Jia et al. 2022), À-la-carte prompt tuning (Bowman et al. 2023: one prompt per data source on a
frozen transformer, any subset composed at inference), P+ / NeTI (Voynov et al. 2023, Alaluf et al. 2023:
per-cross-attention-layer and per-timestep conditioning of a text-to-image UNet).

Each cross-attention layer l (diffusers' `...attn2`) with context C [B x L x D_ctx] gets extra keys and values:
    mode "context": tokens P_l [b x m x D_ctx] appended to C, so they pass through the frozen projections:
                    K = [W_k C ; W_k P_l[bucket(t)]],  V = [W_v C ; W_v P_l[bucket(t)]]
    mode "kv":      learned key / value prefixes K_l, V_l [b x m x inner] appended after the projections
                    (prefix tuning): K = [W_k C ; K_l[bucket(t)]], V = [W_v C ; V_l[bucket(t)]]
b timestep buckets split [0, num_train_timesteps) evenly; bucket(t) = floor(t b / T) (b = 1: one prompt for
every t). Nothing of the backbone trains; the queries and the output projection are the frozen ones.

On a pipeline the prompts live in a `DeepPromptBank` that `DeepPromptAttnProcessor` (one per cross-attention
layer) reads; a forward pre-hook on the UNet records the call's timestep for the buckets. Rows of a batch
are routed per source by `route_rows` (the composed denoiser's one pass: a deep-prompt row carries its
source's tokens, every other row none); outside routing every row gets the active prompt (`bank.default`, the
last applied: training, plain text-to-image, and plain diffusers after `install`).

Weights (adapter_model.safetensors): `deep_prompt.<layer>.tokens` [b x m x D_ctx] (mode context) or
`deep_prompt.<layer>.key` / `.value` [b x m x inner] (mode kv), <layer> the attention module's path in the
UNet. For plain diffusers:

    from diffusers import StableDiffusionPipeline
    from prompt_cdm.adapters.deep_prompt import install
    pipe = StableDiffusionPipeline.from_pretrained(BACKBONE); install(pipe.unet, "adapters/stars")

gives the image `prompt-cdm generate --adapter adapters/stars` gives (its unconditional row is the source's
prompts on the empty caption, as diffusers runs every row through the processor: `--uncond per-source`, the
default for one source).

Imports only torch at module level (diffusers' Attention is only duck-typed).
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import AdapterError

PREFIX = "deep_prompt."
MODES = ("context", "kv")
BASE = "__base__"  # a row with no deep prompt (the same name as lora.BASE)
# the recipe's bounds: 64 tokens per layer is 10x what the recipes use; 16 buckets of 1000 steps are 62 steps
# each, finer than the sampler's 25-50 steps can tell apart
MAX_TOKENS = 64
MAX_BUCKETS = 16
_SUFFIX = {"context": ("tokens",), "kv": ("key", "value")}


class DeepPromptError(AdapterError):
    """A deep prompt does not fit the pipeline (or its name is taken); the message says the fix."""


@dataclass
class DeepPromptConfig:
    """Hyper-parameters of one deep prompt (they go to adapter_config.json under `params`)."""

    # 16 tokens per layer (the recipe default, chosen on a validation domain): beside CLIP's 77 context tokens,
    # ~17% of each layer's attention keys
    num_tokens: int = field(default=16, metadata={"help": "learned tokens per cross-attention layer (m)"})
    mode: str = field(default="kv", metadata={
        "help": "kv: learned key/value prefixes; context: tokens appended to the text context (through W_k, W_v)"})
    timestep_buckets: int = field(default=1, metadata={"help": "prompts per timestep range (1 = one for all t)"})
    num_train_timesteps: int = field(default=1000, metadata={"help": "the backbone's training timesteps T"})

    def __post_init__(self):
        if not 1 <= self.num_tokens <= MAX_TOKENS:
            raise ValueError(f"deep prompt num_tokens must be in 1..{MAX_TOKENS}, got {self.num_tokens}")
        if self.mode not in MODES:
            raise ValueError(f"deep prompt mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 1 <= self.timestep_buckets <= MAX_BUCKETS:
            raise ValueError(f"deep prompt timestep_buckets must be in 1..{MAX_BUCKETS}, got {self.timestep_buckets}")
        if self.num_train_timesteps < self.timestep_buckets:
            raise ValueError(f"deep prompt num_train_timesteps must be >= timestep_buckets, got "
                             f"{self.num_train_timesteps}")


@dataclass
class DeepPrompt:
    """A deep prompt's data: its config and tensors {key: [b x m x width]} (keys as in the file). Not tied to
    a pipeline."""

    config: DeepPromptConfig
    tensors: dict[str, torch.Tensor]

    def __post_init__(self):
        c = self.config
        for k, v in self.tensors.items():
            if not k.startswith(PREFIX) or k.rsplit(".", 1)[-1] not in _SUFFIX[c.mode]:
                raise DeepPromptError(f"deep prompt tensor {k!r} is not a {c.mode}-mode key "
                                      f"({PREFIX}<layer>.{'|'.join(_SUFFIX[c.mode])}); re-save the adapter")
            if v.ndim != 3:
                raise DeepPromptError(f"deep prompt tensor {k} is {list(v.shape)}, expected [timestep_buckets x "
                                      "num_tokens x width]; re-save the adapter")
            if v.shape[0] != c.timestep_buckets:
                raise DeepPromptError(f"deep prompt tensor {k} holds {v.shape[0]} timestep buckets, the config says "
                                      f"timestep_buckets = {c.timestep_buckets}; fix adapter_config.json or re-save "
                                      "the adapter")
            if v.shape[1] != c.num_tokens:
                raise DeepPromptError(f"deep prompt tensor {k} holds {v.shape[1]} tokens, the config says num_tokens = "
                                      f"{c.num_tokens}; fix adapter_config.json or re-save the adapter")

    def layers(self) -> dict[str, dict[str, torch.Tensor]]:
        """{layer path: {"tokens"} | {"key", "value"}: [b x m x width]}."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in self.tensors.items():
            layer, part = k[len(PREFIX):].rsplit(".", 1)
            out.setdefault(layer, {})[part] = v
        return out

    def num_parameters(self) -> int:
        return sum(v.numel() for v in self.tensors.values())


# ---------------------------------------------------------------- the UNet's layers


def _base(linear):
    """The frozen Linear under a peft LoRA wrapper (the prompts always go through the frozen projection)."""
    return getattr(linear, "base_layer", linear)


def cross_attention_layers(unet) -> dict[str, object]:
    """{module path: Attention} of the UNet's cross-attention layers (diffusers names them `attn2`, as its
    IP-Adapter loader assumes)."""
    out = {}
    for name in unet.attn_processors:
        path = name[: -len(".processor")]
        if path.endswith("attn2"):
            out[path] = unet.get_submodule(path)
    return out


def layer_widths(unet) -> dict[str, tuple[int, int]]:
    """{layer: (context width D_ctx, key/value width inner)} of the frozen projections."""
    return {p: (_base(a.to_k).in_features, _base(a.to_k).out_features) for p, a in cross_attention_layers(unet).items()}


def widths_from_table(table: dict) -> dict[str, tuple[int, int]]:
    """`layer_widths` from a registry's backbone table (`kinds.backbone_table`): no pipeline needed."""
    return {n[: -len(".to_k")]: (io[0], io[1]) for n, io in table.get("unet", {}).items() if n.endswith("attn2.to_k")}


def expected_shapes(widths: dict[str, tuple[int, int]], config: DeepPromptConfig) -> dict[str, tuple[int, ...]]:
    b, m = config.timestep_buckets, config.num_tokens
    out = {}
    for layer, (ctx, inner) in widths.items():
        width = ctx if config.mode == "context" else inner
        for part in _SUFFIX[config.mode]:
            out[f"{PREFIX}{layer}.{part}"] = (b, m, width)
    return out


def compare_shapes(want: dict[str, tuple[int, ...]], have: dict[str, Sequence[int]]) -> None:
    """DeepPromptError naming the first missing, unknown or misshapen tensor."""
    missing, unknown = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or unknown:
        raise DeepPromptError(
            f"the deep prompt's layers do not match this UNet's cross-attention layers "
            f"({'missing ' + missing[0] if missing else 'no such layer: ' + unknown[0]}; the file has {len(have)} "
            f"tensors, this UNet needs {len(want)}): it was trained for another UNet -- retrain it on this backbone")
    for k, shape in want.items():
        if tuple(have[k]) != tuple(shape):
            raise DeepPromptError(f"deep prompt tensor {k} is {list(have[k])}, this UNet's layer needs {list(shape)} "
                                  "[timestep_buckets x num_tokens x width]: it was trained for another UNet or its "
                                  "config does not match the file")


# ---------------------------------------------------------------- creating


@torch.no_grad()
def create(pipe, config: DeepPromptConfig, generator: torch.Generator | None = None) -> DeepPrompt:
    """A fresh deep prompt for `pipe`'s UNet (the pipeline is not changed).

    Every layer's m tokens start as the frozen text encoder's states of the empty caption at positions 1..m
    (in-distribution context tokens: EOS and padding, which differ by position), plus 1% noise that breaks
    their symmetry; mode "kv" starts from those tokens' frozen keys and values, so both modes start as the
    same function."""
    tok = pipe.tokenizer
    ids = tok([""], padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    ids = torch.tensor(ids, dtype=torch.long, device=pipe.text_encoder.device)
    states = pipe.text_encoder(ids)[0][0].to(torch.float32).cpu()                       # [L x D_ctx]
    m, b = config.num_tokens, config.timestep_buckets
    pos = torch.arange(1, m + 1, device="cpu") % states.shape[0]
    base = states[pos]                                                                   # [m x D_ctx]
    std = float(states.std())
    tensors = {}
    for layer, attn in cross_attention_layers(pipe.unet).items():
        tokens = base + 0.01 * std * torch.randn(base.shape, generator=generator, device="cpu")
        if config.mode == "context":
            tensors[f"{PREFIX}{layer}.tokens"] = tokens.expand(b, -1, -1).clone()
        else:
            for part, proj in (("key", attn.to_k), ("value", attn.to_v)):
                w = _base(proj)
                out = F.linear(tokens.to(w.weight.device, w.weight.dtype), w.weight, w.bias).float().cpu()
                tensors[f"{PREFIX}{layer}.{part}"] = out.expand(b, -1, -1).clone()
    if not tensors:
        raise DeepPromptError("this UNet has no cross-attention layers (attn2); deep prompts need them")
    return DeepPrompt(config, tensors)


# ---------------------------------------------------------------- the bank and its processor


class DeepPromptBank:
    """The deep prompts applied to one UNet, by name, and how the current forward's rows are routed.

    rows: per-row names (BASE = none) while `route_rows` is active; default: the active prompt, which every row
    gets outside routing (the last applied; None = none); t: the timestep of the UNet call in progress (recorded by a forward pre-hook)."""

    def __init__(self):
        self.prompts: dict[str, tuple[DeepPromptConfig, dict[str, dict[str, torch.Tensor]]]] = {}
        self.rows: list[str] | None = None
        self.default: str | None = None
        self.t = None
        self.originals: dict[str, object] = {}
        self.hook = None

    def owners(self, batch: int) -> list[str] | None:
        if self.rows is not None:
            if len(self.rows) != batch:
                raise DeepPromptError(f"deep-prompt routing names {len(self.rows)} rows, the UNet got {batch}")
            return self.rows
        if self.default is not None:
            return [self.default] * batch
        return None

    def buckets(self, config: DeepPromptConfig, batch: int, device) -> torch.Tensor:
        """[batch] bucket index of each row from the recorded timestep."""
        if config.timestep_buckets == 1:
            return torch.zeros(batch, dtype=torch.long, device=device)
        if self.t is None:
            raise DeepPromptError("a timestep-bucketed deep prompt needs the UNet's timestep; install it with "
                                  "deep_prompt.install (its pre-hook records it)")
        t = torch.as_tensor(self.t, device=device).flatten().float()
        t = t.expand(batch) if t.numel() == 1 else t
        if t.numel() != batch:
            raise DeepPromptError(f"the UNet got {t.numel()} timesteps for {batch} rows")
        b = config.timestep_buckets
        return (t * b / config.num_train_timesteps).long().clamp(0, b - 1)


class DeepPromptAttnProcessor:
    """diffusers' AttnProcessor2_0 for one cross-attention layer, plus the deep prompt of each row's source.

    Rows without a prompt compute exactly AttnProcessor2_0's attention; rows of a source attend over
    [context ; that source's m tokens] (its `layer` entry in the bank), grouped by source. The queries, keys and
    values of the context are computed on the whole batch (so peft's per-row LoRA routing sees every row)."""

    def __init__(self, layer: str, bank: DeepPromptBank):
        self.layer, self.bank = layer, bank

    def _extra(self, attn, name: str, rows: torch.Tensor, bucket: torch.Tensor, dtype):
        """(keys, values) [r x m x inner] of source `name` for the rows `rows`."""
        config, layers = self.bank.prompts[name]
        parts = layers[self.layer]
        idx = bucket[rows]
        if config.mode == "context":
            tokens = parts["tokens"].to(dtype)[idx]                                    # [r x m x D_ctx]
            if attn.norm_cross:
                tokens = attn.norm_encoder_hidden_states(tokens)
            wk, wv = _base(attn.to_k), _base(attn.to_v)
            return (F.linear(tokens, wk.weight.to(dtype), None if wk.bias is None else wk.bias.to(dtype)),
                    F.linear(tokens, wv.weight.to(dtype), None if wv.bias is None else wv.bias.to(dtype)))
        return parts["key"].to(dtype)[idx], parts["value"].to(dtype)[idx]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        def heads(x):  # [r x n x inner] -> [r x heads x n x head_dim]
            return x.view(x.shape[0], -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)

        owners = self.bank.owners(batch_size)
        if owners is None or all(o == BASE for o in owners):
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                 is_causal=False)
        else:
            out = query.new_empty(query.shape[0], attn.heads, query.shape[2], head_dim)
            device = query.device
            groups: dict[str, list[int]] = {}
            for r, o in enumerate(owners):
                groups.setdefault(o, []).append(r)
            for name, rows_list in groups.items():
                rows = torch.tensor(rows_list, dtype=torch.long, device=device)
                whole = len(rows_list) == batch_size
                q, k, v = (query, key, value) if whole else (query[rows], key[rows], value[rows])
                mask = None if attention_mask is None else (attention_mask if whole else attention_mask[rows])
                if name != BASE:
                    config = self.bank.prompts[name][0]
                    bucket = self.bank.buckets(config, batch_size, device)
                    ek, ev = self._extra(attn, name, rows, bucket, q.dtype)
                    k, v = torch.cat([k, heads(ek)], dim=2), torch.cat([v, heads(ev)], dim=2)
                    if mask is not None:
                        mask = F.pad(mask, (0, ek.shape[1]))
                if attn.norm_k is not None:
                    k = attn.norm_k(k)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
                if whole:
                    out = o
                else:
                    out = out.index_copy(0, rows, o.to(out.dtype))
        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


# ---------------------------------------------------------------- pipeline state


def bank(unet) -> DeepPromptBank | None:
    """The UNet's deep-prompt bank (None: no deep prompt applied)."""
    return getattr(unet, "_cdm_deep_prompts", None)


def names(pipe) -> list[str]:
    b = bank(pipe.unet)
    return list(b.prompts) if b is not None else []


def _timestep_hook(module, args, kwargs):
    b = bank(module)
    if b is not None:
        b.t = kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)


def _install_bank(unet) -> DeepPromptBank:
    b = bank(unet)
    if b is not None:
        return b
    layers = cross_attention_layers(unet)
    if not layers:
        raise DeepPromptError("this UNet has no cross-attention layers (attn2); deep prompts need them")
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    procs = unet.attn_processors
    custom = [n for n in procs if n[: -len(".processor")] in layers
              and not isinstance(procs[n], (AttnProcessor, AttnProcessor2_0))]
    if custom:
        raise DeepPromptError(f"{custom[0]} is a {type(procs[custom[0]]).__name__}, not diffusers' default attention "
                              "processor; deep prompts replace the default one (unet.set_default_attn_processor() "
                              "first, or remove the other adapter)")
    b = DeepPromptBank()
    b.originals = {f"{p}.processor": procs[f"{p}.processor"] for p in layers}
    for path, attn in layers.items():
        attn.set_processor(DeepPromptAttnProcessor(path, b))
    b.hook = unet.register_forward_pre_hook(_timestep_hook, with_kwargs=True)
    unet._cdm_deep_prompts = b
    return b


def _uninstall_bank(unet) -> None:
    b = bank(unet)
    if b is None:
        return
    for name, proc in b.originals.items():
        unet.get_submodule(name[: -len(".processor")]).set_processor(proc)
    b.hook.remove()
    del unet._cdm_deep_prompts


def check_name(name: str) -> None:
    if not name or name == BASE or any(c in name for c in " ."):
        raise DeepPromptError(f"deep prompt name {name!r} must be non-empty, without spaces or dots")


def check_fits(pipe, dp: DeepPrompt, name: str) -> None:
    """Raise DeepPromptError if `dp` cannot be applied to `pipe` under `name`; touches nothing."""
    check_name(name)
    if name in names(pipe):
        raise DeepPromptError(f"the pipeline already has a deep prompt named {name!r}; remove it first or load "
                              "under another name")
    compare_shapes(expected_shapes(layer_widths(pipe.unet), dp.config),
                   {k: tuple(v.shape) for k, v in dp.tensors.items()})
    bad = [k for k, v in dp.tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise DeepPromptError(f"deep prompt tensor {bad[0]} holds NaN or infinite values")


def apply(pipe, dp: DeepPrompt, name: str) -> None:
    """Put `dp` in the UNet's bank under `name` (installing the processors on first use) and make it the active
    one: outside routing every row of every UNet call gets it (as `lora.apply` makes a LoRA the active adapter;
    the composed denoiser's routing overrides it row by row). The tensors are kept as given if they are
    Parameters (training), else copied to the UNet's device in float32."""
    check_fits(pipe, dp, name)
    unet = pipe.unet
    b = _install_bank(unet)
    dev = unet.device
    layers = {layer: {p: (v if isinstance(v, torch.nn.Parameter) else v.detach().to(dev, torch.float32))
                      for p, v in parts.items()} for layer, parts in dp.layers().items()}
    b.prompts[name] = (dp.config, layers)
    b.default = name


def read_back(pipe, name: str, config: DeepPromptConfig | None = None) -> DeepPrompt:
    """The applied deep prompt's current tensors (after training) as a DeepPrompt."""
    b = bank(pipe.unet)
    if b is None or name not in b.prompts:
        raise DeepPromptError(f"no deep prompt named {name!r} on this pipeline (have: {names(pipe)})")
    cfg, layers = b.prompts[name]
    tensors = {f"{PREFIX}{layer}.{p}": v.detach().to(torch.float32).cpu().clone()
               for layer, parts in layers.items() for p, v in parts.items()}
    return DeepPrompt(config or cfg, tensors)


def remove(pipe, name: str) -> DeepPrompt:
    """Take a deep prompt off the pipeline; the last one out restores the original processors exactly."""
    dp = read_back(pipe, name)
    b = bank(pipe.unet)
    del b.prompts[name]
    if b.default == name:
        b.default = None
    if not b.prompts:
        _uninstall_bank(pipe.unet)
    return dp


def parameters(pipe, name: str) -> dict[str, torch.Tensor]:
    """{file key: tensor} of an applied deep prompt, as they live in the bank (trainable when applied as
    Parameters)."""
    cfg, layers = bank(pipe.unet).prompts[name]
    return {f"{PREFIX}{layer}.{p}": v for layer, parts in layers.items() for p, v in parts.items()}


@contextmanager
def route_rows(unet, row_names: Sequence[str], error: type[Exception] | None = None):
    """Inside the block, row k of every UNet batch gets deep prompt row_names[k] (BASE = none) in every
    cross-attention layer; the bank's default is off. Every batch must have len(row_names) rows."""
    error = error or DeepPromptError
    b = bank(unet)
    wanted = {n for n in row_names if n != BASE}
    if b is None:
        if wanted:
            raise error(f"no deep prompts on this UNet, but rows ask for {sorted(wanted)}")
        yield
        return
    unknown = wanted - set(b.prompts)
    if unknown:
        raise error(f"no deep prompt named {sorted(unknown)} on this UNet (have: {sorted(b.prompts)})")
    before = b.rows
    b.rows = list(row_names)
    try:
        yield
    finally:
        b.rows = before


# ---------------------------------------------------------------- plain diffusers


def install(unet, folder: str | Path, name: str | None = None) -> str:
    """Give every row of every call of a plain diffusers UNet the deep prompt in adapter folder `folder`
    (`StableDiffusionPipeline` + this line = `prompt-cdm generate` with that one adapter). Reads safetensors
    only; the tensors' layers and widths are checked against the UNet. Returns the prompt's name."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    if cfg.get("kind") != "deep-prompt":
        raise DeepPromptError(f"{folder} holds a {cfg.get('kind')!r} adapter, not a deep prompt")
    dp = DeepPrompt(DeepPromptConfig(**cfg["params"]), load_file(str(folder / "adapter_model.safetensors")))

    class _Pipe:  # apply() needs only .unet
        pass

    holder = _Pipe()
    holder.unet = unet
    name = name or cfg["source_id"]
    apply(holder, dp, name)
    return name
