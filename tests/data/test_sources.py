"""Sources: imagefolder reading, the cached manifest (stable, and changed by any image or caption), and
every refusal as a one-line SourceError naming the item and the fix."""
from __future__ import annotations

import json
import os
import pickle
import time

import pytest
from PIL import Image

from prompt_cdm.data.sources import (DatasetsSource, ImageFolderSource, SourceError, UnionSource, clear_cache,
                                open_source, open_sources, sanitize_id)


def _folder(root, n=4, name="src", captions=None):
    folder = root / name
    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (16, 16), (40 * i, 10, 200 - 30 * i)).save(folder / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "text": captions[i] if captions else f"a red circle number {i}"})
    _write_meta(folder, rows)
    return folder


def _write_meta(folder, rows):
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _rows(folder):
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("PROMPT_CDM_CACHE", str(d))
    return d


def test_imagefolder_items_and_id(tmp_path, cache):
    folder = _folder(tmp_path, name="My Stars.v2")
    src = open_source(folder)
    assert src.id == "My-Stars-v2" and len(src) == 4 and isinstance(src, ImageFolderSource)
    assert src.captions[0] == "a red circle number 0"
    assert src.image(1).mode == "RGB" and src.image(1).size == (16, 16)
    assert open_source(folder, source_id="stars").id == "stars"
    assert sanitize_id("_x") == "s_x" and sanitize_id("...") == "s"


def test_manifest_is_stable_cached_and_changes_with_an_image_or_caption(tmp_path, cache):
    folder = _folder(tmp_path)
    m1 = open_source(folder).manifest()
    cached = list(cache.rglob("manifest.json"))
    assert len(cached) == 1 and folder not in cached[0].parents  # the owner's folder is not written to
    assert not (folder / "manifest.json").exists()
    # the cache holds hashes, not captions
    assert "red circle" not in cached[0].read_text()
    m2 = open_source(folder).manifest()
    assert m1.hash == m2.hash and len(m1.hash) == 64 and m1.n_items == 4
    assert [i.sha256 for i in m1.items] == [i.sha256 for i in m2.items]
    # row order does not matter: the set is sorted by file name
    _write_meta(folder, list(reversed(_rows(folder))))
    assert open_source(folder).manifest().hash == m1.hash

    Image.new("RGB", (16, 16), (1, 2, 3)).save(folder / "002.png")  # same size on disk, new pixels
    m3 = open_source(folder).manifest()
    assert m3.hash != m1.hash
    changed = [a.file_name for a, b in zip(m1.items, m3.items) if a.sha256 != b.sha256]
    assert changed == ["002.png"]

    rows = _rows(folder)
    rows[0]["text"] = "a blue square"
    _write_meta(folder, rows)
    assert open_source(folder).manifest().hash not in (m1.hash, m3.hash)

    clear_cache(open_source(folder))
    assert not list(cache.rglob("manifest.json"))


def test_cached_hashes_are_reused_for_unchanged_files(tmp_path, cache):
    """Files older than the manifest with the same size and mtime are not re-read (that is the cache);
    refresh=True re-reads everything. A file rewritten within 2 s of a manifest is always re-read."""
    folder = _folder(tmp_path)
    old = time.time() - 3600
    for p in folder.glob("*.png"):
        os.utime(p, (old, old))
    m1 = open_source(folder).manifest()
    p = folder / "003.png"
    data = bytearray(p.read_bytes())
    data[-20] ^= 0xFF  # corrupt a byte in place: same size, and we restore the mtime
    p.write_bytes(bytes(data))
    os.utime(p, (old, old))
    assert open_source(folder).manifest().hash == m1.hash
    with pytest.raises(SourceError, match="003.png"):
        open_source(folder).manifest(refresh=True)
    clear_cache(open_source(folder))
    assert not list(cache.rglob("manifest.json"))


