import json

import pytest

from helpers import have_judge_weights, have_tiny_weights

pytestmark = pytest.mark.skipif(not (have_tiny_weights() and have_judge_weights()),
                                reason="shipped tiny backbone or judge weights not present")

# the whole story in miniature: 2 sources of 16 images, 2 training steps, 2 captions, 2 sampling steps
TINY = ["--domains", "stars,striped", "--n-images", "16", "--train-steps", "2", "--router-steps", "5",
        "--n", "2", "--steps", "2"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from prompt_cdm.cli import main

    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), *TINY]) == 0
    return out


def test_demo_writes_report_pictures_and_numbers(small_run):
    out = small_run
    report = (out / "report.md").read_text()
    for fig in ("samples.png", "compose/trace_classifier+prior.png", "compose/trace_ratio.png", "compose/attribution.png",
                "policy.png", "policy_trace.png", "forget.png", "forget_trace.png"):
        assert fig in report, fig
        assert (out / fig).stat().st_size > 1000, fig
    for cmd in ("prompt-cdm train-all", "prompt-cdm router train", "prompt-cdm registry forget",
                "prompt-cdm registry verify", "python -m eval.composition_quality", "## Wall time per stage"):
        assert cmd in report, cmd
    res = json.loads((out / "results.json").read_text())
    cells = res["quality"]["cells"]
    for key in ("frozen/base", "frozen/stars", "own/stars", "classifier+prior/stars", "frozen/striped", "own/striped",
                "classifier+prior/striped"):
        assert 0.0 <= cells[key]["score"] <= 1.0 and cells[key]["fid_judge"] >= 0, key
    credit = cells["classifier+prior/stars"]["mean_credit"]
    assert len(credit) == 2 and abs(sum(credit) - 1) < 1e-4
    # the caption prior is in effect: captions name their own source's words (16 captions per source here, so
    # lambda(c) is far from certain on every caption), and the credit leans to the caption's source (uniform 0.5)
    assert sum(cells[f"classifier+prior/{d}"]["true_credit"] for d in ("stars", "striped")) / 2 > 0.5
    assert "--router classifier --caption-prior" in report
    assert "attribution from the image alone" in report
    assert [t["source"] for t in res["sources"]] == ["stars", "striped"]
    assert set(res["stage_seconds"]) == {"sources", "registry", "samples", "quality", "ratio attribution", "policy",
                                         "forget"}


def test_demo_forgets_the_source_and_enforces_the_policy(small_run):
    from prompt_cdm.registry.registry import Registry, RegistryError

    res = json.loads((small_run / "results.json").read_text())
    fg = res["forget"]
    assert fg["forgotten"] == "stars" and fg["verify"] == [] and fg["paths_naming_it"] == []
    reg = Registry(small_run / "registry_forget")
    assert reg.sources == ["striped"] and reg.verify() == [] and reg.verify_forgotten("stars") == []
    assert not (reg.folder / "adapters" / "stars").exists() and "ratio-stars" not in reg.routers
    with pytest.raises(RegistryError, match="unknown source 'stars'"):
        reg.resolve(["stars"])
    assert "stale" in fg["refusals"]["classifier"]
    # the registry the demo composes from still has both sources (so a re-run can reuse it)
    main_reg = Registry(small_run / "compose" / "registry")
    assert sorted(main_reg.sources) == ["stars", "striped"]
    pol = res["policy"]
    assert pol["allowed"] == ["stars"] and pol["outside"] == "striped" and "not allowed" in pol["refusal"]
    with pytest.raises(RegistryError, match="not allowed by policy"):
        main_reg.resolve(["striped"], "partner")


def test_demo_rerun_reuses_everything(small_run, capsys):
    from prompt_cdm.cli import main

    assert main(["demo", "--out", str(small_run), *TINY]) == 0
    res = json.loads((small_run / "results.json").read_text())
    assert all(t["reused"] for t in res["sources"])
    assert all(v["reused"] for k, v in res["stage_seconds"].items() if k not in ("sources", "registry"))
    assert "reused" in (small_run / "report.md").read_text()


def test_demo_refuses_bad_settings_and_other_runs(small_run, capsys):
    from prompt_cdm.cli import main

    assert main(["demo", "--out", str(small_run), "--domains", "stars,nope"]) == 2
    assert "unknown source domain" in capsys.readouterr().err
    assert main(["demo", "--out", str(small_run), "--domains", "stars,striped", "--forget", "crosses"]) == 2
    assert "--forget crosses" in capsys.readouterr().err
    # the same folder with another number of training steps: refused, nothing retrained silently
    assert main(["demo", "--out", str(small_run), *TINY, "--train-steps", "3"]) == 2
    assert "--train-steps 2" in capsys.readouterr().err


def test_demo_config_without_the_caption_prior():
    from prompt_cdm.demo import DemoConfig

    on, off = DemoConfig(), DemoConfig(caption_prior=False)
    assert (on.route, on.generate_flags) == ("classifier+prior", "--router classifier --caption-prior")
    assert (off.route, off.generate_flags) == ("classifier", "--router classifier")
    assert "--no-caption-prior" in off.command() and "caption-prior" not in on.command()
    assert on.key() != off.key()  # a folder made with the prior is not reused without it


@pytest.mark.slow
def test_demo_full_default(tmp_path):
    from prompt_cdm.cli import main

    assert main(["demo", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["forget"]["verify"] == [] and res["wall_seconds"] < 15 * 60
