"""Assembling a composition from a registry: the weight estimator a request names (with the trained
heads it reads from the registry) and the registry's adapters applied to a pipeline.

These sit above the composition layer because they read the registry and the routers' artifacts.
"""
from __future__ import annotations

from typing import Sequence

from ..compose.denoiser import ComposeError, Source
from ..estimators import WeightEstimator


def make_estimator(router: str, names: Sequence[str], lambdas: Sequence[float] | None = None, *,
                   scheduler=None, registry=None, temperature: float = 1.0) -> tuple[WeightEstimator, bool]:
    """The weight estimator named `router` for sources `names` -> (estimator, router_context).

    uniform / fixed / ito need nothing trained (ito checks that `scheduler` is stochastic);
    classifier / ratio read their trained heads from the `registry` (routers.py). lambdas: the
    mixing prior (fixed: the mixture itself). Bad combinations raise ComposeError."""
    from ..estimators import ESTIMATORS, get_estimator
    from ..registry.registry import RegistryError

    if router not in ESTIMATORS:
        raise ComposeError(f"unknown router {router!r}; valid: {', '.join(sorted(ESTIMATORS))}")
    if router == "fixed" and lambdas is None:
        raise ComposeError("router 'fixed' needs weights: one non-negative number per composed source "
                           "(e.g. a=2,b=1); use router 'uniform' for equal weights")
    kw: dict = {} if lambdas is None else {"lambdas": list(lambdas)}
    try:
        if router in ("uniform", "fixed"):
            return get_estimator(router, **kw), False
        if temperature != 1.0:
            kw["temperature"] = temperature
        if router in ("ito", "path"):  # trajectory estimators: the sampler must be stochastic
            name = type(scheduler).__name__ if scheduler is not None else None
            return get_estimator(router, scheduler=name, **kw), False
        if registry is None:
            raise ComposeError(f"router {router!r} needs trained heads: compose from a registry (--registry) "
                               "that holds them (`prompt-cdm router train`)")
        from .routers import score_fn_from_registry

        score_fn, extra = score_fn_from_registry(registry, router, list(names))
        return get_estimator(router, score_fn=score_fn, **kw, **extra), True
    except (ComposeError, RegistryError):
        raise
    except ValueError as e:  # the estimators' own refusals (ito + deterministic sampler, lambdas, ...)
        raise ComposeError(str(e)) from None


def load_sources(pipe, adapter_dirs: Sequence | None = None, registry=None,
                 names: Sequence[str] | None = None) -> tuple[list[Source], list]:
    """Apply the composed adapters to `pipe` -> ([Source], [LoadedAdapter]): the folders `adapter_dirs`, or the
    registry's sources `names` (each LoRA under its registry name). All or nothing: on a refusal
    the ones already applied are removed again."""
    from ..adapters import load_adapter

    if registry is not None:
        fp = getattr(pipe, "backbone_fingerprint", None)
        if fp != registry.backbone["fingerprint"]:
            from ..registry.registry import RegistryError

            raise RegistryError(f"the registry's sources were trained on backbone {registry.backbone['fingerprint']} "
                                f"({registry.backbone['name']}); this pipeline is {fp} -- pass --backbone "
                                f"{registry.backbone['name']}")
        todo = [(registry.adapter_dir(n), n) for n in (names or registry.sources)]
    else:
        todo = [(d, None) for d in adapter_dirs or []]
    if not todo:
        raise ComposeError("no adapter to compose")
    loaded = []
    try:
        for folder, name in todo:
            loaded.append(load_adapter(folder, pipe, name=name))
    except BaseException:
        for h in reversed(loaded):
            h.remove()
        raise
    sources = [Source.from_adapter(h) for h in loaded]
    if registry is not None:  # trace names are registry names (a source id may differ)
        sources = [Source(n, s.kind, s.handle, s.text_lora) for s, (_, n) in zip(sources, todo)]
    return sources, loaded
