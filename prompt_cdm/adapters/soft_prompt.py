"""Soft prompts: n learned token embeddings behind one placeholder word (textual inversion, Gal et al. 2022).

A source's soft prompt is the placeholder `<cdm-SOURCE>` that prefixes its captions
("<cdm-stars> a red star"). We use diffusers' multi-vector textual-inversion convention, so the
same files load with `pipe.load_textual_inversion`: the tokenizer gets the tokens
`<cdm-x>`, `<cdm-x>_1`, ..., `<cdm-x>_{n-1}`, a prompt's placeholder expands to all of them
(diffusers' `maybe_convert_prompt`), and each token owns one row of the text encoder's token
embedding [V x D]. Training updates only those rows; the text encoder otherwise stays frozen.

Imports only torch at module level; the pipeline is any diffusers SD pipeline (tokenizer +
text_encoder) whose tokenizer is a fast (`tokenizers`-backed) one, as every transformers>=5
CLIPTokenizer is.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import torch

from .errors import AdapterError

# Lower case only: the CLIP tokenizer lower-cases text before it matches added tokens.
_PLACEHOLDER = re.compile(r"^<[a-z0-9][a-z0-9_.\-]*>$")


class SoftPromptError(AdapterError):
    """A soft prompt does not fit the pipeline (or is already applied); the message says the fix."""


@dataclass
class SoftPromptConfig:
    """Hyper-parameters of one soft prompt (they go to adapter_config.json under `params`)."""

    placeholder: str = field(default="<cdm-source>",
                             metadata={"help": "the word that prefixes captions, e.g. <cdm-stars>"})
    # 4 vectors: enough capacity for a style/domain while keeping 73 of CLIP's 77 positions for the caption
    num_vectors: int = field(default=4, metadata={"help": "learned embedding rows behind the placeholder"})
    init_word: str = field(default="",
                           metadata={"help": "single-token word whose embedding starts every row; '' = random"})

    def __post_init__(self):
        if not _PLACEHOLDER.match(self.placeholder):
            raise ValueError(
                f"soft prompt placeholder {self.placeholder!r} must look like <cdm-name>: '<', lower-case letters, "
                "digits, '_', '.', '-', then '>' (the CLIP tokenizer lower-cases prompts)"
            )
        if not 1 <= self.num_vectors <= 64:
            raise ValueError(f"soft prompt num_vectors must be in 1..64, got {self.num_vectors}")
        if self.init_word and len(self.init_word.split()) != 1:
            raise ValueError(f"soft prompt init_word must be one word (or '' for random), got {self.init_word!r}")


@dataclass
class SoftPrompt:
    """A soft prompt's data: its config and its rows `embeds` [num_vectors x D]. Not tied to a pipeline."""

    config: SoftPromptConfig
    embeds: torch.Tensor

    def __post_init__(self):
        if self.embeds.ndim != 2 or self.embeds.shape[0] != self.config.num_vectors:
            raise SoftPromptError(
                f"soft prompt {self.config.placeholder}: embeds must be [num_vectors={self.config.num_vectors} x D], "
                f"got {list(self.embeds.shape)}"
            )

    @property
    def placeholder(self) -> str:
        return self.config.placeholder

    @property
    def tokens(self) -> list[str]:
        return token_names(self.config.placeholder, self.config.num_vectors)

    def prompt(self, caption: str) -> str:
        """The conditional prompt for `caption`: the placeholder prefixes it."""
        return f"{self.config.placeholder} {caption}"

    def learned_embeds(self) -> dict[str, torch.Tensor]:
        """diffusers' textual-inversion file content: {placeholder: [n x D]}."""
        return {self.config.placeholder: self.embeds.detach().to(torch.float32).contiguous().cpu()}


