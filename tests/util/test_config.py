"""Dataclass configs: strict from_dict, typed overrides, TOML round trip, load errors."""
from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from typing import Literal

import pytest

from prompt_cdm.util.config import ConfigError, apply_overrides, from_dict, load, to_dict, to_json, to_toml


# Module level (not inside tests): config resolves string annotations via the module globals.
@dataclass
class Optim:
    lr: float = 1e-3
    steps: int = 10
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError("optim.lr must be > 0")


@dataclass
class Data:
    domain: str = "base"
    domains: list[str] = field(default_factory=lambda: ["base"])
    limit: int | None = None
    mode: Literal["train", "eval"] = "train"
    seeds: tuple[int, ...] = (0,)


@dataclass
class Cfg:
    name: str = "run"
    seed: int = 0
    verbose: bool = False
    scale: float = 1.0
    optim: Optim = field(default_factory=Optim)
    data: Data = field(default_factory=Data)


TOP_KEYS = ["name", "seed", "verbose", "scale", "optim", "data"]


def _non_default() -> Cfg:
    return Cfg(
        name="exp 1",
        seed=7,
        verbose=True,
        scale=2.5,
        optim=Optim(lr=1e-4, steps=3, betas=(0.5, 0.75)),
        data=Data(domain="stars", domains=["stars", "crosses"], limit=12, mode="eval", seeds=(1, 2, 3)),
    )


# ---------------------------------------------------------------- from_dict


def test_from_dict_builds_nested_and_defaults():
    cfg = from_dict(Cfg, {"seed": 3, "optim": {"lr": 0.5}, "data": {"seeds": [4, 5]}})
    assert cfg == Cfg(seed=3, optim=Optim(lr=0.5), data=Data(seeds=(4, 5)))
    assert isinstance(cfg.optim, Optim) and isinstance(cfg.data.seeds, tuple)
    assert from_dict(Cfg, {}) == Cfg()
    # an int where a float is expected is fine and becomes a float
    cfg = from_dict(Cfg, {"scale": 2, "optim": {"lr": 1}})
    assert cfg.scale == 2.0 and isinstance(cfg.scale, float) and isinstance(cfg.optim.lr, float)


def test_from_dict_refuses_unknown_keys_and_lists_valid_ones():
    with pytest.raises(ConfigError) as ei:
        from_dict(Cfg, {"sed": 1})
    msg = str(ei.value)
    assert "'sed'" in msg
    for k in TOP_KEYS:
        assert k in msg
    with pytest.raises(ConfigError) as ei:
        from_dict(Cfg, {"optim": {"learning_rate": 1e-3}})
    msg = str(ei.value)
    assert "optim.learning_rate" in msg
    for k in ("optim.lr", "optim.steps", "optim.betas"):
        assert k in msg


@pytest.mark.parametrize(
    "data, where",
    [
        ({"seed": "3"}, "seed"),  # string for int
        ({"seed": True}, "seed"),  # bool for int
        ({"seed": 1.5}, "seed"),  # float for int
        ({"scale": "1.0"}, "scale"),  # string for float
        ({"scale": False}, "scale"),  # bool for float
        ({"verbose": 1}, "verbose"),  # int for bool
        ({"name": 3}, "name"),  # int for str
        ({"optim": {"steps": "ten"}}, "optim.steps"),  # nested
        ({"optim": 5}, "optim"),  # scalar for a section
        ({"optim": {"betas": [0.9]}}, "optim.betas"),  # wrong tuple length
        ({"optim": {"betas": 0.9}}, "optim.betas"),  # scalar for a list
        ({"data": {"limit": "all"}}, "data.limit"),  # optional int
        ({"data": {"mode": "test"}}, "data.mode"),  # not one of the Literal's values
        ({"data": {"domains": ["a", 1]}}, "data.domains"),  # bad list item
        ({"data": {"seeds": [1, "2"]}}, "data.seeds"),  # bad variadic-tuple item
    ],
)
def test_type_errors_raise_config_error_naming_the_key(data, where):
    with pytest.raises(ConfigError) as ei:
        from_dict(Cfg, data)
    assert where in str(ei.value)


