"""Adapter kinds behind one interface, registered by name (STYLE.md habit 6: registries, not if-chains).

An adapter kind says everything the rest of the package needs to know about it:
    params / data        its hyper-parameter dataclass and its in-memory weights class
    create / apply / remove / read_back   on a pipeline (lora.py, soft_prompt.py do the work)
    state / from_state   the tensors of adapter_model.safetensors and back
    export               the diffusers-loadable copy beside them (diffusers' own file format)
    check_weights        the pipeline-free key / shape check of the validator (validate.py)
    row_prompt / unet_adapter / text_adapter   what one row of the composed batch carries
    route                the context that routes one UNet pass's rows to this kind's adapters (LoRA layers,
                         deep-prompt attention processors; None for a kind that only changes the text)
    trigger              the word a prompt must carry (a soft prompt's placeholder; unique in a registry)
    train_section / start_training            its TrainConfig section and the training hooks (`Training`)
    title / hub_tag / diffusers_file / card_usage   how its model card and file list name and use it
Adding a kind is one module with its mechanics plus one entry in KINDS (and its hyper-parameter section
in training.train.TrainConfig).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import deep_prompt, lora, soft_prompt
from .deep_prompt import DeepPrompt, DeepPromptConfig
from .errors import AdapterError
from .lora import BASE, LoraAdapter, LoraAdapterConfig
from .soft_prompt import SoftPrompt, SoftPromptConfig

SOFT_PROMPT_KEY = "soft_prompt.embeds"
LORA_DIFFUSERS_NAME = "pytorch_lora_weights.safetensors"
SOFT_PROMPT_DIFFUSERS_NAME = "learned_embeds.safetensors"
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_LORA_KEY = re.compile(r"^(?P<component>unet|text_encoder)\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


@dataclass(eq=False)
class Training:
    """A fresh adapter applied to a pipeline for training: what the training loop needs of its kind.

    params: the trainable tensors by checkpoint key (nothing else of the pipeline may train). prompt:
    caption -> the conditional prompt. uncond: the prompt of a dropped caption. caches_text: the text
    encoder is frozen for this adapter, so caption hidden states can be cached. dropout_modules: the
    modules whose train() mode matters (adapter dropout). `close()` takes the adapter and its hooks off
    the pipeline again (idempotent)."""

    name: str
    params: dict[str, torch.nn.Parameter]
    prompt: Callable[[str], str]
    uncond: str
    caches_text: bool
    weight_decay: float
    read_back: Callable[[], object]
    _remove: Callable[[], None] = field(repr=False)
    dropout_modules: tuple = ()
    closed: bool = field(default=False, init=False)

    def train_mode(self, on: bool) -> None:
        for m in self.dropout_modules:
            m.train(on)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.train_mode(False)
            self._remove()


class AdapterKind:
    """The interface; see the module docstring."""

    name: str
    params: type
    data: type
    title: str
    hub_tag: str
    diffusers_file: str
    diffusers_note: str

    module: object  # the module with the kind's mechanics on a pipeline (create, apply, remove, read_back)
    train_section: str  # the field of training.train.TrainConfig that holds this kind's hyper-parameters

    def create(self, pipe, params, generator: torch.Generator | None = None):
        return self.module.create(pipe, params, generator)

    def apply(self, pipe, params, tensors: dict[str, torch.Tensor], name: str) -> str:
        """Check the weights fit `pipe`, apply them; return the handle (LoRA name / placeholder)."""
        raise NotImplementedError

    def remove(self, pipe, handle: str):
        return self.module.remove(pipe, handle)

    def state(self, adapter) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def export(self, folder: Path, adapter) -> None:
        raise NotImplementedError

    def check_weights(self, params, weights: dict, others: dict, label: str) -> None:
        """`weights`: {key: (dtype, shape)} of adapter_model.safetensors; `others`: the folder's other
        safetensors files' headers by name."""
        raise NotImplementedError

    def check_backbone(self, params, weights: dict, backbone: dict, label: str) -> None:
        """`weights` ({key: (dtype, shape)}) against the backbone's `backbone_table` (no pipeline needed)."""
        raise NotImplementedError

    def row_prompt(self, handle: str, caption: str) -> str:
        return caption

    def unet_adapter(self, handle: str) -> str:
        return BASE

    def text_adapter(self, handle: str, params: dict) -> str:
        return BASE

    def route(self, unet, row_handles: list[str], error: type[Exception]):
        """A context manager under which row k of the UNet's batch goes through this kind's adapter
        row_handles[k] (BASE = none of this kind), or None when nothing of this kind is on the UNet."""
        return None

    def trigger(self, params: dict) -> str | None:
        """The word a prompt must carry to use the adapter (None: it applies to every caption)."""
        return None

    def card_usage(self, params: dict, example: str, folder_name: str) -> dict[str, str]:
        """The model card's usage lines: ours_prompt, diffusers_load, diffusers_prompt, detail."""
        raise NotImplementedError

    def start_training(self, pipe, section, source_id: str, generator: torch.Generator) -> Training:
        """Apply a fresh adapter (hyper-parameters: the TrainConfig `section`) to `pipe` for training.
        On a refusal nothing stays applied."""
        raise NotImplementedError

    def caches_text(self, section) -> bool:
        """Whether training with these hyper-parameters leaves the text encoder's outputs fixed."""
        return False


