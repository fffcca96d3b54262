"""Data sources: the images one owner contributes, with a stable id and a content manifest.

A source is either
- an **imagefolder**: a folder of images + `metadata.jsonl` (one JSON object per line with
  `file_name`, the image's path inside the folder, and `text`, its caption) -- the diffusers /
  `datasets` imagefolder convention (`metadata.csv` with the same columns works too); or
- a **datasets name** `datasets:NAME[@SPLIT]` (columns `image`, `text`), read with the optional
  `datasets` library (`pip install datasets`).

Every source gets a **manifest** on first use: one sha256 per item (image bytes and caption) and
one hash over the set. Adapters record the set hash, so an adapter names exactly the data it saw.
The manifest is cached as `manifest.json` under the cache folder (`$PROMPT_CDM_CACHE`, else
`$XDG_CACHE_HOME/prompt_cdm`, else `~/.cache/prompt_cdm`), never inside the user's data folder:
that folder belongs to the data's owner (it may be read-only, shared, synced or under version
control), a manifest copied along with the data would go stale, and a `datasets` name has no folder
at all. The cache holds hashes, file names and file sizes/times only -- no pixels, no captions -- so
deleting a source's adapter still forgets its content. A cached entry is reused for a file only if
its size and mtime are unchanged and it was last modified well before the manifest was written
(git's "racy clean" rule: a file rewritten within the same timestamp tick is re-hashed).

Every refusal is a `SourceError` (a ValueError) that names the item and the fix.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from ..util.io import PICKLE_SUFFIXES, sha256_file, write_json

METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
DATASETS_PREFIX = "datasets:"
MANIFEST_VERSION = 1
RACY_NS = 2_000_000_000  # a file modified < 2 s before its manifest was written is re-hashed next time
_ID_BAD = re.compile(r"[^A-Za-z0-9_\-]+")


class SourceError(ValueError):
    """A source cannot be read; the message names the source or item and the fix."""


# ---------------------------------------------------------------- ids and cache


def sanitize_id(name: str) -> str:
    """A source id from any name: letters, digits, '_' and '-' (what adapter names and peft allow)."""
    sid = _ID_BAD.sub("-", name).strip("-")
    if not sid or not sid[0].isalnum():
        sid = "s" + sid
    return sid


def check_id(source_id: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,99}", source_id or ""):
        raise SourceError(f"source id {source_id[:40]!r} must be 1-100 letters, digits, '_' or '-' and start with a "
                          "letter or digit (it names the adapter); pass another id")
    return source_id


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: `cache_dir`, $PROMPT_CDM_CACHE, $XDG_CACHE_HOME/prompt_cdm or ~/.cache/prompt_cdm."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("PROMPT_CDM_CACHE"):
        return Path(os.environ["PROMPT_CDM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "prompt_cdm"


# ---------------------------------------------------------------- manifest


@dataclass
class ManifestItem:
    file_name: str
    sha256: str  # of the image file's bytes
    text_sha256: str  # of the caption (utf-8): the caption itself stays in the owner's folder
    size: int = 0
    mtime_ns: int = 0


@dataclass
class Manifest:
    """The identity of a source's data: per-item hashes and `hash`, one sha256 over the whole set."""

    source_id: str
    kind: str  # imagefolder | datasets | union
    location: str
    hash: str
    n_items: int
    items: list[ManifestItem] = field(default_factory=list)
    members: list[dict] = field(default_factory=list)  # a union: [{source_id, hash, n_items}]
    built_at_ns: int = 0
    version: int = MANIFEST_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        d = dict(d)
        d["items"] = [ManifestItem(**it) for it in d.get("items", [])]
        return cls(**d)


def set_hash(items: list[ManifestItem]) -> str:
    """sha256 over the items sorted by file name: (name, image hash, caption hash) per item.
    Independent of row order and of file times; changes with any image, caption, addition or removal."""
    h = hashlib.sha256(b"prompt_cdm.manifest.v1\n")
    for it in sorted(items, key=lambda i: i.file_name):
        h.update(f"{it.file_name}\t{it.sha256}\t{it.text_sha256}\n".encode())
    return h.hexdigest()


def _sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()



# ---------------------------------------------------------------- sources


@dataclass(frozen=True)
class SourceItem:
    """One training example: the image's name (path inside an imagefolder, row key of a dataset) and caption."""

    file_name: str
    text: str


