"""TIFA's sanity bounds on the embedded world: rendered ground truth (should score near 1) vs pure-noise
images (near chance), with the judge as the VQA model.

    python -m eval.tifa_bounds --domains base,stars,striped --n 200 --out runs/tifa_bounds

Per domain this is what these commands do, plus noise images named after the same caption ids:
    prompt-cdm world render --domain base --n 200 --heldout --out runs/tifa_bounds/base/renders
    prompt-cdm world questions --from runs/tifa_bounds/base/renders --out runs/tifa_bounds/base/questions.json
    prompt-cdm eval tifa --questions runs/tifa_bounds/base/questions.json --images runs/tifa_bounds/base/renders \
        --backend judge --out runs/tifa_bounds/base/renders.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def noise_images(ids: list[str], out: str | Path, size: int = 64, seed: int = 0) -> Path:
    """Uniform RGB noise images `<id>.png` (each pixel channel uniform in 0..255)."""
    import numpy as np
    from PIL import Image

    from prompt_cdm.util.io import save_image

    rng = np.random.default_rng(seed)
    for i in ids:
        save_image(Path(out) / f"{i}.png", Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))
    return Path(out)


def bounds(domains: list[str], n: int = 200, out: str | Path = "runs/tifa_bounds", seed: int = 0) -> dict:
    """{domain: {"renders": TIFA result, "noise": TIFA result}} with the judge backend; files under `out`."""
    from prompt_cdm.util.io import write_json
    from prompt_cdm.world.dataset import render_domain
    from prompt_cdm.world.questions import questions_for_folder

    from .tifa import caption_ids, load_questions, run_tifa
    from .vqa import get_backend

    backend = get_backend("judge")
    results = {}
    for d in domains:
        root = Path(out) / d
        render_domain(d, n, root / "renders", seed=seed, heldout=True)
        write_json(root / "questions.json", questions_for_folder(root / "renders")[0])
        ids = caption_ids(load_questions(root / "questions.json").records)
        noise_images(ids, root / "noise", seed=seed)
        results[d] = {kind: run_tifa(root / "questions.json", root / f"{kind}.json", backend, images=root / kind)
                      for kind in ("renders", "noise")}
    return results


def report(results: dict) -> str:
    types = sorted({t for r in results.values() for k in r.values() for t in k["by_type"]})
    lines = ["| domain | images | TIFA | chance | " + " | ".join(types) + " |",
             "|---|---|---|---|" + "---|" * len(types)]
    for d, r in results.items():
        for kind, res in r.items():
            cells = [f"{res['by_type'][t]:.3f}" if t in res["by_type"] else "" for t in types]
            lines.append(f"| {d} | {kind} | {res['score']:.3f} | {res['chance']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--domains", default="base,stars,striped", help="comma-separated domains")
    p.add_argument("--n", type=int, default=200, help="held-out captions per domain")
    p.add_argument("--seed", type=int, default=0, help="render and noise seed")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default="runs/tifa_bounds", help="output folder")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from prompt_cdm.util.io import write_json, write_text

    res = bounds(a.domains.split(","), a.n, a.out, a.seed)
    table = report(res)
    write_json(Path(a.out) / "bounds.json", res)
    write_text(Path(a.out) / "bounds.md", table)
    print(table, end="")
    print(json.dumps({d: {k: v["score"] for k, v in r.items()} for d, r in res.items()}))


if __name__ == "__main__":
    main()
