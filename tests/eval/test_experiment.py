"""The paper-table experiment: stage pinning, random splits, the claims table, and a smoke run of every stage."""
from __future__ import annotations

import json

import pytest

from eval.experiment import ExperimentConfig, ExperimentError, Stages, write_splits
from eval.experiment_report import PAPER, claims
from prompt_cdm.util.config import ConfigError, load
from prompt_cdm.world.dataset import read_imagefolder, render_domain


def test_stages_refuse_a_folder_with_other_settings(tmp_path):
    cfg = ExperimentConfig(out=str(tmp_path), domains=["stars", "striped"])
    Stages(tmp_path, cfg).run("one", lambda: {"x": 1})
    assert Stages(tmp_path, ExperimentConfig(out=str(tmp_path), domains=["stars", "striped"], threads=1)).run(
        "one", lambda: pytest.fail("a finished stage runs again"))["x"] == 1
    with pytest.raises(ExperimentError, match="n_eval"):
        Stages(tmp_path, ExperimentConfig(out=str(tmp_path), domains=["stars", "striped"], n_eval=3))


def test_config_validates_and_the_recipe_loads():
    with pytest.raises(ValueError, match="forget"):
        ExperimentConfig(domains=["stars", "striped"], forget="dotted")
    with pytest.raises(ConfigError):
        load(ExperimentConfig, "recipes/paper_small.toml", ["n_evall=3"])
    full, smoke = load(ExperimentConfig, "recipes/paper_small.toml"), load(ExperimentConfig, "recipes/paper_small.toml",
                                                                         smoke=True)
    assert full.domain_list == ExperimentConfig().domain_list and len(full.domain_list) == 8
    assert smoke.steps < full.steps and smoke.n_eval < full.n_eval
    sd = load(ExperimentConfig, "recipes/sd15_paper.toml")  # the GPU recipe (not run here) loads and validates
    assert sd.mixed_precision == "fp16" and sd.lora_rank == 8 and sd.domain_list == full.domain_list


def test_random_splits_partition_the_union(tmp_path):
    a, b = render_domain("stars", 7, tmp_path / "stars")[0], render_domain("striped", 5, tmp_path / "striped")[0]
    made = write_splits([a, b], 3, tmp_path / "splits", seed=0)
    rows = [r for m in made for r in read_imagefolder(m)]
    assert len(rows) == 12 and sorted(len(read_imagefolder(m)) for m in made) == [4, 4, 4]
    assert sorted(r["text"] for r in rows) == sorted(r["text"] for f in (a, b) for r in read_imagefolder(f))
    assert write_splits([a, b], 3, tmp_path / "splits", seed=0) == made  # complete splits are kept


def _cells(fid, tifa, credit=None):
    c = {"fid_judge": fid, "score": tifa}
    if credit is not None:
        c.update(true_credit=credit, top1=credit)
    return c


def test_claims_are_checked_against_the_paper_as_measured():
    ev = {"paragon": _cells(20.0, 0.50),
          "domains": {"own": _cells(18.0, 0.55), "uniform": _cells(30.0, 0.40, 0.125),
                      "classifier": _cells(21.0, 0.52, 0.93)},
          "splits": {"uniform": _cells(23.0, 0.45), "classifier": _cells(21.5, 0.47)}}
    fg = {"forget_seconds": 0.1, "router_retrain_seconds": 9.9, "paragon_retrain_seconds": 400.0,
          "fid_before": 21.0, "fid_after": 21.1}
    mem = {"alone": {"copy_rate": 0.30, "wen_mean": 2.0}, "composed": {"copy_rate": 0.10, "wen_mean": 1.0},
           "heldout_floor": 0.02}
    rows = {(r["claim"], r["ours"].split(":")[0]): r["holds"] for r in claims(ev, fg, mem)}
    assert set(k for k, _ in rows) == set(PAPER)
    assert rows[("splits_fid_gap", "classifier")] is True          # 21.5 vs 20: +7.5%
    assert rows[("classifier_vs_uniform", "domains")] is True
    assert rows[("forget", "10.0 s (delete 0.10 s + router retrain 9.9 s) vs paragon retrain 400 s = 40x faster; FID of the rest 21.0 -> 21.1 (+0.5%)")] is True
    assert rows[("tifa", "domain sources (classifier)")] is True    # 0.52 vs 0.50
    assert rows[("memorization", "copy rate alone 0.300 vs composed 0.100 (held-out renders of the same domain")] is True
    ev["splits"]["classifier"] = _cells(25.0, 0.47)                 # +25%: the claim fails, and says so
    fg["fid_after"] = 22.0                                           # +4.8% FID after forgetting
    rows = {r["claim"]: r["holds"] for r in claims(ev, fg, mem)}
    assert rows["splits_fid_gap"] is False and rows["forget"] is False


def test_smoke_experiment_end_to_end(tmp_path):  # ~45 s: every stage of the paper table on a tiny setting
    from prompt_cdm.cli import main

    out = tmp_path / "exp"
    assert main(["experiment", "recipes/paper_small.toml", "--smoke", "--set", f'out="{out}"',
                 "--set", "threads=1"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert {r["claim"] for r in res["claims"]} == set(PAPER)
    att = [r["ours"] for r in res["claims"] if r["claim"] == "attribution"]  # image only, then with the prior
    assert len(att) == 2 and "ito+watch" in att[0] and "classifier+prior" in att[1]
    assert res["forget"]["verify_leftovers"] == [] and (out / "report.md").is_file() and (out / "systems.png").is_file()
    assert main(["experiment", "recipes/paper_small.toml", "--smoke", "--set", f'out="{out}"', "--set",
                 "n_eval=3"]) == 2  # another experiment's folder is refused
