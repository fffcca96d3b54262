"""The shapes world's vocabulary and the structured spec of one image.

An image holds 1-3 objects, each in one cell of a 3x3 grid (so objects never overlap and
every position word is exact). The spec is the ground truth that captions, TIFA questions
and the judge's targets are derived from.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

GRID = 3  # cells per side; position words are read off the cell

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLORS = {
    "red": (220, 45, 45),
    "green": (40, 175, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 215, 40),
    "purple": (140, 55, 195),
    "orange": (245, 135, 20),
    "pink": (250, 140, 205),
    "cyan": (45, 215, 225),
}
COLOR_NAMES = tuple(COLORS)
SIZES = ("small", "large")
BACKGROUNDS = ("plain", "striped", "checkered", "dotted")
STYLES = ("flat", "outlined")

ROW_WORDS = ("top", "middle", "bottom")
COL_WORDS = ("left", "center", "right")


def position_phrase(row: int, col: int) -> str:
    """Words for a grid cell: 'at the top left', 'on the left', 'at the top', 'in the center'."""
    if row == 1 and col == 1:
        return "in the center"
    if row == 1:
        return f"on the {COL_WORDS[col]}"
    if col == 1:
        return f"at the {ROW_WORDS[row]}"
    return f"at the {ROW_WORDS[row]} {COL_WORDS[col]}"


def position_name(row: int, col: int) -> str:
    """Canonical short name of a cell, used as a TIFA answer ('top left', 'center', 'left')."""
    return position_phrase(row, col).split(" the ", 1)[-1]


POSITION_NAMES = tuple(position_name(r, c) for r in range(GRID) for c in range(GRID))


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    color: str
    size: str
    row: int
    col: int

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Spec:
    """Ground truth of one rendered image."""

    domain: str
    background: str
    style: str
    objects: list[ObjectSpec]
    seed: int
    # which facts the caption states; questions are asked only about these (TIFA's rule)
    mentions: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Spec":
        objs = [ObjectSpec(**o) for o in d["objects"]]
        return cls(
            domain=d["domain"],
            background=d["background"],
            style=d["style"],
            objects=objs,
            seed=int(d["seed"]),
            mentions=dict(d.get("mentions", {})),
        )