class LoraKind(AdapterKind):
    name, params, data, module = "lora", LoraAdapterConfig, LoraAdapter, lora
    title, hub_tag, diffusers_file = "LoRA", "lora", LORA_DIFFUSERS_NAME
    diffusers_note = "the same weights for `load_lora_weights`"
    train_section = "lora"

    def start_training(self, pipe, section, source_id, generator):
        config = section.adapter_config()
        lora.check_name(source_id)
        if source_id in lora.names(pipe):
            raise AdapterError(f"the pipeline already has a LoRA named {source_id!r}; train on the bare backbone")
        lora.apply(pipe, lora.create(pipe, config, generator=generator), source_id)
        try:
            trainable = {id(p) for p in lora.trainable_parameters(pipe, source_id)}
        except BaseException:
            lora.remove(pipe, source_id)
            raise
        params = {f"{c}.{n}".replace(".", "__"): p for c in ("unet", "text_encoder")
                  for n, p in getattr(pipe, c).named_parameters() if id(p) in trainable}
        for p in params.values():  # trainable tensors in float32 on a half-precision backbone (peft casts x)
            if p.dtype != torch.float32:
                p.data = p.data.float()
        # only LoRA dropout reacts to train mode (SD's UNet and CLIP have no dropout at their defaults)
        dropout = (pipe.unet, pipe.text_encoder) if config.text_encoder else (pipe.unet,)
        return Training(source_id, params, lambda caption: caption, "", self.caches_text(section),
                        section.weight_decay, lambda: lora.read_back(pipe, source_id, config),
                        lambda: lora.remove(pipe, source_id), dropout)

    def caches_text(self, section):
        return not section.text_encoder

    def card_usage(self, params, example, folder_name):
        te = ", and the text encoder's " + ", ".join(params["text_targets"]) if params["text_encoder"] else ""
        return {"ours_prompt": f'"{example}"', "diffusers_load": f'pipe.load_lora_weights("{folder_name}")',
                "diffusers_prompt": f'"{example}"',
                "detail": f"rank {params['rank']}, alpha {params['alpha']} on the UNet's "
                          f"{', '.join(params['unet_targets'])}{te}."}

    def apply(self, pipe, params, tensors, name):
        adapter = LoraAdapter(params, tensors)
        lora.check_fits(pipe, adapter, name)
        lora.apply(pipe, adapter, name)
        return name

    def state(self, adapter):
        return {k: v.detach().to(torch.float32).cpu() for k, v in adapter.tensors.items()}

    def export(self, folder, adapter):
        from diffusers import StableDiffusionPipeline

        from ..util.io import atomic_path

        sds, meta = adapter.diffusers_state_dicts(), adapter.diffusers_metadata()
        with atomic_path(folder / LORA_DIFFUSERS_NAME) as tmp:
            # diffusers' own writer, so keys and the rank/alpha metadata are exactly what load_lora_weights reads
            StableDiffusionPipeline.save_lora_weights(
                save_directory=str(tmp.parent), weight_name=tmp.name, safe_serialization=True,
                unet_lora_layers=sds["unet"], text_encoder_lora_layers=sds.get("text_encoder"),
                unet_lora_adapter_metadata=meta["unet"], text_encoder_lora_adapter_metadata=meta.get("text_encoder"),
            )

    def check_weights(self, params, weights, others, label):
        pairs: dict[tuple[str, str], dict[str, list[int]]] = {}
        for key, (dtype, shape) in weights.items():
            m = _LORA_KEY.match(key)
            if m is None or m["component"] not in params.components():
                raise AdapterError(f"{label}: tensor {key!r} is not a LoRA key of this config "
                                   f"(<{'|'.join(params.components())}>.<module>.lora_A|B.weight); re-save the adapter")
            targets = params.unet_targets if m["component"] == "unet" else params.text_targets
            if not any(m["module"] == t or m["module"].endswith("." + t) for t in targets):
                raise AdapterError(f"{label}: tensor {key!r} adapts a module outside the config's targets "
                                   f"{list(targets)}; re-save the adapter")
            if len(shape) != 2 or dtype not in _FLOAT_DTYPES:
                raise AdapterError(f"{label}: tensor {key!r} is {dtype} {shape}, expected a floating-point matrix; "
                                   "re-save it")
            pairs.setdefault((m["component"], m["module"]), {})[m["ab"]] = shape
        for (component, module), ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                raise AdapterError(f"{label}: {component}.{module} has lora_{''.join(ab)} but not its partner; "
                                   "re-save it")
            if ab["A"][0] != params.rank or ab["B"][1] != params.rank:
                raise AdapterError(f"{label}: {component}.{module} has rank {ab['A'][0]}/{ab['B'][1]} "
                                   f"(lora_A/lora_B), the config says rank {params.rank}; re-save the adapter")
        for component in params.components():
            if not any(c == component for c, _ in pairs):
                raise AdapterError(f"{label}: no {component} LoRA tensors, but the config adapts the {component}; "
                                   "re-save it")

    def check_backbone(self, params, weights, backbone, label):
        try:
            lora.compare_shapes(lora.shapes_from_table(backbone, params), {k: v[1] for k, v in weights.items()},
                                params.rank)
        except AdapterError as e:
            raise AdapterError(f"{label}: {e} (on backbone {backbone.get('name', 'of this registry')}); retrain "
                               "the adapter on this backbone") from None

    def unet_adapter(self, handle):
        return handle

    def text_adapter(self, handle, params):
        return handle if params.get("text_encoder", False) else BASE

    def route(self, unet, row_handles, error):
        if any(h != BASE for h in row_handles) or lora.lora_layers(unet):
            return lora.route_rows(unet, row_handles, error=error)
        return None


