import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# 2 threads on CI's 2 cores; set PROMPT_CDM_TEST_THREADS=1 when the machine is busy with training
torch.set_num_threads(int(os.environ.get("PROMPT_CDM_TEST_THREADS", min(2, os.cpu_count() or 1))))


@pytest.fixture(scope="session")
def random_tiny():
    """The tiny pipeline with random weights (seeded): fast and independent of shipped weights."""
    from prompt_cdm.backbone import build_tiny, freeze

    return freeze(build_tiny(seed=0))