class DataSource:
    """A source's items (sorted by file name: training order never depends on row order) and its manifest."""

    kind = "?"

    def __init__(self, source_id: str, location: str, items: list[SourceItem]):
        self.id = check_id(source_id)
        self.location = location
        self.items = sorted(items, key=lambda it: it.file_name)
        if not self.items:
            raise SourceError(f"source {self.id} ({location}) has no items; add images and captions")

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, location={self.location!r}, n={len(self)})"

    @property
    def captions(self) -> list[str]:
        return [it.text for it in self.items]

    def image(self, i: int) -> Image.Image:
        """Item i's image as RGB (decoded; refuses corrupt files with a SourceError)."""
        raise NotImplementedError

    def manifest(self, cache_dir: str | os.PathLike | None = None, refresh: bool = False) -> Manifest:
        raise NotImplementedError

    def members(self) -> list["DataSource"]:
        return [self]


def _decode(data: bytes | Path, where: str) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        im.load()  # decode fully: a truncated file fails here, not halfway through training
    except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError, ...)
        head = data[:1] if isinstance(data, bytes) else _head(data)
        if head == b"\x80":
            raise SourceError(f"{where} is a pickle, not an image; prompt_cdm reads images only (pickle can run "
                              "code) -- replace it with a PNG/JPEG or remove its row") from None
        detail = str(e).splitlines()[0] if str(e) else ""
        raise SourceError(f"{where} is not a readable image ({type(e).__name__}: {detail}); "
                          "replace the file with a valid PNG/JPEG or remove its row from the metadata") from None
    return im.convert("RGB")


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1)
    except OSError:
        return b""


class ImageFolderSource(DataSource):
    """A folder of images + metadata.jsonl (`file_name`, `text`) or metadata.csv."""

    kind = "imagefolder"

    def __init__(self, folder: str | os.PathLike, source_id: str | None = None):
        folder = Path(folder)
        if not folder.is_dir():
            raise SourceError(f"source folder {folder} does not exist; pass a folder of images with metadata.jsonl "
                              f"(e.g. `prompt-cdm world render --domain stars --n 200 --out {folder}`) "
                              f"or {DATASETS_PREFIX}NAME for a datasets name")
        self.folder = folder.resolve()
        _refuse_pickles(self.folder)
        items = _read_metadata(self.folder)
        super().__init__(source_id or sanitize_id(self.folder.name), str(self.folder), items)

    def path(self, i: int) -> Path:
        return self.folder / self.items[i].file_name

    def image(self, i: int) -> Image.Image:
        path = self.path(i)
        if not path.is_file():
            raise SourceError(f"{path} (row {self.items[i].file_name!r} of {self.folder}/metadata) is missing; "
                              "restore the file or remove its row")
        return _decode(path, str(path))

    def _cache_file(self, cache_dir) -> Path:
        key = hashlib.sha256(str(self.folder).encode()).hexdigest()[:16]
        return cache_root(cache_dir) / "sources" / f"{self.id}-{key}" / "manifest.json"

    def manifest(self, cache_dir: str | os.PathLike | None = None, refresh: bool = False) -> Manifest:
        """Build (or reuse the cached) manifest; a new or changed file is hashed and decoded once."""
        path = self._cache_file(cache_dir)
        old: dict[str, ManifestItem] = {}
        old_built = 0
        if path.is_file() and not refresh:
            try:
                cached = Manifest.from_dict(json.loads(path.read_text()))
                if cached.version == MANIFEST_VERSION and cached.location == self.location:
                    old, old_built = {it.file_name: it for it in cached.items}, cached.built_at_ns
            except (ValueError, TypeError, KeyError):
                old = {}  # an unreadable cache is rebuilt, never trusted
        built = time.time_ns()
        out = []
        for i, it in enumerate(self.items):
            p = self.path(i)
            try:
                st = p.stat()
            except OSError:
                raise SourceError(f"{p} (row {it.file_name!r} of {self.folder}/metadata) is missing; "
                                  "restore the file or remove its row") from None
            text_sha = _sha256_bytes(it.text.encode())
            prev = old.get(it.file_name)
            if (prev is not None and prev.size == st.st_size and prev.mtime_ns == st.st_mtime_ns
                    and st.st_mtime_ns < old_built - RACY_NS):
                out.append(ManifestItem(it.file_name, prev.sha256, text_sha, st.st_size, st.st_mtime_ns))
                continue
            self.image(i)  # refuse a corrupt file now, with its name
            out.append(ManifestItem(it.file_name, sha256_file(p), text_sha, st.st_size, st.st_mtime_ns))
        m = Manifest(self.id, self.kind, self.location, set_hash(out), len(out), out, built_at_ns=built)
        _write_cache(path, m)
        return m


def _write_cache(path: Path, m: Manifest) -> None:
    try:
        write_json(path, m.to_dict(), indent=None)
    except OSError:
        pass  # a read-only cache only costs re-hashing next time


