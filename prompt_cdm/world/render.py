"""Deterministic renderer: Spec -> 64x64 RGB image.

Drawn at 4x and downsampled with a box filter, so edges are anti-aliased and the output is a
pure function of the spec (PIL's drawing is deterministic).
"""
from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw

from .spec import COLORS, GRID, ObjectSpec, Spec

SIZE = 64
SUPER = 4
_S = SIZE * SUPER
_CELL = _S / GRID
_RADIUS = {"small": 0.22 * _CELL, "large": 0.38 * _CELL}
_OUTLINE = 2 * SUPER  # outline width at full scale, in super-sampled pixels


def _background(kind: str, rng: random.Random) -> Image.Image:
    base = rng.randint(38, 62)
    img = Image.new("RGB", (_S, _S), (base, base, base))
    d = ImageDraw.Draw(img)
    light = (base + 45,) * 3
    if kind == "striped":
        w = 6 * SUPER
        for k in range(-_S, 2 * _S, 2 * w):
            d.polygon([(k, 0), (k + w, 0), (k + w - _S, _S), (k - _S, _S)], fill=light)
    elif kind == "checkered":
        w = 8 * SUPER
        for i in range(0, _S, w):
            for j in range(0, _S, w):
                if (i // w + j // w) % 2 == 0:
                    d.rectangle([i, j, i + w - 1, j + w - 1], fill=light)
    elif kind == "dotted":
        step, r = 8 * SUPER, 1.3 * SUPER
        for i in range(step // 2, _S, step):
            for j in range(step // 2, _S, step):
                d.ellipse([i - r, j - r, i + r, j + r], fill=(base + 80,) * 3)
    elif kind != "plain":
        raise ValueError(f"unknown background {kind!r}")
    return img


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    if shape == "cross":
        a, b = r, r * 0.33
        return [
            (cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b), (cx + b, cy + b),
            (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b), (cx - a, cy - b), (cx - b, cy - b),
        ]
    raise ValueError(f"unknown shape {shape!r}")


def _draw_object(d: ImageDraw.ImageDraw, o: ObjectSpec, style: str, rng: random.Random) -> None:
    jitter = 0.08 * _CELL
    cx = (o.col + 0.5) * _CELL + rng.uniform(-jitter, jitter)
    cy = (o.row + 0.5) * _CELL + rng.uniform(-jitter, jitter)
    r = _RADIUS[o.size]
    rgb = COLORS[o.color]
    fill, outline, width = (rgb, None, 0) if style == "flat" else (None, rgb, _OUTLINE)
    if style not in ("flat", "outlined"):
        raise ValueError(f"unknown style {style!r}")
    if o.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
    else:
        pts = _polygon(o.shape, cx, cy, r)
        if fill is not None:
            d.polygon(pts, fill=fill)
        else:
            d.line(pts + [pts[0]], fill=outline, width=width, joint="curve")


def render(spec: Spec) -> Image.Image:
    """Render a spec to a 64x64 RGB PIL image (same spec -> same pixels)."""
    rng = random.Random(spec.seed * 7919 + 17)
    img = _background(spec.background, rng)
    d = ImageDraw.Draw(img)
    for o in spec.objects:
        _draw_object(d, o, spec.style, rng)
    return img.resize((SIZE, SIZE), Image.Resampling.BOX)
