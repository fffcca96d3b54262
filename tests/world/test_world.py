"""The procedural shapes world: specs, renders, captions, TIFA questions and imagefolders."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from prompt_cdm.world import (
    DOMAINS,
    SOURCE_DOMAINS,
    Spec,
    answer_program,
    describe,
    example,
    examples,
    get_domain,
    questions_for,
    read_imagefolder,
    render,
    render_domain,
    sample_spec,
)
from prompt_cdm.world.domains import UnknownDomainError
from prompt_cdm.world.questions import ELEMENT_TYPES
from prompt_cdm.world.spec import (
    BACKGROUNDS,
    COLOR_NAMES,
    COLORS,
    GRID,
    SHAPES,
    SIZES,
    STYLES,
    ObjectSpec,
    position_name,
    position_phrase,
)

SEEDS = range(50)
TIFA_KEYS = {"id", "caption", "question", "choices", "answer", "element", "element_type"}
CELL = 64 // GRID  # 21 px; cell (r, c) spans rows r*21 .. r*21+21 (the last px column is slack)


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(int)


def cell_patch(arr: np.ndarray, row: int, col: int, margin: int = 0) -> np.ndarray:
    r0, c0 = row * CELL, col * CELL
    return arr[r0 + margin : r0 + CELL + 1 - margin, c0 + margin : c0 + CELL + 1 - margin]


def colour_pixels(arr: np.ndarray, colour: str, tol: int = 30) -> int:
    """Pixels within L1 distance `tol` of a named colour."""
    return int((np.abs(arr - np.array(COLORS[colour])).sum(-1) <= tol).sum())


def captioned(domain: str, seed: int):
    ex = example(domain, seed)
    return ex, questions_for(ex.spec, ex.caption, f"{domain}_{seed}")


# ---------------------------------------------------------------- rendering


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_render_is_deterministic_and_64x64_rgb(domain):
    spec = sample_spec(get_domain(domain), 3)
    a, b = render(spec), render(spec)
    assert a.size == (64, 64) and a.mode == "RGB"
    assert np.array_equal(pixels(a), pixels(b))
    # a spec rebuilt from its dict (what imagefolders store) renders to the same pixels
    assert np.array_equal(pixels(a), pixels(render(Spec.from_dict(json.loads(json.dumps(spec.to_dict()))))))
    # the full example pipeline is deterministic too
    e1, e2 = example(domain, 3), example(domain, 3)
    assert e1.caption == e2.caption and e1.spec == e2.spec
    assert np.array_equal(pixels(e1.image), pixels(e2.image))


def test_different_seeds_render_differently():
    imgs = [pixels(example("base", s).image).tobytes() for s in range(20)]
    assert len(set(imgs)) == 20
    # the seed alone (same objects) still moves things: position jitter / background shade
    spec = sample_spec(get_domain("base"), 5)
    assert not np.array_equal(pixels(render(spec)), pixels(render(replace(spec, seed=6))))


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_domain_distinctive_feature_in_every_spec(domain):
    d = get_domain(domain)
    for seed in SEEDS:
        spec = sample_spec(d, seed)
        assert spec.domain == domain and spec.seed == seed
        assert spec.background == d.background and spec.style == d.style
        shapes = [o.shape for o in spec.objects]
        colors = [o.color for o in spec.objects]
        assert set(shapes) <= set(d.shapes) and set(colors) <= set(d.colors)
        if d.required_shape:
            assert d.required_shape in shapes, (domain, seed, spec)
        if d.required_colors:
            assert set(d.required_colors) & set(colors), (domain, seed, spec)


def test_domains_are_as_documented():
    assert "base" in DOMAINS and "base" not in SOURCE_DOMAINS
    assert set(SOURCE_DOMAINS) == set(DOMAINS) - {"base"}
    base = DOMAINS["base"]
    assert base.background == "plain" and base.style == "flat"
    for name in SOURCE_DOMAINS:
        d = DOMAINS[name]
        novel = (
            set(d.shapes) - set(base.shapes),
            set(d.colors) - set(base.colors),
            d.background != base.background,
            d.style != base.style,
        )
        assert any(novel), f"source domain {name} adds nothing the base domain lacks"
        assert d.background in BACKGROUNDS and d.style in STYLES
    # the base domain never shows a source domain's novelty
    for seed in SEEDS:
        spec = sample_spec(base, seed)
        assert all(o.shape in ("circle", "square", "triangle") for o in spec.objects)
        assert all(o.color in ("red", "green", "blue", "yellow") for o in spec.objects)


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_rendered_pixels_show_the_spec(domain):
    """Each object's exact colour is drawn in its own cell; patterned backgrounds are patterned."""
    d = get_domain(domain)
    for seed in range(20):
        spec = sample_spec(d, seed)
        arr = pixels(render(spec))
        for o in spec.objects:
            assert colour_pixels(cell_patch(arr, o.row, o.col), o.color) > 0, (domain, seed, o)
        occupied = {(o.row, o.col) for o in spec.objects}
        empty = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in occupied]
        assert empty  # at most 3 objects in 9 cells
        patch = cell_patch(arr, *empty[0], margin=2)
        if spec.background == "plain":
            assert patch.std() == 0, (domain, seed)
        else:
            assert patch.std() > 5, (domain, seed)


