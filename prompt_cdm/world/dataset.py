"""Render domains to images + captions, in memory or as a diffusers/datasets imagefolder."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from ..util.io import save_image, write_jsonl
from .captions import describe, describe_generic
from .domains import get_domain, sample_spec
from .render import render
from .spec import Spec

# seeds of held-out evaluation items start here, far from any training seed
HELDOUT_OFFSET = 10_000_000


def item_seed(domain: str, seed: int, index: int) -> int:
    """A stable per-item seed from (domain, run seed, index)."""
    h = hashlib.sha256(f"{domain}:{seed}:{index}".encode()).digest()
    return int.from_bytes(h[:4], "little")


@dataclass
class Example:
    image: Image.Image
    caption: str
    spec: Spec


CAPTION_VOCABULARIES = ("named", "generic")


def example(domain: str, seed: int, captions: str = "named") -> Example:
    """One rendered example. `captions="generic"` words it in the base vocabulary only
    (`captions.describe_generic`); its spec then carries no `mentions` (no TIFA questions)."""
    spec = sample_spec(get_domain(domain), seed)
    if captions == "generic":
        return Example(render(spec), describe_generic(spec), spec)
    if captions != "named":
        raise ValueError(f"captions={captions!r}: use one of {', '.join(CAPTION_VOCABULARIES)}")
    caption, spec = describe(spec)
    return Example(render(spec), caption, spec)


def examples(domain: str, n: int, seed: int = 0, heldout: bool = False, progress: bool = False) -> list[Example]:
    """n deterministic examples of a domain; `heldout` draws from a disjoint seed range."""
    get_domain(domain)
    base = HELDOUT_OFFSET if heldout else 0
    it = range(n)
    if progress:
        it = tqdm(it, desc=f"render {domain}", unit="img")
    return [example(domain, item_seed(domain, seed + base, i)) for i in it]


def write_imagefolder(exs: list[Example], out: str | Path, prefix: str = "") -> Path:
    """Write images + metadata.jsonl (`file_name`, `text`, `spec`) -- the imagefolder convention."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, ex in enumerate(exs):
        name = f"{prefix}{i:06d}.png"
        save_image(out / name, ex.image)
        rows.append({"file_name": name, "text": ex.caption, "spec": ex.spec.to_dict()})
    write_jsonl(out / "metadata.jsonl", rows)
    return out


def render_domain(domain: str, n: int, out: str | Path, seed: int = 0, splits: int | None = None,
                  heldout: bool = False) -> list[Path]:
    """Render n images of `domain` into `out`; with `splits=K`, K uniform random splits out/split_k."""
    exs = examples(domain, n, seed=seed, heldout=heldout, progress=True)
    if not splits:
        return [write_imagefolder(exs, out)]
    if splits < 1:
        raise ValueError(f"--splits must be >= 1, got {splits}")
    import random

    order = list(range(n))
    random.Random(seed).shuffle(order)
    folders = []
    for k in range(splits):
        idx = sorted(order[k::splits])
        folders.append(write_imagefolder([exs[i] for i in idx], Path(out) / f"split_{k}"))
    return folders


def read_imagefolder(folder: str | Path) -> list[dict]:
    """Rows of an imagefolder's metadata.jsonl, with `spec` parsed when present."""
    folder = Path(folder)
    meta = folder / "metadata.jsonl"
    if not meta.exists():
        raise FileNotFoundError(f"{folder} has no metadata.jsonl; render one with `prompt-cdm world render`")
    rows = []
    for ln, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta}:{ln}: not valid JSON ({e.msg})") from None
        if "spec" in row:
            row["spec"] = Spec.from_dict(row["spec"])
        rows.append(row)
    return rows
