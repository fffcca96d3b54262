"""prompt_cdm: Compartmentalized Diffusion Models on a frozen Stable Diffusion backbone.

The public API (imported on first use, so `import prompt_cdm` stays light):

    from prompt_cdm import CDMPipeline, ComposeRequest, Registry, load_backbone
    pipe = CDMPipeline(load_backbone("tiny"), registry=Registry("runs/registry"))
    out = pipe(ComposeRequest(prompts=["a red star"], estimator="ito"))
    out.images, out.credit, out.traces_json()

    load_backbone      any diffusers SD folder or hub id, or "tiny" (the embedded default)   backbone.loading.load
    CDMPipeline        composed generation: request -> images, traces, credit             compose.pipeline
    ComposeRequest     one self-validating request                                         compose.request
    Registry           sources, policies, forgetting, router heads                          registry.registry
    train_adapter      one source's adapter (soft prompt or LoRA) on the frozen backbone    training.train
    open_source        the one reader of a source's data (imagefolder, csv, datasets:NAME)  data.sources
    get_estimator      a weight estimator by name                                           estimators
"""
__version__ = "0.1.0"

_MODULES = {  # module -> the public names it provides
    "prompt_cdm.compose.pipeline": ("CDMPipeline", "ComposeResult", "text_to_image"),
    "prompt_cdm.compose.request": ("ComposeRequest", "ComposeError"),
    "prompt_cdm.registry.registry": ("Registry",),
    "prompt_cdm.training.train": ("train_adapter", "TrainConfig"),
    "prompt_cdm.data.sources": ("open_source",),
    "prompt_cdm.estimators": ("get_estimator", "ESTIMATORS"),
}
_API = {name: (module, name) for module, names in _MODULES.items() for name in names}
_API["load_backbone"] = ("prompt_cdm.backbone.loading", "load")
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        import importlib

        module, attr = _API[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'prompt_cdm' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