def test_optional_accepts_none():
    assert from_dict(Cfg, {"data": {"limit": None}}).data.limit is None
    assert from_dict(Cfg, {"data": {"limit": 4}}).data.limit == 4


def test_post_init_validation_surfaces_as_config_error():
    with pytest.raises(ConfigError, match="lr must be > 0"):
        from_dict(Cfg, {"optim": {"lr": 0}})
    with pytest.raises(ConfigError, match="lr must be > 0"):
        from_dict(Optim, {"lr": -1.0})
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------- overrides


def test_overrides_parse_toml_values_on_nested_keys():
    base = Cfg()
    cfg = apply_overrides(
        base,
        [
            "optim.lr=1e-4",
            "optim.steps=20",
            "optim.betas=[0.8, 0.95]",
            "verbose=true",
            "scale=3",
            "name=hello",  # bare word -> string
            'data.domain="stars"',  # quoted TOML string
            "data.domains=['a', 'b']",
            "data.limit=5",
            "data.mode=eval",
            " seed = 42 ",  # whitespace around key and value is ignored
        ],
    )
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.steps == 20 and cfg.optim.betas == (0.8, 0.95)
    assert cfg.verbose is True and cfg.scale == 3.0 and isinstance(cfg.scale, float)
    assert cfg.name == "hello" and cfg.data.domain == "stars" and cfg.data.domains == ["a", "b"]
    assert cfg.data.limit == 5 and cfg.data.mode == "eval" and cfg.seed == 42
    assert base == Cfg()  # the input is not modified
    # later overrides win; untouched fields keep their values
    cfg2 = apply_overrides(cfg, ["seed=1", "seed=2"])
    assert cfg2.seed == 2 and cfg2.optim == cfg.optim
    assert apply_overrides(base, None) == base and apply_overrides(base, []) == base


def test_override_value_with_equals_sign_and_spaces():
    cfg = apply_overrides(Cfg(), ["name=a=b c"])
    assert cfg.name == "a=b c"


@pytest.mark.parametrize(
    "item, where",
    [
        ("seed=abc", "seed"),  # string for int
        ("seed=true", "seed"),  # bool for int
        ("verbose=1", "verbose"),  # int for bool
        ("optim.steps=1.5", "optim.steps"),
        ("optim.betas=[1, 2, 3]", "optim.betas"),
        ("data.mode=test", "data.mode"),
    ],
)
def test_override_type_errors(item, where):
    with pytest.raises(ConfigError) as ei:
        apply_overrides(Cfg(), [item])
    assert where in str(ei.value)


def test_unknown_override_keys_name_the_valid_ones():
    with pytest.raises(ConfigError) as ei:
        apply_overrides(Cfg(), ["optim.lrr=1e-4"])
    msg = str(ei.value)
    assert "optim.lrr" in msg and "'lrr'" in msg
    for k in ("lr", "steps", "betas"):
        assert k in msg
    with pytest.raises(ConfigError) as ei:
        apply_overrides(Cfg(), ["sede=1"])
    msg = str(ei.value)
    assert "sede" in msg
    for k in TOP_KEYS:
        assert k in msg
    with pytest.raises(ConfigError) as ei:
        apply_overrides(Cfg(), ["nope.lr=1"])
    assert "nope" in str(ei.value)