def _refuse_pickles(folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file():
            raise SourceError(f"{p} is a pickle/array file; a source folder holds images + metadata.jsonl only "
                              "(prompt_cdm never unpickles data: it can run code) -- delete or move it")


def _read_metadata(folder: Path) -> list[SourceItem]:
    meta = next((folder / n for n in METADATA_NAMES if (folder / n).is_file()), None)
    if meta is None:
        raise SourceError(f"{folder} has no metadata.jsonl; write one line per image "
                          '{"file_name": "0001.png", "text": "a caption"} (the imagefolder convention)')
    rows: list[tuple[str, dict]] = []
    try:
        text = meta.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SourceError(f"{meta} is not UTF-8 text; re-save it as UTF-8") from None
    if meta.suffix == ".jsonl":
        for ln, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f"{meta}:{ln} is not valid JSON ({e.msg}); fix the line") from None
            if not isinstance(row, dict):
                raise SourceError(f"{meta}:{ln} must be a JSON object with file_name and text")
            rows.append((f"{meta}:{ln}", row))
    else:
        for ln, row in enumerate(csv.DictReader(io.StringIO(text)), 2):
            rows.append((f"{meta}:{ln}", row))
    items, seen = [], {}
    for where, row in rows:
        items.append(_item(folder, where, row, seen))
    return items


def _item(folder: Path, where: str, row: dict, seen: dict) -> SourceItem:
    cols = ", ".join(sorted(map(str, row))) or "none"
    if "file_name" not in row:
        raise SourceError(f"{where} has no `file_name` column (columns: {cols}); "
                          "name the image's path inside the folder as file_name")
    if "text" not in row:
        hint = next((c for c in ("caption", "prompt", "captions", "label", "description") if c in row), None)
        fix = f"rename the column {hint!r} to 'text'" if hint else "add each image's caption as `text`"
        raise SourceError(f"{where} ({row.get('file_name')!r}) has no `text` column (columns: {cols}); {fix}")
    name, caption = row["file_name"], row["text"]
    if not isinstance(name, str) or not name.strip():
        raise SourceError(f"{where}: file_name must be a non-empty string, got {name!r}; fix the row")
    if not isinstance(caption, str):
        raise SourceError(f"{where} ({name!r}): text must be a string, got {type(caption).__name__}; fix the row")
    if not caption.strip():
        raise SourceError(f"{where} ({name!r}) has an empty caption; write a caption in `text` or remove the row")
    p = Path(name)
    if p.is_absolute() or ".." in p.parts:
        raise SourceError(f"{where}: file_name {name!r} must be a path inside {folder} (no '..', not absolute)")
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise SourceError(f"{where}: file_name {name!r} is a pickle/array file; point the row at an image")
    if name in seen:
        raise SourceError(f"{where}: file_name {name!r} is listed twice (also at {seen[name]}); remove one row")
    seen[name] = where
    return SourceItem(name, caption.strip())


class DatasetsSource(DataSource):
    """A `datasets` name, read with the optional `datasets` library (columns `image` and `text`)."""

    kind = "datasets"

    def __init__(self, name: str, split: str = "train", source_id: str | None = None,
                 image_column: str = "image", text_column: str = "text"):
        try:
            import datasets
        except ImportError:
            raise SourceError(f"source {DATASETS_PREFIX}{name} needs the `datasets` library, which is not installed: "
                              "pip install datasets (or render/export the data as an imagefolder)") from None
        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as e:  # network, unknown name, unknown split: all reported the same way
            raise SourceError(f"cannot load dataset {name!r} split {split!r} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); check the name and split") from None
        cols = list(ds.column_names)
        for want in (image_column, text_column):
            if want not in cols:
                raise SourceError(f"dataset {name!r} has no {want!r} column (columns: {', '.join(cols)}); "
                                  f"pass image_column/text_column or rename the column")
        self.name, self.split, self.image_column = name, split, image_column
        self._ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self._fingerprint = getattr(ds, "_fingerprint", "")
        items = []
        for i, caption in enumerate(ds[text_column]):
            key = f"{i:08d}"
            if not isinstance(caption, str) or not caption.strip():
                raise SourceError(f"dataset {name!r} row {i} has an empty or non-string caption; fix or filter the row")
            items.append(SourceItem(key, caption.strip()))
        sid = source_id or sanitize_id(f"{name.split('/')[-1]}-{split}")
        super().__init__(sid, f"{DATASETS_PREFIX}{name}@{split}", items)

    def _bytes(self, i: int) -> bytes:
        cell = self._ds[int(self.items[i].file_name)][self.image_column]
        if cell.get("bytes"):
            return cell["bytes"]
        if cell.get("path"):
            return Path(cell["path"]).read_bytes()
        raise SourceError(f"dataset {self.name!r} row {i} has no image; fix or filter the row")

    def image(self, i: int) -> Image.Image:
        return _decode(self._bytes(i), f"dataset {self.name!r} row {i}")

    def manifest(self, cache_dir: str | os.PathLike | None = None, refresh: bool = False) -> Manifest:
        key = hashlib.sha256(f"{self.location}:{self._fingerprint}".encode()).hexdigest()[:16]
        path = cache_root(cache_dir) / "sources" / f"{self.id}-{key}" / "manifest.json"
        if path.is_file() and not refresh and self._fingerprint:
            try:
                return Manifest.from_dict(json.loads(path.read_text()))
            except (ValueError, TypeError, KeyError):
                pass
        out = []
        for i, it in enumerate(self.items):
            data = self._bytes(i)
            _decode(data, f"dataset {self.name!r} row {i}")
            out.append(ManifestItem(it.file_name, _sha256_bytes(data), _sha256_bytes(it.text.encode()), len(data)))
        m = Manifest(self.id, self.kind, self.location, set_hash(out), len(out), out, built_at_ns=time.time_ns())
        _write_cache(path, m)
        return m