def test_outlined_style_draws_outlines_not_fills():
    # every outlined object looks different from its flat rendering
    for seed in range(10):
        spec = sample_spec(get_domain("outlined"), seed)
        flat = pixels(render(replace(spec, style="flat")))
        outlined = pixels(render(spec))
        for o in spec.objects:
            assert colour_pixels(cell_patch(outlined, o.row, o.col), o.color) > 0
            assert not np.array_equal(cell_patch(flat, o.row, o.col), cell_patch(outlined, o.row, o.col))
    # large objects are hollow: far fewer pixels of their colour than when filled. (Small stars,
    # triangles and crosses are too thin for the 2 px outline to leave a hole, so not those.)
    for shape in SHAPES:
        for seed in range(5):
            obj = ObjectSpec(shape=shape, color="red", size="large", row=1, col=1)
            spec = Spec(domain="outlined", background="plain", style="outlined", objects=[obj], seed=seed)
            n_out = colour_pixels(pixels(render(spec)), "red")
            n_flat = colour_pixels(pixels(render(replace(spec, style="flat"))), "red")
            limit = 0.6 if shape in ("circle", "square") else 1.1
            assert 0 < n_out < limit * n_flat, (shape, seed, n_out, n_flat)


def test_objects_have_distinct_shapes_colours_and_cells():
    sizes = Counter()
    counts = Counter()
    for domain in DOMAINS:
        for seed in range(100):
            objs = sample_spec(get_domain(domain), seed).objects
            assert 1 <= len(objs) <= 3
            counts[len(objs)] += 1
            assert len({o.shape for o in objs}) == len(objs)
            assert len({o.color for o in objs}) == len(objs)
            assert len({(o.row, o.col) for o in objs}) == len(objs)
            for o in objs:
                assert 0 <= o.row < GRID and 0 <= o.col < GRID
                assert o.size in SIZES and o.shape in SHAPES and o.color in COLOR_NAMES
                sizes[o.size] += 1
    assert set(counts) == {1, 2, 3} and set(sizes) == set(SIZES)  # the sampler uses its whole range


def test_position_words():
    assert position_phrase(0, 0) == "at the top left" and position_name(0, 0) == "top left"
    assert position_phrase(1, 1) == "in the center" and position_name(1, 1) == "center"
    assert position_phrase(1, 0) == "on the left" and position_name(1, 0) == "left"
    assert position_phrase(2, 1) == "at the bottom" and position_name(2, 1) == "bottom"
    assert position_name(2, 2) == "bottom right"