def token_names(placeholder: str, n: int) -> list[str]:
    """diffusers' multi-vector token names: placeholder, placeholder_1, ..., placeholder_{n-1}."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, n)]


# ---------------------------------------------------------------- prompts


def expand_prompt(tokenizer, prompt: str) -> str:
    """Replace each multi-vector placeholder by all its tokens, exactly as diffusers'
    `TextualInversionLoaderMixin.maybe_convert_prompt` does ("<x> a cat" -> "<x> <x>_1 <x>_2 a cat")."""
    added = tokenizer.added_tokens_encoder
    for token in set(tokenizer.tokenize(prompt)):
        if token in added:
            replacement, i = token, 1
            while f"{token}_{i}" in added:
                replacement += f" {token}_{i}"
                i += 1
            prompt = prompt.replace(token, replacement)
    return prompt


def expand_prompts(tokenizer, prompts: list[str]) -> list[str]:
    """`expand_prompt` over a list; free when the tokenizer has no multi-vector tokens."""
    if not any(t.endswith("_1") for t in tokenizer.added_tokens_encoder):
        return list(prompts)  # without a "<x>_1" token expansion cannot change anything
    return [expand_prompt(tokenizer, p) for p in prompts]


# ---------------------------------------------------------------- creating


def create(pipe, config: SoftPromptConfig, generator: torch.Generator | None = None) -> SoftPrompt:
    """A fresh soft prompt for `pipe`'s text encoder (the pipeline is not changed).

    With `config.init_word` every row starts as that word's embedding (the textual-inversion
    recipe); otherwise rows are N(0, s^2) with s the std of the embedding matrix."""
    weight = pipe.text_encoder.get_input_embeddings().weight.detach()
    n, d = config.num_vectors, weight.shape[1]
    if config.init_word:
        ids = pipe.tokenizer(config.init_word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise SoftPromptError(
                f"init word {config.init_word!r} is {len(ids)} tokens for this tokenizer; "
                "pick a word that is one token (or init_word='' for random rows)"
            )
        rows = weight[ids[0]].to(torch.float32).cpu().repeat(n, 1)
    else:
        std = weight.to(torch.float32).std().item()
        rows = torch.randn(n, d, generator=generator, device="cpu") * std
    return SoftPrompt(config, rows)


# ---------------------------------------------------------------- pipeline state


def _backend(tokenizer):
    if not hasattr(tokenizer, "_tokenizer") or not hasattr(tokenizer._tokenizer, "to_str"):
        raise SoftPromptError(
            f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer; soft prompts need one "
            "(transformers>=5 tokenizers are)"
        )
    return tokenizer._tokenizer


def applied_tokens(pipe, placeholder: str) -> list[str]:
    """The tokens of `placeholder` present in the pipeline's tokenizer ([] if not applied)."""
    added = pipe.tokenizer.added_tokens_encoder
    if placeholder not in added:
        return []
    out, i = [placeholder], 1
    while f"{placeholder}_{i}" in added:
        out.append(f"{placeholder}_{i}")
        i += 1
    return out


def check_fits(pipe, sp: SoftPrompt) -> None:
    """Raise SoftPromptError if `sp` cannot be applied to `pipe`; touches nothing."""
    _backend(pipe.tokenizer)
    emb = pipe.text_encoder.get_input_embeddings()
    if sp.embeds.shape[1] != emb.embedding_dim:
        raise SoftPromptError(
            f"soft prompt {sp.placeholder} has rows of width {sp.embeds.shape[1]} but this text encoder's embeddings "
            f"are {emb.embedding_dim} wide; it was trained on another backbone"
        )
    vocab = pipe.tokenizer.get_vocab()
    taken = [t for t in sp.tokens if t in vocab]
    if taken:
        raise SoftPromptError(
            f"token {taken[0]} is already in the tokenizer; remove the soft prompt {sp.placeholder} first "
            "(soft_prompt.remove(pipe, placeholder)) or pick another placeholder"
        )
    if emb.num_embeddings != len(pipe.tokenizer):
        raise SoftPromptError(
            f"the text encoder has {emb.num_embeddings} embedding rows but the tokenizer {len(pipe.tokenizer)} tokens; "
            "soft prompts need them equal (was the tokenizer changed without the text encoder?)"
        )
    if not torch.isfinite(sp.embeds).all():
        raise SoftPromptError(f"soft prompt {sp.placeholder} holds NaN or infinite values")


