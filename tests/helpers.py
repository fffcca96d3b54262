"""Shared test helpers (importable: tests/ is on sys.path under pytest's rootdir conftest)."""


def have_tiny_weights() -> bool:
    from prompt_cdm.backbone import TINY_DIR

    return (TINY_DIR / "unet" / "diffusion_pytorch_model.safetensors").exists()


def have_judge_weights() -> bool:
    from prompt_cdm.world.judge import JUDGE_DIR

    return (JUDGE_DIR / "judge.safetensors").exists()
