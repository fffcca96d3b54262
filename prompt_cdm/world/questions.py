"""TIFA v1.0-format questions from specs, and their exact answers.

Each record has TIFA's keys (`id`, `caption`, `question`, `choices`, `answer`, `element`,
`element_type`) plus `program`, a structured form of the question that `answer_program`
evaluates on any spec -- the ground truth's, or the one a judge reads off a generated image.
"""
from __future__ import annotations

from .spec import BACKGROUNDS, COLOR_NAMES, POSITION_NAMES, SHAPES, SIZES, Spec, position_name

COUNT_CHOICES = ("1", "2", "3", "4")
ELEMENT_TYPES = ("object", "color", "shape", "counting", "spatial", "attribute", "other")


def _find(spec: Spec, color: str | None, shape: str | None):
    """The object matching colour and shape, else shape, else colour (what a VQA model would look at)."""
    for want in ((color, shape), (None, shape), (color, None)):
        for o in spec.objects:
            if (want[0] is None or o.color == want[0]) and (want[1] is None or o.shape == want[1]):
                if want != (None, None):
                    return o
    return None


def answer_program(spec: Spec, program: dict) -> str:
    """Answer a question program on a spec. Returns one of the record's choices, or 'none'."""
    op = program["op"]
    if op == "exists":
        return "yes" if any(o.shape == program["shape"] for o in spec.objects) else "no"
    if op == "count":
        return str(len(spec.objects))
    if op == "background":
        return spec.background
    if op == "relation":
        a = _find(spec, *program["a"])
        b = _find(spec, *program["b"])
        if a is None or b is None:
            return "no"
        ok = {
            "left of": a.col < b.col,
            "right of": a.col > b.col,
            "above": a.row < b.row,
            "below": a.row > b.row,
        }[program["relation"]]
        return "yes" if ok else "no"
    o = _find(spec, program.get("color"), program.get("shape"))
    if o is None:
        return "none"
    if op == "color_of":
        return o.color
    if op == "shape_of":
        return o.shape
    if op == "size_of":
        return o.size
    if op == "position_of":
        return position_name(o.row, o.col)
    if op == "style_of":
        return spec.style
    raise ValueError(f"unknown question op {op!r}")


def questions_for(spec: Spec, caption: str, caption_id: str) -> list[dict]:
    """TIFA records for one caption, only about facts the caption states (spec.mentions)."""
    if not spec.mentions:
        raise ValueError("spec has no `mentions`; build it with captions.describe()")
    recs: list[dict] = []

    def add(question, choices, program, element, element_type):
        recs.append(
            {
                "id": caption_id,  # TIFA v1.0: the caption's id, shared by its questions
                "question_id": f"{caption_id}_{len(recs)}",
                "caption_id": caption_id,
                "caption": caption,
                "question": question,
                "choices": list(choices),
                "answer": answer_program(spec, program),
                "element": element,
                "element_type": element_type,
                "program": program,
            }
        )

    outlined = spec.mentions.get("style", False)
    for m in spec.mentions["objects"]:
        shape, color = m["shape"], m["color"]
        add(f"is there a {shape}?", ("yes", "no"), {"op": "exists", "shape": shape}, shape, "object")
        add(f"what color is the {shape}?", COLOR_NAMES, {"op": "color_of", "shape": shape}, color, "color")
        add(f"what shape is the {color} object?", SHAPES, {"op": "shape_of", "color": color}, shape, "shape")
        if m["size"]:
            add(f"is the {color} {shape} small or large?", SIZES,
                {"op": "size_of", "color": color, "shape": shape}, "size", "attribute")
        if m["position"]:
            add(f"where is the {color} {shape}?", POSITION_NAMES,
                {"op": "position_of", "color": color, "shape": shape}, "position", "spatial")
        if outlined:
            add(f"is the {color} {shape} outlined or flat?", ("outlined", "flat"),
                {"op": "style_of", "color": color, "shape": shape}, "outlined", "attribute")
    add("how many objects are there?", COUNT_CHOICES, {"op": "count"}, "objects", "counting")
    rel = spec.mentions.get("relation")
    if rel:
        a, b = rel["a"], rel["b"]
        add(f"is the {a[0]} {a[1]} {rel['relation']} the {b[0]} {b[1]}?", ("yes", "no"),
            {"op": "relation", "relation": rel["relation"], "a": a, "b": b}, rel["relation"], "spatial")
    if spec.mentions.get("background"):
        add("what pattern is the background?", BACKGROUNDS, {"op": "background"}, spec.background, "other")
    return recs


def questions_for_folder(folder) -> tuple[list[dict], int]:
    """(TIFA question records of every caption, number of captions) of a rendered imagefolder (its
    metadata.jsonl rows carry the `spec` that `world render` writes). ValueError names the fix."""
    from pathlib import Path

    from .dataset import read_imagefolder

    rows = read_imagefolder(folder)
    recs: list[dict] = []
    for r in rows:
        if "spec" not in r:
            raise ValueError(f"{folder}/metadata.jsonl rows lack `spec`; render the folder with `prompt-cdm world render`")
        recs += questions_for(r["spec"], r["text"], Path(r["file_name"]).stem)
    return recs, len(rows)
