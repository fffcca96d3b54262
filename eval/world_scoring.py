"""Score generated images of the shapes world: judge-TIFA and judge-feature FID against held-out renders.

One place for what every figure of the embedded world does with a set of held-out captions:

    held = heldout(domain, n, seed)                       # the captions (and their specs)
    images = <any generator>([e.caption for e in held])
    res = score_world(judge, domain, held, images)        # {"score", "by_type", "fid_judge", ...}
"""
from __future__ import annotations

import functools

from . import fid, tifa


@functools.lru_cache(maxsize=1)
def shipped_judge():
    """The package's judge, loaded once per process (read-only: eval mode, no gradients)."""
    from prompt_cdm.world.judge import Judge

    return Judge.load()


def heldout(domain: str, n: int, seed: int = 0) -> list:
    """n held-out examples (captions never rendered for training) of `domain`."""
    from prompt_cdm.world.dataset import examples

    return examples(domain, n, seed=seed, heldout=True)


_REF: dict = {}  # (id(judge), domain, n_ref, seed) -> (judge, features): renders + features cost seconds each


def reference_features(judge, domain: str, n_ref: int = 1000, seed: int = 0):
    """Judge features of n_ref held-out renders of `domain` (FID's reference set), disjoint from `heldout`.
    Computed once per judge and settings in a process (the judge is kept alive with them, so its id is not
    reused)."""
    key = (id(judge), domain, n_ref, seed)
    if key not in _REF:
        _REF[key] = (judge, judge.features([e.image for e in heldout(domain, n_ref, seed=seed + 1)]))
    return _REF[key][1]


def score_world(judge, domain: str, held: list, images: list, n_ref: int = 1000, seed: int = 0,
                ref_features=None) -> dict:
    """judge-TIFA of `images` (one per held-out example, same order) and FID against held-out renders."""
    from prompt_cdm.world.questions import answer_program, questions_for

    if len(images) != len(held):
        raise ValueError(f"{len(images)} images for {len(held)} captions")
    recs, owners = [], []
    for k, e in enumerate(held):
        qs = questions_for(e.spec, e.caption, f"{domain}_{k}")
        recs += qs
        owners += [k] * len(qs)
    specs = judge.read(images, domain)
    answers = [answer_program(specs[o], r["program"]) for r, o in zip(recs, owners)]
    res = tifa.score(recs, answers)
    ref = ref_features if ref_features is not None else reference_features(judge, domain, n_ref, seed)
    res["fid_judge"] = fid.frechet_distance(judge.features(images), ref)
    res["read"] = drawn(specs)
    return res


def drawn(specs: list) -> dict[str, dict[str, int]]:
    """What the judge reads in the images, counted: backgrounds, styles and object shapes / colours -- which
    concept an adapter actually draws (e.g. stripes vs any pattern), beside the caption-bound TIFA."""
    from collections import Counter

    objs = [o for s in specs for o in s.objects]
    count = lambda xs: dict(sorted(Counter(xs).items()))  # noqa: E731
    return {"background": count(s.background for s in specs), "style": count(s.style for s in specs),
            "shape": count(o.shape for o in objs), "color": count(o.color for o in objs)}
