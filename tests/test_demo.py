import json

import pytest

from helpers import have_judge_weights, have_tiny_weights

pytestmark = pytest.mark.skipif(not (have_tiny_weights() and have_judge_weights()),
                                reason="shipped tiny backbone or judge weights not present")


def test_demo_small_run_writes_report_and_pictures(tmp_path):
    from prompt_cdm.cli import main

    assert main(["demo", "--out", str(tmp_path), "--n", "4", "--steps", "2"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "judge-TIFA" in report and "samples.png" in report
    res = json.loads((tmp_path / "results.json").read_text())
    for d in ("base", "stars", "striped"):
        r = res["results"][d]
        assert 0.0 <= r["score"] <= 1.0 and r["fid_judge"] >= 0
    assert (tmp_path / "samples.png").stat().st_size > 1000


@pytest.mark.slow
def test_demo_full_default(tmp_path):
    from prompt_cdm.cli import main

    assert main(["demo", "--out", str(tmp_path)]) == 0