def _set_rows(text_encoder, weight: torch.Tensor) -> None:
    """Replace the token-embedding matrix in place (same module object, new parameter)."""
    emb = text_encoder.get_input_embeddings()
    requires_grad = emb.weight.requires_grad
    emb.weight = torch.nn.Parameter(weight, requires_grad=requires_grad)
    emb.num_embeddings = weight.shape[0]
    text_encoder.config.vocab_size = weight.shape[0]


def apply(pipe, sp: SoftPrompt) -> list[int]:
    """Add `sp`'s tokens to the tokenizer and its rows to the text encoder; return their ids."""
    check_fits(pipe, sp)
    tok, te = pipe.tokenizer, pipe.text_encoder
    emb = te.get_input_embeddings()
    old = emb.weight.detach()
    base = len(tok)
    snapshot = _backend(tok).to_str()
    tok.add_tokens(sp.tokens)
    ids = tok.convert_tokens_to_ids(sp.tokens)
    if ids != list(range(base, base + len(sp.tokens))):
        tok._tokenizer = type(_backend(tok)).from_str(snapshot)
        raise SoftPromptError(f"the tokenizer gave soft prompt {sp.placeholder} ids {ids}, "
                              "expected consecutive new ids")
    _set_rows(te, torch.cat([old, sp.embeds.to(old.dtype).to(old.device)]))
    return ids


def trainable_rows(pipe, placeholder: str) -> torch.Tensor:
    """[n] ids of the embedding rows a soft prompt owns: the only rows training may change."""
    tokens = applied_tokens(pipe, placeholder)
    if not tokens:
        raise SoftPromptError(f"soft prompt {placeholder} is not applied to this pipeline")
    return torch.tensor(pipe.tokenizer.convert_tokens_to_ids(tokens), dtype=torch.long, device="cpu")


def mask_gradients(pipe, placeholders: str | list[str]):
    """Make the token-embedding matrix trainable but only in the rows of `placeholders`.

    Sets requires_grad on the embedding weight and registers a gradient hook that zeroes every
    other row; returns the hook handle (`.remove()` it after training, then `requires_grad_(False)`).
    Use weight_decay=0 for this parameter: AdamW's decay would move the frozen rows too."""
    names = [placeholders] if isinstance(placeholders, str) else list(placeholders)
    weight = pipe.text_encoder.get_input_embeddings().weight
    mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    for p in names:
        mask[trainable_rows(pipe, p).to(weight.device)] = 1
    weight.requires_grad_(True)
    return weight.register_hook(lambda g: g * mask)


def read_back(pipe, placeholder: str, config: SoftPromptConfig | None = None) -> SoftPrompt:
    """The applied soft prompt's current rows (after training) as a SoftPrompt (with `config` if given)."""
    ids = trainable_rows(pipe, placeholder)
    rows = pipe.text_encoder.get_input_embeddings().weight.detach()[ids].to(torch.float32).cpu().clone()
    if config is None:
        config = SoftPromptConfig(placeholder=placeholder, num_vectors=len(ids))
    if (config.placeholder, config.num_vectors) != (placeholder, len(ids)):
        raise SoftPromptError(f"config {config} does not describe the applied soft prompt {placeholder} "
                              f"({len(ids)} rows)")
    return SoftPrompt(config, rows)


def remove(pipe, placeholder: str) -> SoftPrompt:
    """Remove a soft prompt: its tokens leave the tokenizer and its rows the embedding matrix.

    Added tokens after it move down, as in diffusers' `unload_textual_inversion`; removing the
    soft prompt applied last restores the tokenizer and the embedding exactly. Returns its rows."""
    sp = read_back(pipe, placeholder)
    tok, te = pipe.tokenizer, pipe.text_encoder
    backend = _backend(tok)
    ids = set(trainable_rows(pipe, placeholder).tolist())
    state = json.loads(backend.to_str())
    kept = []
    for t in state["added_tokens"]:
        if t["content"] in sp.tokens:
            continue
        t["id"] -= sum(1 for i in ids if i < t["id"])
        kept.append(t)
    state["added_tokens"] = kept
    weight = te.get_input_embeddings().weight.detach()
    keep_rows = torch.tensor([i for i in range(weight.shape[0]) if i not in ids], device=weight.device)
    tok._tokenizer = type(backend).from_str(json.dumps(state))
    _set_rows(te, weight[keep_rows].clone())
    return sp