def test_union_is_the_paragon(tmp_path, cache):
    a, b = _folder(tmp_path, name="a"), _folder(tmp_path, n=3, name="b")
    u = open_sources([b, a])
    assert isinstance(u, UnionSource) and u.id == "paragon" and len(u) == 7
    assert u.items[0].file_name == "a/000.png" and u.items[-1].file_name == "b/002.png"
    assert u.image(5).size == (16, 16)
    m = u.manifest()
    assert [x["source_id"] for x in m.members] == ["a", "b"]
    assert m.hash == open_sources([a, b], source_id="paragon").manifest().hash
    assert m.hash not in (open_source(a).manifest().hash, open_source(b).manifest().hash)
    with pytest.raises(SourceError, match="share the id 'a'"):
        open_sources([a, a])


def _err(fn, *needles):
    with pytest.raises(SourceError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_missing_folder_and_metadata(tmp_path, cache):
    _err(lambda: open_source(tmp_path / "nope"), "does not exist", "datasets:")
    (tmp_path / "empty").mkdir()
    _err(lambda: open_source(tmp_path / "empty"), "no metadata.jsonl", "file_name")


def test_corrupt_missing_and_pickled_images(tmp_path, cache):
    folder = _folder(tmp_path)
    (folder / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    _err(lambda: open_source(folder).manifest(), "001.png", "not a readable image", "remove its row")
    (folder / "001.png").write_bytes(pickle.dumps({"x": 1}))
    _err(lambda: open_source(folder).manifest(), "001.png", "pickle")
    (folder / "001.png").unlink()
    _err(lambda: open_source(folder).manifest(), "001.png", "missing", "remove its row")
    _err(lambda: open_source(folder).image(1), "001.png", "missing")


def test_pickle_file_in_folder(tmp_path, cache):
    folder = _folder(tmp_path)
    (folder / "extra.pkl").write_bytes(pickle.dumps([1, 2]))
    _err(lambda: open_source(folder), "extra.pkl", "pickle", "delete")


@pytest.mark.parametrize("row, needles", [
    ({"file_name": "000.png", "text": "   "}, ["000.png", "empty caption"]),
    ({"file_name": "000.png", "caption": "a star"}, ["no `text` column", "rename the column 'caption' to 'text'"]),
    ({"image": "000.png", "text": "a star"}, ["no `file_name` column", "columns: image, text"]),
    ({"file_name": "../000.png", "text": "a star"}, ["inside"]),
    ({"file_name": "weights.pt", "text": "a star"}, ["weights.pt", "pickle"]),
    ({"file_name": "000.png", "text": 3}, ["text must be a string"]),
])
def test_bad_rows(tmp_path, cache, row, needles):
    folder = _folder(tmp_path)
    rows = _rows(folder)
    rows[0] = row
    _write_meta(folder, rows)
    msg = _err(lambda: open_source(folder), *needles)
    assert "metadata.jsonl:1" in msg  # the line of the bad row


def test_bad_json_and_duplicate_rows(tmp_path, cache):
    folder = _folder(tmp_path)
    (folder / "metadata.jsonl").write_text('{"file_name": "000.png", "text": "a"}\n{not json\n')
    _err(lambda: open_source(folder), "metadata.jsonl:2", "not valid JSON")
    _write_meta(folder, [{"file_name": "000.png", "text": "a"}, {"file_name": "000.png", "text": "b"}])
    _err(lambda: open_source(folder), "listed twice")


def test_csv_metadata(tmp_path, cache):
    folder = _folder(tmp_path)
    (folder / "metadata.jsonl").unlink()
    (folder / "metadata.csv").write_text("file_name,text\n000.png,a red star\n001.png,a blue cross\n")
    src = open_source(folder)
    assert src.captions == ["a red star", "a blue cross"] and len(src.manifest().hash) == 64


def test_datasets_name_needs_the_optional_library(tmp_path, cache):
    try:
        import datasets  # noqa: F401
    except ImportError:
        _err(lambda: open_source("datasets:someone/birds@train"), "pip install datasets")
        _err(lambda: DatasetsSource("someone/birds"), "pip install datasets")
    else:
        pytest.skip("datasets is installed")
