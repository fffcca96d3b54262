import math

import pytest
import torch

from eval.fid import frechet_distance
from eval.tifa import score


def test_tifa_mean_per_caption_then_over_captions():
    recs = [
        {"caption_id": "a", "caption": "x", "question": "q", "choices": ["yes", "no"], "answer": "yes", "element_type": "object"},
        {"caption_id": "a", "caption": "x", "question": "q", "choices": ["yes", "no"], "answer": "no", "element_type": "color"},
        {"caption_id": "b", "caption": "y", "question": "q", "choices": ["yes", "no"], "answer": "yes", "element_type": "object"},
    ]
    r = score(recs, ["yes", "yes", "yes"])
    assert r["score"] == pytest.approx((0.5 + 1.0) / 2)
    assert r["by_type"] == {"color": 0.0, "object": 1.0}
    with pytest.raises(ValueError):
        score(recs, ["yes"])


def test_fid_zero_for_same_and_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    b = a * 2 + 1  # mu_b = 2 mu_a + 1, S_b = 4 S_a: FID = |mu_a + 1|^2 + tr(S_a + 4 S_a - 2 * 2 S_a)
    expected = (a.mean(0) + 1).square().sum() + torch.trace(torch.cov(a.T))
    assert frechet_distance(a, b) == pytest.approx(float(expected), rel=1e-6)
    assert math.isfinite(frechet_distance(torch.randn(10, 50), torch.randn(12, 50)))


def test_score_world_on_the_renders_themselves_reads_what_was_drawn():
    """Held-out renders scored as if generated: TIFA is the judge's accuracy (1.0 on renders) and `read`
    counts what is drawn -- every striped render read as striped, every object's shape."""
    from helpers import have_judge_weights

    if not have_judge_weights():
        pytest.skip("shipped judge weights not present")
    from eval.world_scoring import heldout, score_world, shipped_judge

    judge = shipped_judge()
    held = heldout("striped", 12, seed=3)
    res = score_world(judge, "striped", held, [e.image for e in held], n_ref=64, seed=3)
    assert res["score"] > 0.95
    assert res["read"]["background"] == {"striped": 12}
    assert res["read"]["style"] == {"flat": 12}
    shapes = {}
    for e in held:
        for o in e.spec.objects:
            shapes[o.shape] = shapes.get(o.shape, 0) + 1
    assert res["read"]["shape"] == dict(sorted(shapes.items()))


def test_composition_summary_keeps_the_routers_of_earlier_runs():
    """A second `eval.composition_quality` run on the same folder adds routers: the summary covers every router
    whose cells the folder holds, this run's first, means over the domains it has."""
    from eval.composition_quality import summarize

    cell = lambda s, f: {"score": s, "fid_judge": f, "seconds": 1.0}  # noqa: E731
    cells = {"own/a": cell(0.5, 10.0), "old/a": cell(0.2, 30.0), "old/b": cell(0.4, 50.0), "new/a": cell(0.6, 20.0)}
    out = summarize(cells, ["a", "b"], ["new"])
    assert list(out) == ["own", "new", "old"]
    assert abs(out["old"]["score"] - 0.3) < 1e-12
    assert out["old"]["fid_judge"] == 40.0 and out["old"]["domains"] == 2 and out["new"]["domains"] == 1