# ---------------------------------------------------------------- captions


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_captions_name_background_and_every_object(domain):
    for seed in SEEDS:
        ex = example(domain, seed)
        spec, cap = ex.spec, ex.caption
        for o in spec.objects:
            assert f"{o.color} {o.shape}" in cap, (cap, o)
        if spec.background != "plain":
            assert f"{spec.background} background" in cap, cap
        if spec.style == "outlined":
            assert all(f"outlined {o.color} {o.shape}" in cap for o in spec.objects), cap
        else:
            assert "outlined" not in cap
        m = spec.mentions
        assert {(x["color"], x["shape"]) for x in m["objects"]} == {(o.color, o.shape) for o in spec.objects}
        assert m["background"] == ("background" in cap)
        assert m["style"] == (spec.style == "outlined")
        # describe is a pure function of (spec, seed)
        again, spec2 = describe(sample_spec(get_domain(domain), seed))
        assert again == cap and spec2 == spec


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_generic_captions_use_the_base_vocabulary_only(domain):
    from prompt_cdm.world.captions import describe_generic
    from prompt_cdm.world.domains import BASE_COLORS, BASE_SHAPES

    unseen = [w for w in (*SHAPES, *COLOR_NAMES, *BACKGROUNDS, *STYLES)
              if w not in (*BASE_SHAPES, *BASE_COLORS, "plain", "flat")]
    for seed in range(60):
        named = example(domain, seed)
        ex = example(domain, seed, captions="generic")
        assert ex.image.tobytes() == named.image.tobytes() and ex.spec.objects == named.spec.objects
        words = ex.caption.replace(",", " ").split()
        assert not set(words) & set(unseen), ex.caption
        for o in ex.spec.objects:
            shape = o.shape if o.shape in BASE_SHAPES else "shape"
            want = f"{o.color} {shape}" if o.color in BASE_COLORS else shape
            assert want in ex.caption, (ex.caption, o)
        assert ("patterned background" in ex.caption) == (ex.spec.background != "plain")
        if domain == "base":  # the base vocabulary names all of base: the two captions agree
            assert ex.caption == named.caption
        assert describe_generic(ex.spec) == ex.caption  # pure in the spec
    with pytest.raises(ValueError, match="captions='plain'"):
        example(domain, 0, captions="plain")


# ---------------------------------------------------------------- TIFA questions


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_questions_are_exact_and_tifa_shaped(domain):
    ops = Counter()
    for seed in range(100):
        ex, recs = captioned(domain, seed)
        assert recs
        ids = [r["question_id"] for r in recs]
        assert len(set(ids)) == len(ids) and {r["id"] for r in recs} == {f"{domain}_{seed}"}
        for r in recs:
            assert TIFA_KEYS <= set(r), set(r)
            assert r["caption"] == ex.caption
            assert r["element_type"] in ELEMENT_TYPES
            assert isinstance(r["question"], str) and r["question"].endswith("?")
            assert r["answer"] in r["choices"], r
            assert r["answer"] == answer_program(ex.spec, r["program"]), r
            # records are plain JSON (TIFA files are JSON)
            assert json.loads(json.dumps(r)) == r
            ops[r["program"]["op"]] += 1
        assert ops  # non-empty
        assert sum(r["program"]["op"] == "count" for r in recs) == 1
    expected = {"exists", "color_of", "shape_of", "size_of", "position_of", "count"}
    if get_domain(domain).style == "outlined":
        expected.add("style_of")
    if get_domain(domain).background != "plain":
        expected.add("background")
    assert expected <= set(ops), ops


def test_question_ops_all_occur_somewhere():
    ops = Counter()
    for domain in DOMAINS:
        for seed in range(100):
            ops.update(r["program"]["op"] for r in captioned(domain, seed)[1])
    assert set(ops) == {
        "exists", "color_of", "shape_of", "size_of", "position_of", "count", "relation", "background", "style_of"
    }, ops


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_questions_only_about_mentioned_facts(domain):
    for seed in range(100):
        ex, recs = captioned(domain, seed)
        spec, cap = ex.spec, ex.caption
        by_op: dict[str, list[dict]] = {}
        for r in recs:
            by_op.setdefault(r["program"]["op"], []).append(r["program"])
        outl = "outlined " if spec.style == "outlined" else ""
        # position: asked exactly for the objects whose position the caption states
        asked = {(p["color"], p["shape"]) for p in by_op.get("position_of", [])}
        stated = {(o.color, o.shape) for o in spec.objects
                  if f"{outl}{o.color} {o.shape} {position_phrase(o.row, o.col)}" in cap}
        assert asked == stated, (cap, asked, stated)
        any_phrase = any(position_phrase(r, c) in cap for r in range(GRID) for c in range(GRID))
        assert bool(asked) == any_phrase, cap
        # size: asked exactly for the objects whose size the caption states
        asked = {(p["color"], p["shape"]) for p in by_op.get("size_of", [])}
        stated = {(o.color, o.shape) for o in spec.objects if f"{o.size} {outl}{o.color} {o.shape}" in cap}
        assert asked == stated, (cap, asked, stated)
        assert bool(asked) == any(f"{s} " in cap.split(" background")[0] for s in SIZES), cap
        # background / style / relation only when the caption says so
        assert ("background" in by_op) == ("background" in cap), cap
        assert ("style_of" in by_op) == ("outlined" in cap), cap
        rel_words = ("to the left of", "to the right of", " above ", " below ")
        assert ("relation" in by_op) == any(w in cap for w in rel_words), cap
        # object questions are about the named objects only
        named = {(o.color, o.shape) for o in spec.objects}
        assert {p["shape"] for p in by_op["exists"]} == {s for _, s in named}
        assert {p["shape"] for p in by_op["color_of"]} == {s for _, s in named}
        assert {p["color"] for p in by_op["shape_of"]} == {c for c, _ in named}


