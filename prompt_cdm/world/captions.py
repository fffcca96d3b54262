"""Captions from specs, from varied templates, recording which facts each caption states.

TIFA asks questions only about what a caption says, so `describe` returns the caption and
the spec's `mentions`: per object whether size and position are stated, the relations stated,
and whether the background and style are named.
"""
from __future__ import annotations

import random
from dataclasses import replace

from .spec import Spec, position_phrase

_TEMPLATES = (
    "{objs}",
    "{objs}{bg_comma}",
    "a picture of {objs}{bg_on}",
    "an image with {objs}{bg_on}",
    "{objs}{bg_on}",
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def describe(spec: Spec, seed: int | None = None, p_position: float = 0.8, p_size: float = 0.5) -> tuple[str, Spec]:
    """Return (caption, spec with `mentions` filled in). Deterministic in (spec, seed)."""
    rng = random.Random(spec.seed if seed is None else seed)
    outlined = spec.style == "outlined"
    objs = list(spec.objects)
    rng.shuffle(objs)
    relation = None
    if len(objs) == 2 and rng.random() < 0.25:
        a, b = objs
        if a.col != b.col:
            relation = ("left of" if a.col < b.col else "right of", 0, 1)
        elif a.row != b.row:
            relation = ("above" if a.row < b.row else "below", 0, 1)
    phrases, per_obj = [], []
    for i, o in enumerate(objs):
        size = rng.random() < p_size
        pos = relation is None and rng.random() < p_position
        words = ([o.size] if size else []) + (["outlined"] if outlined else []) + [w for w in (o.color, o.shape) if w]
        phrase = f"{_article(words[0])} {' '.join(words)}"
        if pos:
            phrase += " " + position_phrase(o.row, o.col)
        phrases.append(phrase)
        per_obj.append({"shape": o.shape, "color": o.color, "size": size, "position": pos})
    if relation is not None:
        word = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}[relation[0]]
        body = f"{phrases[0]} {word} {phrases[1]}"
    else:
        body = _join(phrases)
    bg = spec.background
    name_bg = bg != "plain" or rng.random() < 0.3
    template = rng.choice(_TEMPLATES)
    if "{bg" not in template:
        name_bg = False
    caption = template.format(
        objs=body,
        bg_comma=f", {bg} background" if name_bg else "",
        bg_on=f" on a {bg} background" if name_bg else "",
    )
    mentions = {
        "objects": per_obj,
        "relation": None
        if relation is None
        else {"relation": relation[0], "a": [objs[0].color, objs[0].shape], "b": [objs[1].color, objs[1].shape]},
        "background": name_bg,
        "style": outlined,
    }
    # a source domain's distinctive background must always be named: retry with a template that names it
    if bg != "plain" and not name_bg:
        return describe(spec, seed=rng.randrange(2**31), p_position=p_position, p_size=p_size)
    return caption, replace(spec, mentions=mentions)


# The class word a generic caption uses for what the base vocabulary cannot name (colours and the
# drawing style it leaves unsaid).
GENERIC_SHAPE = "shape"
GENERIC_BACKGROUND = "patterned"


def describe_generic(spec: Spec, seed: int | None = None) -> str:
    """A caption in the base domain's vocabulary only, as a web crawl might caption a new concept.

    A shape outside the base shapes is "a shape", a non-plain background "a patterned background";
    colours outside the base colours and the outlined style go unsaid. A backbone pretrained on
    such captions has *seen* every domain's visuals without a word that names them -- Stable
    Diffusion's position before textual inversion: the concept is in the model, the word is not.
    """
    from .domains import BASE_COLORS, BASE_SHAPES

    objects = [
        replace(o, shape=o.shape if o.shape in BASE_SHAPES else GENERIC_SHAPE,
                color=o.color if o.color in BASE_COLORS else "")
        for o in spec.objects
    ]
    generic = replace(spec, objects=objects, style="flat", mentions={},
                      background=spec.background if spec.background == "plain" else GENERIC_BACKGROUND)
    return describe(generic, seed=spec.seed if seed is None else seed)[0]
