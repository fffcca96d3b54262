"""`prompt-cdm demo` and `prompt-cdm experiment`: the whole story, and the CDM paper's table."""
from __future__ import annotations

from .common import UsageError, _add_recipe_args, _train_errors


def cmd_demo(a) -> None:
    from ..demo import DemoConfig, DemoError, run_demo

    from .fields import build, request_fields

    try:
        cfg = build(DemoConfig, a, request_fields(DemoConfig))
        report = run_demo(cfg)
    except (DemoError, *_train_errors()) as e:
        raise UsageError(str(e)) from None
    print(f"report -> {report}")


def cmd_experiment(a) -> None:
    from eval.experiment import ExperimentConfig, ExperimentError, run_experiment

    from ..util import config

    cfg = config.load(ExperimentConfig, a.recipe, a.overrides, smoke=a.smoke)
    cmd = " ".join(["prompt-cdm experiment", a.recipe] + [f"--set {o}" for o in a.overrides]
                   + (["--smoke"] if a.smoke else []))
    try:
        print(f"report -> {run_experiment(cfg, cmd)}")
    except ExperimentError as e:
        raise UsageError(str(e)) from None


def add_parsers(sub) -> None:
    from ..demo import DemoConfig
    from .fields import add_fields, add_set

    d = sub.add_parser("demo", help="run the whole story on the embedded default; writes images and report.md")
    add_fields(d, DemoConfig)  # --caption-prior / --no-caption-prior, --uncond, ...: every field of DemoConfig
    add_set(d, "demo (demo.DemoConfig)")
    d.set_defaults(func=cmd_demo)
    x = sub.add_parser("experiment", help="the CDM paper's table on the embedded world (resumable; report.md)")
    _add_recipe_args(x)
    x.set_defaults(func=cmd_experiment)
