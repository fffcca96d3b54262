"""`prompt-cdm eval ...`: backbone quality, TIFA, FID, memorization (the eval package's entry points)."""
from __future__ import annotations

import json
from pathlib import Path

from .common import UsageError, add_placement


def cmd_eval_backbone(a) -> None:
    from eval.backbone_quality import evaluate_backbone

    res = evaluate_backbone(a.backbone, a.domains.split(","), n=a.n, steps=a.steps, guidance=a.guidance,
                            seed=a.seed, out=a.out, device=a.device, dtype=a.dtype)
    print(json.dumps(res, indent=1))


def cmd_eval_tifa(a) -> None:
    from eval.tifa import image_generator, official_path, run_tifa, table
    from eval.tifa_mapping import get_mapper
    from eval.vqa import get_backend

    from ..backbone.placement import resolve_device

    device = str(resolve_device(a.device))  # one device for the VQA, the embedding model and the backbone
    if a.images is not None and a.backbone is not None:
        raise UsageError("give --images DIR or --backbone NAME, not both")
    if a.backend != "answers" and a.images is None and a.backbone is None:
        raise UsageError("give --images DIR (images named <caption id>.png, or an id -> path JSON) or --backbone "
                         "NAME to generate them")
    if a.backend == "transformers":
        opts = {"model": a.model, "processor": a.processor, "device": device, "batch_size": a.batch_size,
                "max_length": a.max_length}
    elif a.model or a.processor:
        raise UsageError(f"--model/--processor configure the transformers backend, not {a.backend!r}")
    else:
        opts = {}
    if a.backend == "answers":
        opts["answers"] = a.answers
    elif a.answers:
        raise UsageError(f"--answers is read by --backend answers, not {a.backend!r}")
    backend = get_backend(a.backend, **opts)
    mapper = get_mapper(a.mapping, a.sbert, device=device, normalise=a.normalise) if backend.free_form else None
    generate = image_generator(a.backbone, a.adapter, a.steps, a.guidance, a.seed, device, a.dtype) \
        if a.backbone else None
    res = run_tifa(a.questions, a.out, backend, images=a.images, generate=generate, save_images=a.save_images,
                   mapper=mapper, normalise=a.normalise, official=a.format == "official")
    print(table(res), end="")
    print(f"results -> {a.out} (per question: {Path(a.out).with_suffix('.jsonl')}, table: "
          f"{Path(a.out).with_suffix('.md')}" + (f", official: {official_path(a.out)}" if a.format == "official"
                                                 else "") + ")")


def cmd_eval_fid(a) -> None:
    from eval.fid import clip_score, fid_kid, read_folder
    from ..util.io import write_json

    real, fake = read_folder(a.real), read_folder(a.fake)
    from ..backbone.placement import resolve_device

    res = fid_kid(real.images, fake.images, features=a.features, weights=a.weights,
                  kid_subset_size=a.kid_subset_size, seed=a.seed, device=resolve_device(a.device))
    if a.clip_weights:
        if fake.captions is None:
            raise UsageError(f"CLIPScore needs captions: {a.fake}/metadata.jsonl with file_name and text for every "
                             "image")
        res["clip_score"] = clip_score(fake.images, fake.captions, a.clip_arch, a.clip_weights)
    res.update(real=str(a.real), fake=str(a.fake))
    if a.out:
        write_json(a.out, res)
    print(json.dumps(res, indent=1))


def cmd_eval_memorization(a) -> None:
    from eval.fid import read_folder
    from eval.memorization import COPY_THRESHOLD, TILES, copy_rate, nearest_training
    from ..util.io import write_json

    tiles = TILES if a.tiles is None else a.tiles
    if a.threshold is None and (a.k is not None or tiles != TILES):
        raise UsageError(f"the calibrated threshold ({COPY_THRESHOLD}) is for the absolute rule with {TILES} tiles: "
                         "pass --threshold too")
    thr = COPY_THRESHOLD if a.threshold is None else a.threshold
    train, gen = read_folder(a.train), read_folder(a.images)
    near = nearest_training(gen.images, train.images, tiles=tiles, k=a.k, alpha=a.alpha)
    res = {"copy_rate": copy_rate(near["scores"], thr), "threshold": thr, "tiles": tiles, "k": a.k,
           "alpha": a.alpha, "n_generated": len(gen.images), "n_training": len(train.images),
           "images": [{"image": p.name, "nearest": train.paths[int(i)].name, "distance": float(d), "score": float(s),
                       "copy": bool(s < thr)}
                      for p, i, d, s in zip(gen.paths, near["nearest"], near["distance"], near["scores"])]}
    if a.out:
        write_json(a.out, res)
    print(json.dumps({k: v for k, v in res.items() if k != "images"}, indent=1))