def test_questions_need_mentions():
    spec = sample_spec(get_domain("base"), 0)
    with pytest.raises(ValueError, match="mentions"):
        questions_for(spec, "a caption", "c0")


def test_answers_on_a_different_spec_are_sometimes_wrong():
    """answer_program really reads the spec: another image's spec fails some questions."""
    wrong = total = 0
    for domain in DOMAINS:
        for seed in range(30):
            ex, recs = captioned(domain, seed)
            other = example(domain, seed + 1000).spec
            for r in recs:
                total += 1
                wrong += answer_program(other, r["program"]) != r["answer"]
            # the image's own spec answers every question
            assert all(answer_program(ex.spec, r["program"]) == r["answer"] for r in recs)
    assert 0.1 * total < wrong < total, (wrong, total)


def test_answer_program_follows_each_edit_of_the_spec():
    a = ObjectSpec(shape="circle", color="red", size="small", row=0, col=0)
    b = ObjectSpec(shape="square", color="blue", size="large", row=2, col=2)
    spec = Spec(domain="base", background="plain", style="flat", objects=[a, b], seed=0)
    ask = lambda s, **p: answer_program(s, p)  # noqa: E731
    assert ask(spec, op="exists", shape="circle") == "yes"
    assert ask(spec, op="exists", shape="star") == "no"
    assert ask(spec, op="count") == "2"
    assert ask(spec, op="color_of", shape="circle") == "red"
    assert ask(spec, op="shape_of", color="blue") == "square"
    assert ask(spec, op="size_of", color="red", shape="circle") == "small"
    assert ask(spec, op="position_of", color="red", shape="circle") == "top left"
    assert ask(spec, op="position_of", color="blue", shape="square") == "bottom right"
    assert ask(spec, op="background") == "plain"
    assert ask(spec, op="style_of", color="red", shape="circle") == "flat"
    rel = dict(op="relation", a=["red", "circle"], b=["blue", "square"])
    assert ask(spec, **rel, relation="left of") == "yes"
    assert ask(spec, **rel, relation="above") == "yes"
    assert ask(spec, **rel, relation="right of") == "no"
    assert ask(spec, **rel, relation="below") == "no"

    moved = replace(spec, objects=[replace(a, row=1, col=2), b])
    assert ask(moved, op="position_of", color="red", shape="circle") == "right"
    assert ask(moved, **rel, relation="left of") == "no"
    recoloured = replace(spec, objects=[replace(a, color="green"), b])
    assert ask(recoloured, op="color_of", shape="circle") == "green"
    # the shape still identifies the object when its colour is wrong (what a VQA model would do)
    assert ask(recoloured, op="size_of", color="red", shape="circle") == "small"
    assert ask(recoloured, op="shape_of", color="red") == "none"
    assert ask(replace(spec, objects=[a]), op="count") == "1"
    assert ask(replace(spec, objects=[b]), op="exists", shape="circle") == "no"
    assert ask(replace(spec, objects=[b]), op="color_of", shape="circle") == "none"
    assert ask(replace(spec, objects=[b]), **rel, relation="left of") == "no"
    assert ask(replace(spec, background="dotted"), op="background") == "dotted"
    assert ask(replace(spec, style="outlined"), op="style_of", color="red", shape="circle") == "outlined"
    assert ask(replace(spec, objects=[replace(a, size="large"), b]), op="size_of", color="red",
               shape="circle") == "large"
    with pytest.raises(ValueError, match="unknown question op"):
        ask(spec, op="teleport", color="red", shape="circle")


