"""The judge: a small CNN that reads a shapes-world image back into a spec.

It is this world's VQA model (TIFA questions are answered by evaluating their `program` on the
spec the judge reads) and its feature extractor for FID. Per grid cell it predicts the shape
(or empty), colour and size; per image the background pattern and drawing style.

    judge = Judge.load()                 # shipped weights
    specs = judge.read(images)           # list[Spec]
    feats = judge.features(images)       # [N x 320] for FID
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .spec import BACKGROUNDS, COLOR_NAMES, GRID, SHAPES, SIZES, STYLES, ObjectSpec, Spec

JUDGE_DIR = Path(__file__).resolve().parent.parent / "weights" / "judge"
SHAPE_CLASSES = ("empty",) + SHAPES


@dataclass
class JudgeConfig:
    width: int = 32  # channels of the first stage; later stages double
    feature_dim: int = 192


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.SiLU(),
    )


class JudgeNet(nn.Module):
    """[N x 3 x 64 x 64] in [-1, 1] -> per-cell logits [N x 9 x C] and per-image logits."""

    def __init__(self, cfg: JudgeConfig = JudgeConfig()):
        super().__init__()
        w = cfg.width
        self.cfg = cfg
        self.stem = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.SiLU(), nn.MaxPool2d(2),  # 32x32
            _block(w, 2 * w), nn.MaxPool2d(2), _block(2 * w, 4 * w),  # 16x16
        )
        c = 4 * w  # 16x16 feature map
        self.cell_pool = nn.AdaptiveAvgPool2d(GRID)
        self.cell_mlp = nn.Sequential(nn.Conv2d(c, c, 1), nn.SiLU())
        self.shape_head = nn.Conv2d(c, len(SHAPE_CLASSES), 1)
        self.color_head = nn.Conv2d(c, len(COLOR_NAMES), 1)
        self.size_head = nn.Conv2d(c, len(SIZES), 1)
        self.global_fc = nn.Sequential(nn.Linear(c, cfg.feature_dim), nn.SiLU())
        self.background_head = nn.Linear(cfg.feature_dim, len(BACKGROUNDS))
        self.style_head = nn.Linear(cfg.feature_dim, len(STYLES))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.stem(x)
        cells = self.cell_mlp(self.cell_pool(h))  # [N x c x 3 x 3]
        flat = lambda t: t.flatten(2).transpose(1, 2)  # noqa: E731  -> [N x 9 x classes]
        g = self.global_fc(h.mean(dim=(2, 3)))
        return {
            "shape": flat(self.shape_head(cells)),
            "color": flat(self.color_head(cells)),
            "size": flat(self.size_head(cells)),
            "background": self.background_head(g),
            "style": self.style_head(g),
            "features": torch.cat([g, cells.mean(dim=(2, 3))], dim=1),
        }


def spec_targets(specs: list[Spec]) -> dict[str, torch.Tensor]:
    """Training targets from specs; colour/size of empty cells are -100 (ignored)."""
    n = len(specs)
    shape = torch.zeros(n, GRID * GRID, dtype=torch.long)
    color = torch.full((n, GRID * GRID), -100, dtype=torch.long)
    size = torch.full((n, GRID * GRID), -100, dtype=torch.long)
    for i, s in enumerate(specs):
        for o in s.objects:
            c = o.row * GRID + o.col
            shape[i, c] = SHAPE_CLASSES.index(o.shape)
            color[i, c] = COLOR_NAMES.index(o.color)
            size[i, c] = SIZES.index(o.size)
    return {
        "shape": shape,
        "color": color,
        "size": size,
        "background": torch.tensor([BACKGROUNDS.index(s.background) for s in specs]),
        "style": torch.tensor([STYLES.index(s.style) for s in specs]),
    }


def to_tensor(images) -> torch.Tensor:
    """PIL images, uint8 arrays [N x H x W x 3] or a float tensor in [-1, 1] -> [N x 3 x 64 x 64]."""
    if torch.is_tensor(images):
        x = images.float()
    else:
        arr = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
        x = torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
    if x.shape[-1] != 64 or x.shape[-2] != 64:
        x = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    return x.contiguous()


class Judge:
    """Reads images back into specs; answers TIFA programs; gives FID features."""

    def __init__(self, net: JudgeNet):
        self.net = net.eval()

    @classmethod
    def load(cls, folder: str | Path = JUDGE_DIR) -> "Judge":
        from safetensors.torch import load_file

        folder = Path(folder)
        wpath = folder / "judge.safetensors"
        if not wpath.exists():
            raise FileNotFoundError(
                f"judge weights missing at {wpath}; train them with `prompt-cdm world train-judge recipes/judge.toml`"
            )
        cfg = JudgeConfig(**json.loads((folder / "config.json").read_text()))
        net = JudgeNet(cfg)
        net.load_state_dict({k: v.float() for k, v in load_file(str(wpath)).items()})
        return cls(net)

    def save(self, folder: str | Path = JUDGE_DIR) -> None:
        from ..util.io import save_safetensors, write_json

        folder = Path(folder)
        sd = {k: (v.half() if v.is_floating_point() else v) for k, v in self.net.state_dict().items()}
        save_safetensors(folder / "judge.safetensors", sd)
        write_json(folder / "config.json", asdict(self.net.cfg))

    @torch.no_grad()
    def logits(self, images, batch: int = 256) -> dict[str, torch.Tensor]:
        x = to_tensor(images)
        outs = [self.net(x[i : i + batch]) for i in range(0, len(x), batch)]
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    def features(self, images, batch: int = 256) -> torch.Tensor:
        """[N x D] features for FID in this world."""
        return self.logits(images, batch)["features"]

    def read(self, images, domain: str = "?") -> list[Spec]:
        """The spec the judge sees in each image."""
        out = self.logits(images)
        shape = out["shape"].argmax(-1)
        color = out["color"].argmax(-1)
        size = out["size"].argmax(-1)
        bg = out["background"].argmax(-1)
        style = out["style"].argmax(-1)
        specs = []
        for i in range(shape.shape[0]):
            objs = [
                ObjectSpec(SHAPE_CLASSES[int(shape[i, c])], COLOR_NAMES[int(color[i, c])], SIZES[int(size[i, c])],
                           c // GRID, c % GRID)
                for c in range(GRID * GRID)
                if int(shape[i, c]) != 0
            ]
            specs.append(Spec(domain, BACKGROUNDS[int(bg[i])], STYLES[int(style[i])], objs, seed=-1))
        return specs

    def answer(self, images, records: list[dict]) -> list[str]:
        """Answer TIFA records (each with a `program`) about the matching images."""
        from .questions import answer_program

        specs = self.read(images)
        return [answer_program(s, r["program"]) for s, r in zip(specs, records)]


def attribute_accuracy(true: list[Spec], pred: list[Spec]) -> dict[str, float]:
    """Per-attribute accuracy: shape/colour/size per true object (read at its cell); position (the set
    of occupied cells), count, background and style per image."""
    hits = {k: [] for k in ("shape", "color", "size", "position", "count", "background", "style")}
    for t, p in zip(true, pred):
        at = {(o.row, o.col): o for o in p.objects}
        for o in t.objects:
            q = at.get((o.row, o.col))
            hits["shape"].append(q is not None and q.shape == o.shape)
            hits["color"].append(q is not None and q.color == o.color)
            hits["size"].append(q is not None and q.size == o.size)
        hits["position"].append({(o.row, o.col) for o in t.objects} == set(at))
        hits["count"].append(len(t.objects) == len(p.objects))
        hits["background"].append(t.background == p.background)
        hits["style"].append(t.style == p.style)
    return {k: float(np.mean(v)) for k, v in hits.items()}
