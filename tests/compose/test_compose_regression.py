"""Regression numbers of the composed sampler (STYLE.md habit 8): the random tiny backbone (seed 0), three
random adapters (two LoRAs, one soft prompt), two prompts, six steps, one `CDMPipeline` call per
estimator. A change to the composition's rows, mixing, guidance, seeding or the Ito estimator's
bookkeeping moves these numbers; the parity tests say which of them is still right."""
import pytest

from helpers import save_random_adapters
from prompt_cdm.backbone.loading import build_tiny, freeze
from prompt_cdm.compose.pipeline import CDMPipeline
from prompt_cdm.compose.request import ComposeRequest

# measured once with torch 2.14.1 (sum and mean |x| of the final latents, credit of each source)
EXPECTED = {
    "uniform": (-2781.555908203125, 13.088995933532715, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}),
    "ito": (-2611.58056640625, 13.058465003967285, {"a": 0.8835800886154175, "b": 0.060654910281300545,
                                                    "c": 0.05576500482857227}),
}


@pytest.fixture(scope="module")
def cdm(tmp_path_factory):
    pipe = freeze(build_tiny(seed=0))
    root = tmp_path_factory.mktemp("regression")
    save_random_adapters(pipe, root)
    with CDMPipeline(pipe, adapters=[root / "a", root / "b", root / "c"]) as p:
        yield p


@pytest.mark.parametrize("estimator", sorted(EXPECTED))
def test_composed_sampler_regression_numbers(cdm, estimator):
    total, mean_abs, credit = EXPECTED[estimator]
    res = cdm(ComposeRequest(["a red circle", "a blue square on the left"], estimator=estimator, steps=6, seed=3),
              output_type="latent")
    assert abs(res.images.sum().item() - total) <= 1e-4 * abs(total)
    assert abs(res.images.abs().mean().item() - mean_abs) <= 1e-5 * mean_abs
    assert res.credit == pytest.approx(credit, abs=1e-4)
    assert res.rows_per_step == [[2 * 4] * 6]  # shared uncond: n + 1 = 4 rows per image, every step