class UnionSource(DataSource):
    """The union of several sources (the monolithic **paragon** baseline trains on it).

    Item names are `<member id>/<file name>`; the set hash covers the members' hashes."""

    kind = "union"

    def __init__(self, sources: list[DataSource], source_id: str = "paragon"):
        if len(sources) < 2:
            raise SourceError("a union needs at least two sources")
        ids = [s.id for s in sources]
        dup = next((i for i in ids if ids.count(i) > 1), None)
        if dup:
            raise SourceError(f"two sources share the id {dup!r}; give each folder a distinct name")
        self._members = sorted(sources, key=lambda s: s.id)
        self._index: list[tuple[DataSource, int]] = []
        items = []
        for s in self._members:
            for j, it in enumerate(s.items):
                items.append(SourceItem(f"{s.id}/{it.file_name}", it.text))
        super().__init__(source_id, "+".join(s.location for s in self._members), items)
        lookup = {f"{s.id}/{it.file_name}": (s, j) for s in self._members for j, it in enumerate(s.items)}
        self._index = [lookup[it.file_name] for it in self.items]

    def members(self) -> list[DataSource]:
        return list(self._members)

    def image(self, i: int) -> Image.Image:
        s, j = self._index[i]
        return s.image(j)

    def manifest(self, cache_dir: str | os.PathLike | None = None, refresh: bool = False) -> Manifest:
        ms = [s.manifest(cache_dir, refresh) for s in self._members]
        h = hashlib.sha256(b"prompt_cdm.union.v1\n")
        for m in ms:
            h.update(f"{m.source_id}\t{m.hash}\n".encode())
        members = [{"source_id": m.source_id, "hash": m.hash, "n_items": m.n_items} for m in ms]
        return Manifest(self.id, self.kind, self.location, h.hexdigest(), len(self), [], members, time.time_ns())


def open_source(spec: str | os.PathLike, source_id: str | None = None) -> DataSource:
    """A folder path -> ImageFolderSource; `datasets:NAME[@SPLIT]` -> DatasetsSource (needs `datasets`)."""
    s = str(spec)
    if s.startswith(DATASETS_PREFIX):
        name, _, split = s[len(DATASETS_PREFIX):].partition("@")
        if not name:
            raise SourceError(f"{s!r}: write {DATASETS_PREFIX}NAME or {DATASETS_PREFIX}NAME@SPLIT")
        return DatasetsSource(name, split or "train", source_id=source_id)
    return ImageFolderSource(s, source_id=source_id)


def open_sources(specs: list[str | os.PathLike], source_id: str | None = None) -> DataSource:
    """One spec -> that source; several -> their union (id `source_id`, default 'paragon')."""
    if not specs:
        raise SourceError("no source given; pass --source DIR (repeat it for the union of several)")
    if len(specs) == 1:
        return open_source(specs[0], source_id=source_id)
    return UnionSource([open_source(s) for s in specs], source_id=source_id or "paragon")


def clear_cache(source: DataSource, cache_dir: str | os.PathLike | None = None) -> None:
    """Delete the cached manifests of `source` (and of a union's members): part of forgetting a source."""
    for s in source.members():
        clear_cached_manifests(s.id, cache_dir)


def clear_cached_manifests(source_id: str, cache_dir: str | os.PathLike | None = None) -> list[str]:
    """Delete the cached manifests (per-image and caption hashes, the data's location) of source id
    `source_id`; the folders deleted. `registry forget` calls it."""
    import glob
    import shutil

    root = cache_root(cache_dir) / "sources"
    gone = []
    for d in sorted(root.glob(f"{glob.escape(source_id)}-*")) if root.is_dir() else []:
        if re.fullmatch(re.escape(source_id) + r"-[0-9a-f]{16}", d.name):  # not another id that starts alike
            if d.is_symlink() or not d.is_dir():
                d.unlink()
            else:
                shutil.rmtree(d)
            gone.append(str(d))
    return gone
