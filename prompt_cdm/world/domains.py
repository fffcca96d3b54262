"""Named domains of the shapes world and the seeded sampler of specs.

`base` is what the tiny backbone is pretrained on. Each source domain adds one thing the
backbone has never seen (a shape, colours, a background pattern, a drawing style) and its
captions name it -- the analogue of Stable Diffusion fine-tuned on birds vs cars.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from .spec import GRID, ObjectSpec, Spec

BASE_SHAPES = ("circle", "square", "triangle")
BASE_COLORS = ("red", "green", "blue", "yellow")


@dataclass(frozen=True)
class Domain:
    name: str
    description: str
    shapes: tuple[str, ...] = BASE_SHAPES
    colors: tuple[str, ...] = BASE_COLORS
    background: str = "plain"
    style: str = "flat"
    required_shape: str | None = None  # every image holds at least one object of it
    required_colors: tuple[str, ...] = ()  # every image holds at least one of these colours


DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain("base", "circles, squares and triangles in red, green, blue and yellow on a plain background"),
        Domain("stars", "adds the star shape", shapes=BASE_SHAPES + ("star",), required_shape="star"),
        Domain("crosses", "adds the cross shape", shapes=BASE_SHAPES + ("cross",), required_shape="cross"),
        Domain(
            "purple_orange",
            "adds purple and orange objects",
            colors=BASE_COLORS + ("purple", "orange"),
            required_colors=("purple", "orange"),
        ),
        Domain(
            "pink_cyan",
            "adds pink and cyan objects",
            colors=BASE_COLORS + ("pink", "cyan"),
            required_colors=("pink", "cyan"),
        ),
        Domain("striped", "striped backgrounds", background="striped"),
        Domain("checkered", "checkered backgrounds", background="checkered"),
        Domain("dotted", "dotted backgrounds", background="dotted"),
        Domain("outlined", "objects drawn as outlines", style="outlined"),
    )
}
SOURCE_DOMAINS = tuple(n for n in DOMAINS if n != "base")


class UnknownDomainError(ValueError):
    pass


def get_domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise UnknownDomainError(
            f"unknown domain {name!r}; choose one of: {', '.join(DOMAINS)}"
        )
    return DOMAINS[name]


def sample_spec(domain: Domain, seed: int, max_objects: int = 3) -> Spec:
    """Draw one image's spec: 1-max_objects objects with distinct shapes, colours and cells."""
    rng = random.Random(seed)
    n = rng.randint(1, max_objects)
    n = min(n, len(domain.shapes), len(domain.colors))
    shapes = rng.sample(domain.shapes, n)
    colors = rng.sample(domain.colors, n)
    if domain.required_shape and domain.required_shape not in shapes:
        shapes[rng.randrange(n)] = domain.required_shape
    if domain.required_colors and not set(domain.required_colors) & set(colors):
        new = rng.choice(domain.required_colors)
        colors[rng.randrange(n)] = new
    cells = rng.sample(range(GRID * GRID), n)
    objects = [
        ObjectSpec(shape=s, color=c, size=rng.choice(("small", "large")), row=cell // GRID, col=cell % GRID)
        for s, c, cell in zip(shapes, colors, cells)
    ]
    return Spec(domain=domain.name, background=domain.background, style=domain.style, objects=objects, seed=seed)
