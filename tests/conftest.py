import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def random_tiny():
    """The tiny pipeline with random weights (seeded): fast and independent of shipped weights."""
    from prompt_cdm.backbone.loading import build_tiny, freeze

    return freeze(build_tiny(seed=0))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine OpenMP's barrier
    waits made a 2-thread UNet call ~60x slower than 1 thread (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe():
    """A fresh random tiny pipeline per test module (tests apply adapters to it and clean up)."""
    from prompt_cdm.backbone.loading import build_tiny, fingerprint, freeze

    p = freeze(build_tiny(seed=0))
    p.backbone_fingerprint = fingerprint(p)
    p.backbone_name = "tiny-random"
    return p


@pytest.fixture(scope="module")
def exported(pipe, tmp_path_factory):
    """The bare backbone as a standard folder for plain `StableDiffusionPipeline.from_pretrained`
    (saved before any adapter is applied)."""
    folder = tmp_path_factory.mktemp("backbone") / "pipe"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