def test_malformed_overrides():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(Cfg(), ["seed"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides(Cfg(), ["seed.x=1"])
    with pytest.raises(ConfigError, match="lr must be > 0"):
        apply_overrides(Cfg(), ["optim.lr=-1"])


# ---------------------------------------------------------------- serialization and load


def test_toml_round_trip():
    for cfg in (Cfg(), _non_default()):
        text = to_toml(cfg)
        assert from_dict(Cfg, tomllib.loads(text)) == cfg
        assert from_dict(Cfg, json.loads(to_json(cfg))) == cfg
    d = to_dict(_non_default())
    assert d["optim"]["betas"] == [0.5, 0.75] and d["data"]["seeds"] == [1, 2, 3]  # tuples -> lists
    assert "limit" not in tomllib.loads(to_toml(Cfg()))["data"]  # None has no TOML form: omitted


def test_load_file_and_overrides(tmp_path):
    p = tmp_path / "recipe.toml"
    p.write_text(to_toml(_non_default()))
    assert load(Cfg, p) == _non_default()
    assert load(Cfg, str(p), overrides=["seed=9"]) == apply_overrides(_non_default(), ["seed=9"])
    assert load(Cfg) == Cfg() and load(Cfg, overrides=["optim.lr=0.5"]).optim.lr == 0.5
    p.write_text("seed = 1\ntop = 1\n")
    with pytest.raises(ConfigError, match="'top'"):  # unknown keys in a file are refused too
        load(Cfg, p)


def test_load_smoke_table(tmp_path):
    p = tmp_path / "recipe.toml"
    p.write_text(
        'seed = 5\nname = "full"\n[optim]\nlr = 0.01\nsteps = 1000\n'
        '[smoke]\nname = "smoke"\noptim = { steps = 2 }\n'
    )
    full = load(Cfg, p)  # the [smoke] table is ignored without smoke=True
    assert full.name == "full" and full.optim.steps == 1000 and full.optim.lr == 0.01 and full.seed == 5
    smoke = load(Cfg, p, smoke=True)  # ...and deep-merged over the recipe with it
    assert smoke.name == "smoke" and smoke.optim.steps == 2 and smoke.optim.lr == 0.01 and smoke.seed == 5
    assert load(Cfg, p, overrides=["optim.steps=3"], smoke=True).optim.steps == 3  # overrides win
    q = tmp_path / "nosmoke.toml"
    q.write_text("seed = 1\n")
    with pytest.raises(ConfigError, match=r"no \[smoke\] section"):
        load(Cfg, q, smoke=True)


def test_load_missing_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as ei:
        load(Cfg, missing)
    assert str(missing) in str(ei.value) and "does not exist" in str(ei.value)


@pytest.mark.parametrize("content", ["seed = = 3\n", "[optim\nlr = 1\n", b"seed = 1\nname = '\xff\xfe'\n"])
def test_load_invalid_toml(tmp_path, content):
    p = tmp_path / "bad.toml"
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content)
    with pytest.raises(ConfigError) as ei:
        load(Cfg, p)
    assert str(p) in str(ei.value) and "not valid TOML" in str(ei.value)


def test_load_surfaces_validation_errors(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text("[optim]\nlr = 0.0\n")
    with pytest.raises(ConfigError, match="lr must be > 0"):
        load(Cfg, p)
    p.write_text("seed = 'three'\n")
    with pytest.raises(ConfigError, match="seed"):
        load(Cfg, p)


def test_shipped_recipe_loads():
    """The pretraining recipe in recipes/ parses and validates, with and without its [smoke] table."""
    from pathlib import Path

    pretrain = pytest.importorskip("prompt_cdm.backbone.pretrain")
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "tiny_backbone.toml"
    if not recipe.exists():
        pytest.skip("recipes/tiny_backbone.toml not present")
    full = load(pretrain.PretrainConfig, recipe)
    smoke = load(pretrain.PretrainConfig, recipe, smoke=True)
    assert isinstance(full, pretrain.PretrainConfig) and isinstance(smoke, pretrain.PretrainConfig)
    assert smoke.unet.steps < full.unet.steps and smoke.vae.steps < full.vae.steps
    assert smoke.out != full.out  # a smoke run never writes over the real run's folder
