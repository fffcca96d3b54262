"""Composition figures: attribution (credit of the true source) and quality per router, 8 domain sources.

    prompt-cdm train-all --world-domains all --kind lora --out runs/cdm_lora --recipe recipes/adapter_train.toml
    python -m eval.composition_quality --adapters runs/cdm_lora/adapters --data runs/cdm_lora/data \
        --n 32 --out runs/figs/compose

Builds a registry of one source per world domain (OUT/registry), caches latents and trains the
`classifier` router and the `ratio` heads (reference set: renders of `base`, which no source holds),
then, for every router, composes ALL sources on each domain's held-out captions and records
- attribution: the credit (mean weight over the steps) of the source whose domain the caption is from,
  and how often that source has the largest credit (uniform's 1/n is the floor);
- quality: judge-TIFA and FID of the composed images on that caption's domain,
beside each source's own adapter alone on the same captions (`own`). Finished (router, domain) cells
are kept in OUT/results.json, so a killed run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROUTERS = ("uniform", "classifier", "ratio", "ito", "classifier+sparse")


def compose_cell(cdm, names: list[str], router: str, prompts: list[str], true_index: int | None,
                 steps: int, guidance: float, seed: int, uncond: str = "shared"):
    """Images + attribution of composing the registry sources `names` of `cdm` (a registry CDMPipeline) with
    `router` on one domain's prompts.
    router: an estimator name with optional modifiers, "+sparse" (sparse routing after request.SPARSE_WARMUP of
    the steps), "+sparse0" (sparse routing from the first step) and "+prior" (the caption prior lambda(c),
    caption_prior.py), e.g. "ito+prior+sparse"; "+watch" draws each image with the true source alone
    (fixed one-hot weights) while the named estimator only watches the trajectory: its weights are the
    attribution reported (its evidence on images whose source is known), they never steer the sample.
    uncond: the guidance's unconditional row(s), request.UNCOND_MODES."""
    from prompt_cdm.compose.request import SPARSE_WARMUP, ComposeRequest
    from prompt_cdm.core.attribution import TraceRecorder
    from prompt_cdm.estimators import FixedEstimator, WatchedEstimator

    name, *mods = router.split("+")
    unknown = set(mods) - {"sparse", "sparse0", "prior", "watch"}
    if unknown:
        raise ValueError(f"router {router!r}: unknown modifier(s) {sorted(unknown)}; use +sparse, +sparse0, +prior, "
                         "+watch")
    watch = "watch" in mods
    if watch and (len(mods) > 1 or true_index is None):
        raise ValueError(f"router {router!r}: +watch needs prompts of a known source and no other modifier (the "
                         "drawing source is fixed; sparse routing would drop the rows the watcher reads)")
    request = ComposeRequest(prompts, sources=names, estimator=name, caption_prior=1.0 if "prior" in mods else None,
                             sparse="sparse" in mods or "sparse0" in mods,
                             sparse_warmup=SPARSE_WARMUP if "sparse" in mods else 0.0, uncond=uncond, steps=steps,
                             guidance=guidance, seed=seed)
    watched_by = []

    def watched(est):
        watched_by.append(WatchedEstimator(FixedEstimator([float(i == true_index) for i in range(len(names))]), est))
        return watched_by[-1]

    res = cdm(request, progress=True, estimator_hook=watched if watch else None)
    if watch:  # the traces and credit are the watcher's weights, on the same steps
        watched = []
        for k, rec in enumerate(res.traces):
            w = TraceRecorder()
            for step, t, weights in zip(rec.steps, rec.timesteps, watched_by[0].watched_trace(k)):
                w(step, t, weights)
            watched.append(w)
        res.traces = watched
    credit = torch.cat([tr.credit() for tr in res.traces])  # [N x n]
    rows = sum(sum(r) for r in res.rows_per_step) / len(prompts)  # UNet rows per image over all steps
    attribution = {"mean_credit": credit.mean(0).tolist(), "unet_rows_per_image": rows}
    if true_index is not None:
        attribution.update(true_credit=float(credit[:, true_index].mean()),
                           top1=float((credit.argmax(1) == true_index).float().mean()))
    return res, attribution