def _add_eval_parsers(e) -> None:
    t = e.add_parser("tifa", help="TIFA (Hu et al. 2023) of a TIFA v1.0 question file on images of its captions")
    t.add_argument("--questions", required=True, metavar="Q.json",
                   help="TIFA v1.0 question file (e.g. from `prompt-cdm world questions`, or the official one)")
    t.add_argument("--images", default=None, metavar="PATH",
                   help="folder of <caption id>.png images, or the official id -> image path JSON (read in chunks)")
    t.add_argument("--backend", default="judge",
                   help="VQA backend: judge (shapes world), transformers (--model) or answers (--answers)")
    t.add_argument("--answers", default=None, metavar="FILE", help="answers backend: pre-computed answers, the "
                   "official result JSON or a jsonl of {id, question, answer}")
    t.add_argument("--model", default=None, help="transformers backend: a VQA model folder or hub id (BLIP, ViLT, "
                   "GIT, BLIP-2, InstructBLIP, or a chat VLM with a chat template)")
    t.add_argument("--processor", default=None, help="transformers backend: processor folder or id (default: --model)")
    t.add_argument("--batch-size", type=int, default=1, help="transformers backend: questions per call (default 1, "
                   "as the official loop; padded batches can change BLIP's answers)")
    t.add_argument("--max-length", type=int, default=50, help="transformers backend: generate's max_length (the "
                   "official 50)")
    t.add_argument("--mapping", default=None, metavar="NAME",
                   help="free-form answer -> choice mapping: official (all-mpnet-base-v2, the default when the "
                   "tifa-official extra is installed) or fast (all-MiniLM-L6-v2)")
    t.add_argument("--sbert", default=None, metavar="MODEL", help="map with this sentence-embedding model folder "
                   "instead (mean pooling, as the official mapping)")
    t.add_argument("--normalise", action="store_true", help="compare answers ignoring case and surrounding space "
                   "(default: exact string equality, as the official code)")
    t.add_argument("--format", default="ours", choices=["ours", "official"], help="official: also write "
                   "RESULT.official.json in the official shape (tifa_average, tifa_stdev, question_details)")
    t.add_argument("--device", default="auto", help="the VQA and embedding models and, with --backbone, the backbone: "
                   "auto (the first CUDA device if visible, else cpu), cpu, cuda, cuda:N, mps")
    t.add_argument("--dtype", default="auto", help="with --backbone: the backbone's precision: auto (fp16 on CUDA, "
                   "else fp32), fp32, fp16, bf16")
    t.add_argument("--backbone", default=None, help="generate the images instead: 'tiny', an SD folder or hub id")
    t.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="with --backbone: an adapter folder to compose (repeatable; uniform weights)")
    t.add_argument("--steps", type=int, default=25, help="with --backbone: sampling steps")
    t.add_argument("--guidance", type=float, default=5.0, help="with --backbone: classifier-free guidance scale")
    t.add_argument("--seed", type=int, default=0, help="with --backbone: sampling seed")
    t.add_argument("--save-images", default=None, metavar="DIR", help="with --backbone: also save <id>.png here")
    t.add_argument("--out", required=True, metavar="RESULT.json",
                   help="result (score, by_type, what was skipped); RESULT.jsonl per question and RESULT.md beside")
    t.set_defaults(func=cmd_eval_tifa)

    f = e.add_parser("fid", help="FID and KID (torchmetrics) of a folder of images against a reference folder")
    f.add_argument("--real", required=True, metavar="DIR", help="reference images (e.g. held-out renders)")
    f.add_argument("--fake", required=True, metavar="DIR", help="generated images")
    f.add_argument("--features", default="judge", help="feature extractor: judge (shapes world) or inception")
    f.add_argument("--weights", default=None, metavar="FILE",
                   help="inception: the FID weights file (pt_inception-2015-12-05-6726825d.pth; needs torch-fidelity)")
    f.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size (capped at the set sizes)")
    f.add_argument("--seed", type=int, default=0, help="seed of KID's random subsets")
    f.add_argument("--clip-weights", default=None, metavar="FILE",
                   help="also CLIPScore with this open_clip weights file (captions from --fake's metadata.jsonl)")
    f.add_argument("--clip-arch", default="ViT-B-32", help="open_clip architecture of --clip-weights")
    f.add_argument("--out", default=None, metavar="RESULT.json", help="write the numbers here too")
    f.add_argument("--device", default="auto", help="the feature extractor: auto (the first CUDA device if visible, "
                   "else cpu), cpu, cuda, cuda:N, mps")
    f.set_defaults(func=cmd_eval_fid)

    m = e.add_parser("memorization", help="copies among generated images: tiled l2 to the nearest training image "
                     "(Carlini et al. 2023)")
    m.add_argument("--train", required=True, metavar="DIR", help="the source's training images")
    m.add_argument("--images", required=True, metavar="DIR", help="generated images")
    m.add_argument("--threshold", type=float, default=None,
                   help="copy if the score is below this (default: the threshold calibrated on the shapes world)")
    m.add_argument("--tiles", type=int, default=None,
                   help="tiles per side; the distance is the max over tiles (default: 8, the calibrated one)")
    m.add_argument("--k", type=int, default=None,
                   help="relative rule: divide by alpha x the mean distance to the k nearest (Carlini: k=50)")
    m.add_argument("--alpha", type=float, default=0.5, help="relative rule's alpha")
    m.add_argument("--out", default=None, metavar="RESULT.json", help="write the rate and per-image distances here")
    m.set_defaults(func=cmd_eval_memorization)


def add_parsers(sub) -> None:
    e = sub.add_parser("eval", help="evaluation").add_subparsers(dest="eval_cmd", required=True)
    eb = e.add_parser("backbone", help="judge-TIFA and FID of a backbone on held-out captions per domain")
    eb.add_argument("--backbone", default="tiny", help="backbone name or folder")
    eb.add_argument("--domains", default="base,stars,striped", help="comma-separated domains")
    eb.add_argument("--n", type=int, default=200, help="held-out captions per domain")
    eb.add_argument("--steps", type=int, default=25, help="sampling steps")
    eb.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    eb.add_argument("--seed", type=int, default=0, help="sampling seed")
    eb.add_argument("--out", default=None, help="folder for results.json and sample grids")
    add_placement(eb)
    eb.set_defaults(func=cmd_eval_backbone)
    _add_eval_parsers(e)
