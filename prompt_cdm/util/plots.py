"""Plots of attribution traces: each source's weight w_i(x_t, t) over the sampling steps.

The CDM paper's Fig. 1 / Fig. 3 (Golatkar et al. 2023): weights start near the prior at high noise
and concentrate on one source as t -> 0. Reads the JSON data of `attribution.trace_to_json`;
matplotlib with the Agg backend (no display), written atomically.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence


def plot_traces(traces: Mapping | Sequence[Mapping], path: str | os.PathLike, titles: Sequence[str] | None = None,
                max_panels: int = 8) -> None:
    """One panel per image (at most `max_panels`): weight of each source against the step; the
    legend gives each source's credit (mean weight). `traces`: trace_to_json dicts."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .io import atomic_path

    traces = [traces] if isinstance(traces, Mapping) else list(traces)[:max_panels]
    if not traces:
        raise ValueError("plot_traces needs at least one trace")
    cols = min(len(traces), 4)
    rows = (len(traces) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= len(traces):
            ax.axis("off")
            continue
        tr = traces[k]
        steps = list(range(len(tr["timesteps"])))
        for i, name in enumerate(tr["sources"]):
            ax.plot(steps, [w[i] for w in tr["weights"]], marker="o", markersize=3,
                    label=f"{name} ({tr['credit'][name]:.2f})")
        ax.set_ylim(-0.02, 1.02)
        ts = tr["timesteps"]
        ax.set_xlabel(f"sampling step (timestep {ts[0]:g} -> {ts[-1]:g})")
        ax.set_ylabel("weight w_i(x_t, t)")
        title = (titles[k] if titles and k < len(titles) else tr.get("prompt", ""))
        ax.set_title(title[:48], fontsize=9)
        ax.legend(fontsize=7, title="source (credit)", title_fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def grid(images: list, cols: int = 8, scale: int = 2, pad: int = 2):
    """Tile PIL images into one picture (nearest-neighbour upscaled so small renders are visible)."""
    from PIL import Image

    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    out = Image.new("RGB", (cols * (w * scale + pad) + pad, rows * (h * scale + pad) + pad), (255, 255, 255))
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out.paste(im.resize((w * scale, h * scale), Image.Resampling.NEAREST),
                  (pad + c * (w * scale + pad), pad + r * (h * scale + pad)))
    return out