# ---------------------------------------------------------------- datasets and imagefolders


def test_unknown_domain_lists_valid_ones(tmp_path):
    for call in (lambda: get_domain("nope"), lambda: examples("nope", 2),
                 lambda: render_domain("nope", 2, tmp_path / "x")):
        with pytest.raises(UnknownDomainError) as ei:
            call()
        msg = str(ei.value)
        assert "nope" in msg
        for name in DOMAINS:
            assert name in msg
    assert issubclass(UnknownDomainError, ValueError)
    assert not (tmp_path / "x").exists()


def test_examples_are_deterministic_and_seeded():
    a = examples("stars", 6, seed=0)
    b = examples("stars", 6, seed=0)
    c = examples("stars", 6, seed=1)
    assert [e.spec for e in a] == [e.spec for e in b] and [e.caption for e in a] == [e.caption for e in b]
    assert all(np.array_equal(pixels(x.image), pixels(y.image)) for x, y in zip(a, b))
    assert {e.spec.seed for e in a}.isdisjoint({e.spec.seed for e in c})


@pytest.mark.parametrize("domain", ["base", "dotted"])
def test_heldout_examples_differ_from_training(domain):
    train = examples(domain, 40, seed=0)
    held = examples(domain, 40, seed=0, heldout=True)
    assert {e.spec.seed for e in train}.isdisjoint({e.spec.seed for e in held})
    train_px = {pixels(e.image).tobytes() for e in train}
    assert not train_px & {pixels(e.image).tobytes() for e in held}
    assert all(e.spec.domain == domain for e in held)


def test_render_domain_splits_partition_the_items(tmp_path):
    n, k = 23, 4
    folders = render_domain("crosses", n, tmp_path / "out", seed=3, splits=k)
    assert [f.name for f in folders] == [f"split_{i}" for i in range(k)]
    expected = examples("crosses", n, seed=3)
    want = Counter(json.dumps(e.spec.to_dict(), sort_keys=True) for e in expected)
    by_spec = {json.dumps(e.spec.to_dict(), sort_keys=True): e for e in expected}
    got: Counter = Counter()
    sizes = []
    for folder in folders:
        rows = read_imagefolder(folder)
        sizes.append(len(rows))
        keys = [json.dumps(r["spec"].to_dict(), sort_keys=True) for r in rows]
        got.update(keys)
        for r, key in zip(rows, keys):
            ex = by_spec[key]
            assert r["text"] == ex.caption
            assert np.array_equal(pixels(Image.open(folder / r["file_name"]).convert("RGB")), pixels(ex.image))
    assert got == want  # disjoint (no duplicates) and covering all n items
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
    # rendering again with the same seed reproduces the same splits
    again = render_domain("crosses", n, tmp_path / "again", seed=3, splits=k)
    for f1, f2 in zip(folders, again):
        assert (f1 / "metadata.jsonl").read_text() == (f2 / "metadata.jsonl").read_text()


def test_render_domain_single_folder_and_metadata(tmp_path):
    n = 7
    (folder,) = render_domain("outlined", n, tmp_path / "one", seed=0)
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == n
    raw = [json.loads(ln) for ln in lines]
    for row in raw:
        assert set(row) == {"file_name", "text", "spec"}
        assert (folder / row["file_name"]).is_file()
        with Image.open(folder / row["file_name"]) as im:
            assert im.size == (64, 64)
    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert pngs == sorted(r["file_name"] for r in raw)
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    rows = read_imagefolder(folder)
    exs = examples("outlined", n, seed=0)
    for row, r, ex in zip(rows, raw, exs):
        assert isinstance(row["spec"], Spec)
        assert row["spec"] == ex.spec == Spec.from_dict(r["spec"])  # round trip incl. mentions
        assert row["spec"].mentions and row["text"] == ex.caption
        # the questions rebuilt from the stored spec match those from the in-memory example
        assert questions_for(row["spec"], row["text"], "c") == questions_for(ex.spec, ex.caption, "c")


def test_render_domain_rejects_bad_splits(tmp_path):
    with pytest.raises(ValueError, match="splits"):
        render_domain("base", 3, tmp_path / "bad", splits=-1)


def test_read_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        read_imagefolder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n\n{broken\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:3"):
        read_imagefolder(tmp_path)
