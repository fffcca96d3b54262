"""Flags generated from the config dataclasses: every field reachable, old spellings kept, --set type-checked."""
import shlex

import pytest

from prompt_cdm.cli import build_parser, main
from prompt_cdm.cli.compose import generate_request
from prompt_cdm.cli.fields import build, request_fields
from prompt_cdm.compose.request import ComposeRequest
from prompt_cdm.demo import DemoConfig


def test_demo_command_round_trips_through_the_demo_parser():
    cfg = DemoConfig(out="x", domains=("stars", "striped"), steps=10, uncond="shared", caption_prior=False,
                     forget="striped", threads=2)
    args = build_parser().parse_args(shlex.split(cfg.command())[1:])
    assert build(DemoConfig, args, request_fields(DemoConfig)) == cfg


def test_generate_flags_make_the_request_and_router_is_estimator(tmp_path):
    argv = ["generate", "--adapter", "a", "--prompt", "a red star", "--router", "ito", "--sparse",
            "--sparse-warmup", "0", "--weights", "a=2,b=1", "--sources", "a,b", "--steps", "7", "--out", "o.png",
            "--set", "temperature=0.5", "--set", "batch_size=4"]
    req = generate_request(build_parser().parse_args(argv))
    assert req == ComposeRequest(["a red star"], sources=["a", "b"], estimator="ito", lambdas={"a": 2.0, "b": 1.0},
                                 sparse=True, sparse_warmup=0.0, steps=7, temperature=0.5, batch_size=4)
    argv[argv.index("--router")] = "--estimator"
    assert generate_request(build_parser().parse_args(argv)) == req


@pytest.mark.parametrize("flags,message", [
    (["--set", "stepz=3"], "unknown config key 'stepz'"),
    (["--set", "steps=many"], "steps"),
    (["--estimator", "magic"], "unknown router 'magic'"),
])
def test_bad_request_flags_are_one_line_before_any_model(tmp_path, capsys, flags, message):
    rc = main(["generate", "--adapter", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "o.png"), *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.png").exists()
