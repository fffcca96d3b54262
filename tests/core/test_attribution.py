"""Attribution: the per-step trace recorder, credit, and the JSON form of one image's trace."""
import json

import pytest
import torch

from prompt_cdm.core.attribution import TraceRecorder, credit, final_weights, trace_to_json
from prompt_cdm.estimators import MixOutput

torch.set_num_threads(1)
SOURCES = ["museum", "agency", "customer"]
TRACE = torch.tensor([  # [steps x N x n]: 3 steps, 2 images, 3 sources
    [[1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0]],
    [[0.2, 0.5, 0.3], [0.6, 0.4, 0.0]],
    [[0.0, 1.0, 0.0], [0.7, 0.3, 0.0]],
])


def recorded():
    rec = TraceRecorder()
    for step, (t, w) in enumerate(zip([999, 500, 1], TRACE)):
        # either a bare weights tensor or a MixOutput, as the composed denoiser hands it over
        arg = w if step != 1 else MixOutput(eps=torch.zeros(2, 4), weights=w,
                                            active=torch.ones(2, 3, dtype=torch.bool))
        rec(step, torch.tensor(t), arg)
    return rec


def test_recorder_collects_steps_and_timesteps():
    rec = recorded()
    assert len(rec) == 3 and rec.steps == [0, 1, 2] and rec.timesteps == [999, 500, 1]
    assert rec.weights.shape == (3, 2, 3) and torch.allclose(rec.weights, TRACE)


def test_credit_is_mean_over_steps_and_final_is_last():
    rec = recorded()
    want = torch.tensor([[(1 / 3 + 0.2) / 3, (1 / 3 + 1.5) / 3, (1 / 3 + 0.3) / 3], [0.6, 0.4, 0.0]])
    assert torch.allclose(rec.credit(), want) and torch.allclose(credit(TRACE), want)
    assert torch.allclose(rec.credit().sum(-1), torch.ones(2))  # credit is itself a distribution
    assert torch.equal(rec.final(), TRACE[-1]) and torch.equal(final_weights(TRACE), TRACE[-1])


def test_json_shape_for_one_image():
    rec = recorded()
    d = rec.to_json(SOURCES, index=1)
    assert set(d) == {"sources", "timesteps", "weights", "credit", "final"}
    assert d["sources"] == SOURCES and d["timesteps"] == [999, 500, 1]
    assert len(d["weights"]) == 3 and all(len(r) == 3 for r in d["weights"])
    assert d["weights"][2][0] == pytest.approx(0.7)  # weights[step][i] belongs to sources[i]
    assert d["credit"] == pytest.approx({"museum": 0.6, "agency": 0.4, "customer": 0.0})
    assert d["final"] == pytest.approx({"museum": 0.7, "agency": 0.3, "customer": 0.0})
    assert json.loads(json.dumps(d)) == d  # plain JSON data


def test_trace_to_json_plain_and_by_name():
    d = trace_to_json(SOURCES, [10, 5], [[0.5, 0.5, 0.0], [0.1, 0.9, 0.0]],
                      {"agency": 0.7, "museum": 0.3, "customer": 0.0})
    assert set(d) == {"sources", "timesteps", "weights", "credit"}
    assert list(d["credit"]) == SOURCES  # ordered like sources
    with pytest.raises(ValueError, match=r"\[steps x n\]"):
        trace_to_json(SOURCES, [10], [[0.5, 0.5]], [0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="differ from sources"):
        trace_to_json(SOURCES, [10], [[0.5, 0.5, 0.0]], {"museum": 1.0})
    with pytest.raises(ValueError, match="unique"):
        trace_to_json(["a", "a"], [10], [[0.5, 0.5]], [0.5, 0.5])


def test_recorder_errors():
    rec = TraceRecorder()
    with pytest.raises(ValueError, match="no step"):
        rec.credit()
    rec(0, 999, torch.ones(2, 3) / 3)
    with pytest.raises(ValueError, match="reset"):
        rec(0, 999, torch.ones(2, 3) / 3)  # a second trajectory without reset
    with pytest.raises(ValueError, match="reset"):
        rec(1, 500, torch.ones(1, 3) / 3)
    with pytest.raises(ValueError, match=r"\[N x n\]"):
        rec(1, 500, torch.ones(3) / 3)
    rec.reset()
    rec(0, 999, torch.ones(1, 2) / 2)
    assert rec.weights.shape == (1, 1, 2)
