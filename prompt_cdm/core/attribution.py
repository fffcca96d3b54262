"""Attribution: per-step routing traces -> credit per source (pure: imports only torch + stdlib).

The CDM weights w_i(x_t, t) say how much source i shaped each denoising step (Golatkar et al. 2023,
Fig. 1 and Fig. 3). A trace is the stack of those weights over the steps of one trajectory,
[steps x N x n]; a source's credit is its weight averaged over the steps, and the final-step
weights say which source the sample ended up in. Plotting lives in a separate module.

    rec = TraceRecorder()
    ... each composed step calls rec(step, t, out)    # out: MixOutput or weights [N x n]
    rec.credit()                                        # [N x n]
    rec.to_json(["museum", "agency"], index=0)          # one image, JSON-ready
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .mixing import as_tensor


def _number(v) -> int | float:
    if isinstance(v, torch.Tensor):
        v = v.item()
    f = float(v)
    return int(f) if f.is_integer() and not isinstance(v, float) else f


class TraceRecorder:
    """Per-step callback that collects the routing weights [N x n] and timesteps of a trajectory.

    Call it as `recorder(step, t, weights)` where weights is a [N x n] tensor or anything with a
    `.weights` attribute (a MixOutput). Steps must arrive in increasing order; `reset()` starts a
    new trajectory.
    """

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.timesteps: list[int | float] = []
        self._weights: list[torch.Tensor] = []

    def reset(self) -> None:
        self.steps, self.timesteps, self._weights = [], [], []

    def __call__(self, step: int, t, weights) -> None:
        w = getattr(weights, "weights", weights)
        w = as_tensor(w).detach().to("cpu", torch.float32)
        if w.dim() != 2:
            raise ValueError(f"TraceRecorder: weights must be [N x n], got shape {tuple(w.shape)}")
        if self._weights and w.shape != self._weights[0].shape:
            raise ValueError(f"TraceRecorder: weights of shape {tuple(w.shape)} after "
                             f"{tuple(self._weights[0].shape)}; call reset() between trajectories")
        if self.steps and step <= self.steps[-1]:
            raise ValueError(f"TraceRecorder: step {step} after step {self.steps[-1]}; call "
                             "reset() between trajectories")
        self.steps.append(int(step))
        self.timesteps.append(_number(t))
        self._weights.append(w.clone())

    def __len__(self) -> int:
        return len(self._weights)

    @property
    def weights(self) -> torch.Tensor:
        """The trace [steps x N x n]."""
        if not self._weights:
            raise ValueError("TraceRecorder: no step recorded yet")
        return torch.stack(self._weights)

    def credit(self) -> torch.Tensor:
        """Mean weight over the steps [N x n]."""
        return credit(self.weights)

    def final(self) -> torch.Tensor:
        """The last step's weights [N x n]."""
        return final_weights(self.weights)

    def to_json(self, sources: Sequence[str], index: int = 0) -> dict:
        """The trace of image `index` of the batch as a JSON-ready dict (see `trace_to_json`)."""
        trace = self.weights
        return trace_to_json(sources, self.timesteps, trace[:, index], credit(trace)[index],
                             final=final_weights(trace)[index])


def _check_trace(trace: torch.Tensor) -> torch.Tensor:
    trace = as_tensor(trace)
    if trace.dim() != 3 or trace.shape[0] == 0:
        raise ValueError(f"a trace must be [steps x N x n] with steps >= 1, got shape "
                         f"{tuple(trace.shape)}")
    return trace


def credit(trace: torch.Tensor) -> torch.Tensor:
    """Credit of each source for each image: the trace [steps x N x n] averaged over steps -> [N x n]."""
    return _check_trace(trace).float().mean(dim=0)


def final_weights(trace: torch.Tensor) -> torch.Tensor:
    """The weights at the last step of the trace [steps x N x n] -> [N x n]."""
    return _check_trace(trace)[-1].float()


def trace_to_json(sources: Sequence[str], timesteps: Sequence, weights,
                  credit: Mapping[str, float] | Sequence[float] | torch.Tensor,
                  final: Sequence[float] | torch.Tensor | None = None) -> dict:
    """One image's trace as plain JSON data.

    sources [n] names; timesteps [steps]; weights [steps x n] (weights[step][i] is sources[i]'s);
    credit [n] or {name: value}; final [n] optional (the last step's weights).
    Returns {"sources": [...], "timesteps": [...], "weights": [[...], ...], "credit": {name: x}}
    (+ "final": {name: x} when given).
    """
    names = [str(s) for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"source names must be unique, got {names}")
    w = as_tensor(weights).to(torch.float64)
    if w.dim() != 2 or w.shape[1] != len(names) or w.shape[0] != len(timesteps):
        raise ValueError(f"weights must be [steps x n] = ({len(timesteps)}, {len(names)}), got "
                         f"shape {tuple(w.shape)}")

    def by_name(values, what: str) -> dict[str, float]:
        if isinstance(values, Mapping):
            if set(values) != set(names):
                raise ValueError(f"{what} names {sorted(values)} differ from sources {names}")
            return {n: float(values[n]) for n in names}
        v = as_tensor(values).to(torch.float64).flatten()
        if v.numel() != len(names):
            raise ValueError(f"{what} has {v.numel()} values for {len(names)} sources")
        return dict(zip(names, v.tolist()))

    out = {
        "sources": names,
        "timesteps": [_number(t) for t in timesteps],
        "weights": w.tolist(),
        "credit": by_name(credit, "credit"),
    }
    if final is not None:
        out["final"] = by_name(final, "final")
    return out