class SoftPromptKind(AdapterKind):
    name, params, data, module = "soft-prompt", SoftPromptConfig, SoftPrompt, soft_prompt
    title, hub_tag, diffusers_file = "soft prompt", "textual_inversion", SOFT_PROMPT_DIFFUSERS_NAME
    diffusers_note = "the same rows for `load_textual_inversion`"
    train_section = "soft_prompt"

    def start_training(self, pipe, section, source_id, generator):
        config = section.adapter_config(source_id)
        name = config.placeholder
        sp = soft_prompt.create(pipe, config, generator=generator)
        te = pipe.text_encoder
        dtype = te.dtype
        te.to(torch.float32)  # the trained rows live in the embedding matrix: the encoder trains in float32
        try:
            soft_prompt.apply(pipe, sp)
        except BaseException:
            te.to(dtype)
            raise
        weight = te.get_input_embeddings().weight
        hook = None

        def remove():
            if hook is not None:
                hook.remove()
            weight.requires_grad_(False)
            soft_prompt.remove(pipe, name)
            te.to(dtype)

        try:
            hook = soft_prompt.mask_gradients(pipe, name)
        except BaseException:
            remove()
            raise
        # a dropped caption leaves the bare placeholder: the source's p_i(x); weight decay 0 -- AdamW's
        # decay would move the frozen rows of the shared embedding matrix too
        return Training(name, {"embeddings": weight}, sp.prompt, name, False, 0.0,
                        lambda: soft_prompt.read_back(pipe, name, config), remove)

    def trigger(self, params):
        return params["placeholder"]

    def card_usage(self, params, example, folder_name):
        ph = params["placeholder"]
        return {"ours_prompt": f'handle.prompt("{example}")  # "{ph} {example}"',
                "diffusers_load": f'pipe.load_textual_inversion("{folder_name}", weight_name='
                                  f'"{SOFT_PROMPT_DIFFUSERS_NAME}")',
                "diffusers_prompt": f'"{ph} {example}"',
                "detail": f"{params['num_vectors']} learned token embeddings behind the placeholder `{ph}`, "
                          "which prefixes captions."}

    def apply(self, pipe, params, tensors, name):
        if set(tensors) != {SOFT_PROMPT_KEY}:
            raise AdapterError(f"a soft prompt's weights are one tensor {SOFT_PROMPT_KEY!r}, found {sorted(tensors)}")
        sp = SoftPrompt(params, tensors[SOFT_PROMPT_KEY])
        soft_prompt.check_fits(pipe, sp)
        soft_prompt.apply(pipe, sp)
        return params.placeholder

    def state(self, adapter):
        return {SOFT_PROMPT_KEY: adapter.embeds.detach().to(torch.float32).cpu()}

    def export(self, folder, adapter):
        from ..util.io import save_safetensors

        save_safetensors(folder / SOFT_PROMPT_DIFFUSERS_NAME, adapter.learned_embeds())

    def check_weights(self, params, weights, others, label):
        if set(weights) != {SOFT_PROMPT_KEY}:
            raise AdapterError(f"{label}: a soft prompt's weights are one tensor {SOFT_PROMPT_KEY!r}, found "
                               f"{sorted(weights)}; re-save the adapter with save_adapter")
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

    def check_backbone(self, params, weights, backbone, label):
        width = weights[SOFT_PROMPT_KEY][1][1]
        if width != backbone.get("text_dim", width):
            raise AdapterError(f"{label}: soft prompt rows are {width} wide, this backbone's text embeddings are "
                               f"{backbone['text_dim']}; retrain the adapter on this backbone")

    def row_prompt(self, handle, caption):
        return f"{handle} {caption}"  # the placeholder prefixes the caption


