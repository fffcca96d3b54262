import pytest
import torch

from helpers import have_judge_weights
from prompt_cdm.world import examples, questions_for
from prompt_cdm.world.domains import DOMAINS
from prompt_cdm.world.judge import SHAPE_CLASSES, Judge, JudgeNet, attribute_accuracy, spec_targets
from prompt_cdm.world.questions import answer_program


class _Oracle(torch.nn.Module):
    """Emits one-hot logits of given targets: checks the judge's decoding, not its training."""

    def __init__(self, specs):
        super().__init__()
        self.t = spec_targets(specs)
        self.cfg = JudgeNet().cfg

    def forward(self, x):
        n = x.shape[0]
        hot = lambda t, k: torch.nn.functional.one_hot(t.clamp(min=0), k).float()  # noqa: E731
        return {
            "shape": hot(self.t["shape"][:n], len(SHAPE_CLASSES)),
            "color": hot(self.t["color"][:n], 8),
            "size": hot(self.t["size"][:n], 2),
            "background": hot(self.t["background"][:n], 4),
            "style": hot(self.t["style"][:n], 2),
            "features": torch.zeros(n, 4),
        }


def test_read_decodes_targets_exactly():
    exs = [e for d in DOMAINS for e in examples(d, 3, seed=5)]
    judge = Judge(_Oracle([e.spec for e in exs]))
    read = judge.read([e.image for e in exs])
    acc = attribute_accuracy([e.spec for e in exs], read)
    assert all(v == 1.0 for v in acc.values()), acc
    for e, s in zip(exs, read):
        for r in questions_for(e.spec, e.caption, "c"):
            assert answer_program(s, r["program"]) == r["answer"]


def test_attribute_accuracy_detects_errors():
    exs = examples("base", 20, seed=1)
    wrong = [e.spec for e in examples("base", 20, seed=2)]
    acc = attribute_accuracy([e.spec for e in exs], wrong)
    assert acc["position"] < 0.5 and acc["shape"] < 0.6


@pytest.mark.skipif(not have_judge_weights(), reason="shipped judge weights not present")
def test_shipped_judge_reads_heldout_renders_of_every_domain():
    judge = Judge.load()
    for d in DOMAINS:
        exs = examples(d, 60, seed=123, heldout=True)
        acc = attribute_accuracy([e.spec for e in exs], judge.read([e.image for e in exs]))
        assert min(acc.values()) >= 0.98, (d, acc)
