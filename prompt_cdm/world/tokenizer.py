"""A real `transformers.CLIPTokenizer` built offline from the CLIP BPE vocabulary open_clip ships.

Same construction as OpenAI's CLIP `SimpleTokenizer` (byte-level unicode alphabet, the same
alphabet with '</w>', then one token per merge, then the two special tokens), written out as
`vocab.json` + `merges.txt` so the tokenizer is a plain Hugging Face one that any diffusers
pipeline folder can carry.
"""
from __future__ import annotations

import gzip
import json
import tempfile
from functools import lru_cache
from pathlib import Path

N_MERGES = 49152 - 256 - 2  # CLIP's merge count: vocabulary 49408 = 2*256 bytes + merges + 2 specials


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def bpe_path() -> Path:
    import open_clip

    p = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not p.exists():
        raise FileNotFoundError(f"open_clip's BPE vocabulary is missing at {p}; reinstall open_clip_torch")
    return p


def write_tokenizer_files(out: str | Path) -> Path:
    """Write vocab.json, merges.txt and the tokenizer config for CLIPTokenizer into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : N_MERGES + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    cfg = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
        "clean_up_tokenization_spaces": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps({k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2)
    )
    return out


@lru_cache(maxsize=1)
def _files_dir() -> str:
    return str(write_tokenizer_files(Path(tempfile.mkdtemp(prefix="prompt_cdm_tok_"))))


def clip_tokenizer(max_length: int = 77):
    """A fresh `transformers.CLIPTokenizer` with CLIP's vocabulary and merges, no download.

    Ids equal open_clip's on ordinary text; open_clip additionally runs ftfy and HTML
    unescaping, so text with HTML entities or mojibake can tokenize differently."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(_files_dir(), model_max_length=max_length)