DEEP_PROMPT_USE = "prompt_cdm.adapters.deep_prompt.install"


class DeepPromptKind(AdapterKind):
    """m learned tokens per cross-attention layer of the UNet (deep_prompt.py); the text encoder is untouched."""

    name, params, data, module = "deep-prompt", DeepPromptConfig, DeepPrompt, deep_prompt
    title, hub_tag, diffusers_file = "deep prompt", "deep_prompt", "adapter_model.safetensors"
    diffusers_note = f"also what `{DEEP_PROMPT_USE}(pipe.unet, folder)` reads (a diffusers attention processor)"
    train_section = "deep_prompt"

    def start_training(self, pipe, section, source_id, generator):
        config = section.adapter_config()
        deep_prompt.check_name(source_id)
        if source_id in deep_prompt.names(pipe):
            raise AdapterError(f"the pipeline already has a deep prompt named {source_id!r}; train on the bare "
                               "backbone")
        fresh = deep_prompt.create(pipe, config, generator=generator)
        dev = pipe.unet.device
        # float32 trainable tensors on the UNet's device; the processor casts them to the activations' dtype
        trainable = {k: torch.nn.Parameter(v.to(dev, torch.float32)) for k, v in fresh.tensors.items()}
        deep_prompt.apply(pipe, DeepPrompt(config, trainable), source_id)  # active: every row
        params = {k.replace(".", "__"): p for k, p in trainable.items()}
        # a dropped caption keeps the prompts: the source's prompts on the empty caption (its own uncond row)
        return Training(source_id, params, lambda caption: caption, "", True, section.weight_decay,
                        lambda: deep_prompt.read_back(pipe, source_id, config),
                        lambda: deep_prompt.remove(pipe, source_id))

    def caches_text(self, section):
        return True  # the text encoder is frozen: caption states are cached

    def apply(self, pipe, params, tensors, name):
        dp = DeepPrompt(params, tensors)
        deep_prompt.apply(pipe, dp, name)
        return name

    def state(self, adapter):
        return {k: v.detach().to(torch.float32).cpu() for k, v in adapter.tensors.items()}

    def export(self, folder, adapter):
        pass  # no diffusers format exists: plain diffusers reads adapter_model.safetensors through `install`

    def check_weights(self, params, weights, others, label):
        suffixes = deep_prompt._SUFFIX[params.mode]
        for key, (dtype, shape) in weights.items():
            if not key.startswith(deep_prompt.PREFIX) or key.rsplit(".", 1)[-1] not in suffixes:
                raise AdapterError(f"{label}: tensor {key!r} is not a {params.mode}-mode deep-prompt key "
                                   f"({deep_prompt.PREFIX}<layer>.{'|'.join(suffixes)}); re-save the adapter")
            if dtype not in _FLOAT_DTYPES or len(shape) != 3:
                raise AdapterError(f"{label}: tensor {key!r} is {dtype} {shape}, expected floating point "
                                   "[timestep_buckets x num_tokens x width]; re-save the adapter")
            if shape[0] != params.timestep_buckets:
                raise AdapterError(f"{label}: tensor {key!r} holds {shape[0]} timestep buckets, the config says "
                                   f"timestep_buckets = {params.timestep_buckets}; fix adapter_config.json or "
                                   "re-save the adapter")
            if shape[1] != params.num_tokens:
                raise AdapterError(f"{label}: tensor {key!r} holds {shape[1]} tokens, the config says num_tokens = "
                                   f"{params.num_tokens}; fix adapter_config.json or re-save the adapter")
        if not weights:
            raise AdapterError(f"{label}: no deep-prompt tensors; re-save the adapter")

    def check_backbone(self, params, weights, backbone, label):
        try:
            deep_prompt.compare_shapes(deep_prompt.expected_shapes(deep_prompt.widths_from_table(backbone), params),
                                       {k: v[1] for k, v in weights.items()})
        except AdapterError as e:
            raise AdapterError(f"{label}: {e} (backbone {backbone.get('name', 'of this registry')})") from None

    def route(self, unet, row_handles, error):
        if any(h != BASE for h in row_handles) or deep_prompt.bank(unet) is not None:
            return deep_prompt.route_rows(unet, row_handles, error=error)
        return None

    def unet_adapter(self, handle):
        return handle

    def card_usage(self, params, example, folder_name):
        how = ("appended to its text context, through the frozen key/value projections" if params["mode"] == "context"
               else "as learned key/value prefixes")
        t = (f"one set per timestep range ({params['timestep_buckets']} ranges)" if params["timestep_buckets"] > 1
             else "the same at every timestep")
        return {"ours_prompt": f'"{example}"',
                "diffusers_load": f'from prompt_cdm.adapters.deep_prompt import install\n'
                                  f'install(pipe.unet, "{folder_name}")',
                "diffusers_prompt": f'"{example}"',
                "detail": f"{params['num_tokens']} learned tokens in every cross-attention layer of the UNet, {how}; "
                          f"{t}."}


KINDS: dict[str, AdapterKind] = {k.name: k for k in (LoraKind(), SoftPromptKind(), DeepPromptKind())}


def backbone_table(pipe) -> dict:
    """What the kinds' `check_backbone` reads of a bare backbone: every Linear module's [in, out] of the UNet
    and the text encoder, and the text embedding width (kept in a registry's index at `registry init`)."""
    return {"unet": lora.linear_table(pipe.unet), "text_encoder": lora.linear_table(pipe.text_encoder),
            "text_dim": int(pipe.text_encoder.get_input_embeddings().embedding_dim)}


def get_kind(name: str) -> AdapterKind:
    if name not in KINDS:
        raise AdapterError(f"unknown adapter kind {name!r}; valid: {', '.join(KINDS)}")
    return KINDS[name]


def kind_of(adapter) -> AdapterKind:
    """The kind of an in-memory adapter (a SoftPrompt or a LoraAdapter)."""
    for k in KINDS.values():
        if isinstance(adapter, k.data):
            return k
    raise TypeError(f"save_adapter takes a SoftPrompt, a LoraAdapter or a DeepPrompt, got {type(adapter).__name__}")