def evaluate(adapters: str, data: str, out: str, domains: list[str] | None = None, routers=ROUTERS, n: int = 32,
             steps: int = 25, guidance: float = 5.0, seed: int = 0, backbone: str = "tiny",
             sources: list[str] | None = None, router_steps: int = 400, uncond: str = "shared") -> dict:
    """Cells "<router>/<domain>" (and "own/<domain>") -> metrics, plus a per-router summary.

    domains: the prompt domains. sources: the registry's source names, one folder each under `adapters`
    and `data` (default: the domains themselves, one source per domain -- then attribution and `own` are
    measured; other sources, e.g. random splits of the data, get quality only)."""
    from prompt_cdm.backbone.loading import load_quietly
    from prompt_cdm.compose.pipeline import CDMPipeline
    from prompt_cdm.routing.build import build_registry
    from prompt_cdm.util.plots import grid
    from prompt_cdm.util.io import save_image, write_json
    from prompt_cdm.util.plots import plot_traces
    from prompt_cdm.world.domains import SOURCE_DOMAINS

    from .adapter_quality import adapter_images
    from .world_scoring import heldout, reference_features, score_world, shipped_judge

    out_p = Path(out)
    domains = list(domains or SOURCE_DOMAINS)
    names = list(sources or domains)
    per_domain = names == domains  # source i holds domain i's data: the true source of a prompt is known
    pipe, judge = load_quietly(backbone), shipped_judge()
    kinds = {r.split("+")[0] for r in routers} & {"classifier", "ratio"}  # only the routers this run composes with
    reg, router_report = build_registry(pipe, Path(adapters), Path(data), out_p, names, router_steps=router_steps,
                                        kinds=kinds)
    res_path = out_p / "results.json"
    settings = {"n": n, "steps": steps, "guidance": guidance, "seed": seed, "domains": domains, "sources": names,
                "adapters": adapters, "uncond": uncond}
    results = json.loads(res_path.read_text()) if res_path.is_file() else {"cells": {}}
    if any(results.get(k, v) != v for k, v in settings.items()):  # cells of other settings are not resumed
        print(f"{res_path}: made with other settings; its cells are recomputed")
        results = {"cells": {}}
    results.update(settings)
    if router_report:
        results["router_training"] = router_report
    cells = results["cells"]
    held = {d: heldout(d, n, seed) for d in domains}
    refs = {}

    def ref(d):
        if d not in refs:
            refs[d] = reference_features(judge, d, seed=seed)
        return refs[d]

    for d in domains if per_domain else []:  # each source alone on its own domain: the quality to match
        key = f"own/{d}"
        if key in cells:
            continue
        t0 = time.time()
        images = adapter_images(pipe, reg.adapter_dir(d), [e.caption for e in held[d]], steps, guidance, seed)
        cells[key] = dict(score_world(judge, d, held[d], images, ref_features=ref(d)), seconds=time.time() - t0)
        write_json(res_path, results)

    with CDMPipeline(pipe, registry=reg) as cdm:
        for router in routers:
            shown, traces = [], []
            for i, d in enumerate(domains):
                key = f"{router}/{d}"
                if key in cells:
                    continue
                t0 = time.time()
                res, attribution = compose_cell(cdm, names, router, [e.caption for e in held[d]],
                                                i if per_domain else None, steps, guidance, seed, uncond)
                cells[key] = dict(score_world(judge, d, held[d], res.images, ref_features=ref(d)), **attribution,
                                  seconds=time.time() - t0)
                shown += res.images[:4]
                traces += [dict(res.trace_json(names, k), prompt=f"[{d}] {held[d][k].caption}") for k in range(2)]
                write_json(res_path, results)
                print(json.dumps({key: {k: round(v, 3) for k, v in cells[key].items() if isinstance(v, float)}}),
                      flush=True)
            if shown:
                save_image(out_p / f"samples_{router}.png", grid(shown, cols=8, scale=3))
            if traces:
                plot_traces(traces[:8], out_p / f"trace_{router}.png")
    results["summary"] = summarize(cells, domains, routers)
    write_json(res_path, results)
    plot_attribution(results["summary"], out_p / "attribution.png")
    return results


def summarize(cells: dict, domains: list[str], routers) -> dict:
    """Per router: mean over domains of TIFA, FID, true-source credit, top-1 and UNet rows per image -- `routers`
    first, then those of earlier runs whose cells the folder holds."""
    out = {}
    for r in dict.fromkeys(("own", *routers, *(k.split("/", 1)[0] for k in cells))):
        rows = [cells[f"{r}/{d}"] for d in domains if f"{r}/{d}" in cells]
        if not rows:
            continue
        keys = ["score", "fid_judge", "seconds", "true_credit", "top1", "unet_rows_per_image"]
        out[r] = {k: sum(c[k] for c in rows) / len(rows) for k in keys if all(k in c for c in rows)}
        out[r]["domains"] = len(rows)
    return out


def plot_attribution(summary: dict, path: Path) -> None:
    """Bar chart: mean credit of the true source per router (1/n dashed: the uniform floor)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from prompt_cdm.util.io import atomic_path

    names = [r for r in summary if "true_credit" in summary[r]]
    if not names:
        return
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2, 3.2))
    ax.bar(names, [summary[r]["true_credit"] for r in names], color="tab:blue", label="credit of the true source")
    ax.plot(names, [summary[r]["top1"] for r in names], "o", color="tab:orange", label="top-1 (true source largest)")
    ax.axhline(0.9, ls=":", color="gray", label="goal 0.9")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("mean over domains")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def table(summary: dict) -> str:
    lines = ["| router | judge-TIFA | FID | credit of true source | top-1 | UNet rows / image | s / cell |",
             "|---|---|---|---|---|---|---|"]
    for r, s in summary.items():
        extra = tuple(f"{s[k]:.3f}" if k in s else "—" for k in ("true_credit", "top1")) + (
            f"{s['unet_rows_per_image']:.0f}" if "unet_rows_per_image" in s else "—",)
        lines.append(f"| {r} | {s['score']:.3f} | {s['fid_judge']:.1f} | {' | '.join(extra)} | {s['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", required=True, help="folder with one adapter folder per domain")
    p.add_argument("--data", required=True, help="folder with one imagefolder per domain (the sources' data)")
    p.add_argument("--domains", default=None, help="comma-separated (default: every source domain)")
    p.add_argument("--sources", default=None, help="comma-separated source folders (default: the domains)")
    p.add_argument("--routers", default=",".join(ROUTERS))
    p.add_argument("--n", type=int, default=32, help="held-out captions per domain")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--uncond", default="shared", help="guidance's unconditional row: shared (frozen backbone, n+1 "
                   "rows) or per-source (2n rows)")
    p.add_argument("--router-steps", type=int, default=400, help="classifier / ratio-head training steps (when this "
                   "folder's registry does not hold them yet)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = evaluate(a.adapters, a.data, a.out, a.domains.split(",") if a.domains else None, a.routers.split(","),
                   n=a.n, steps=a.steps, guidance=a.guidance, seed=a.seed,
                   sources=a.sources.split(",") if a.sources else None, router_steps=a.router_steps, uncond=a.uncond)
    print(table(res["summary"]))


if __name__ == "__main__":  # pragma: no cover
    main()
