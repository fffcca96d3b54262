"""Shared test helpers (importable: tests/ is on sys.path under pytest's rootdir conftest)."""
from contextlib import contextmanager


@contextmanager
def default_device_trap():
    """Torch's default device is `meta` inside the block while the models stay where they are: a tensor made
    without naming its device lands on meta and fails when it meets real data (tests/compose/test_device.py)."""
    import torch

    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def have_tiny_weights() -> bool:
    from prompt_cdm.backbone.loading import TINY_DIR

    return (TINY_DIR / "unet" / "diffusion_pytorch_model.safetensors").exists()


def have_judge_weights() -> bool:
    from prompt_cdm.world.judge import JUDGE_DIR

    return (JUDGE_DIR / "judge.safetensors").exists()


def save_random_adapters(pipe, root, seed: int = 0) -> dict:
    """Saved adapter folders with random (non-zero) weights, as tests/test_registry.py's `adapters`
    fixture makes them: a, b (LoRA ranks 4 and 2), c (soft prompt <cdm-c>, 2 vectors)."""
    import torch

    from prompt_cdm.adapters import LoraAdapter, LoraAdapterConfig, SoftPromptConfig, lora, save_adapter, soft_prompt

    g = torch.Generator().manual_seed(seed)

    def rl(rank):
        fresh = lora.create(pipe, LoraAdapterConfig(rank=rank, alpha=float(rank)))
        return LoraAdapter(fresh.config, {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in fresh.tensors.items()})

    sp = soft_prompt.create(pipe, SoftPromptConfig("<cdm-c>", 2, init_word="star"))
    sp.embeds = sp.embeds + torch.randn(sp.embeds.shape, generator=g)
    return {
        "a": save_adapter(root / "a", rl(4), pipe, source_id="a", data_hash="hash-a"),
        "b": save_adapter(root / "b", rl(2), pipe, source_id="b", data_hash="hash-b"),
        "c": save_adapter(root / "c", sp, pipe, source_id="c", data_hash="hash-c"),
    }
