"""Method configs: every installed method documents every field; values are validated and converted."""

import dataclasses
from typing import Literal, Optional

import pytest

from grpo_plugins import Composition, ConfigError, option
from grpo_plugins.config import build_config, describe_config
from grpo_plugins.registry import discover

INSTALLED = sorted(discover()[0])


@pytest.mark.parametrize("name", INSTALLED)
def test_every_config_field_has_help_and_paper_value(name):
    cls = discover()[0][name].load()
    assert dataclasses.is_dataclass(cls.Config), f"{name}: Config must be a dataclass"
    assert cls.Config.__dataclass_params__.frozen, f"{name}: Config must be frozen"
    for field in dataclasses.fields(cls.Config):
        assert {"help", "paper"} <= set(field.metadata), f"{name}.{field.name} is not built with grpo_plugins.option()"
        assert field.metadata["help"].strip(), f"{name}.{field.name} has no help text"
    assert cls.summary(), f"{name}: the class needs a docstring (its first line is the one-line help)"


@dataclasses.dataclass(frozen=True)
class Example:
    rate: float = option(0.1, "A rate.", paper=0.2)
    steps: int = option(3, "Steps.")
    flag: bool = option(False, "A flag.")
    mode: Literal["a", "b", 1] = option("a", "A mode.")
    widths: tuple[float, ...] = option((1.0,), "Widths.")
    pair: tuple[int, str] = option((1, "x"), "A pair.")
    limit: Optional[float] = option(None, "An optional limit.")
    weights: dict[str, float] | None = option(None, "Weights by name.")

    def __post_init__(self):
        if self.rate > 1:
            raise ValueError("rate must be <= 1")


def build(**values):
    return build_config(Example, values, "example", "grpo-plugin-example")


def test_values_are_converted():
    config = build(rate=1, widths=[1, 2], pair=[2, "y"], limit=3, weights={"a": 1.0})
    assert config.rate == 1.0 and isinstance(config.rate, float)
    assert config.widths == (1.0, 2.0) and isinstance(config.widths[1], float)
    assert config.pair == (2, "y") and config.limit == 3.0 and config.weights == {"a": 1.0}
    assert build(mode=1).mode == 1 and build().limit is None


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(steps=2.5), "'steps' expects int, got 2.5 (float)"),
        (dict(steps=True), "'steps' expects int, got True (bool)"),
        (dict(flag=1), "'flag' expects bool, got 1 (int)"),
        (dict(rate="0.1"), "'rate' expects float, got '0.1' (str)"),
        (dict(mode="c"), "'mode' expects 'a' | 'b' | 1, got 'c'"),
        (dict(mode=True), "'mode' expects 'a' | 'b' | 1, got True"),
        (dict(widths=[1, "x"]), "'widths' expects"),
        (dict(pair=[1]), "'pair' expects"),
        (dict(weights=[1.0]), "'weights' expects"),
        (dict(rate=2), "invalid config: rate must be <= 1"),
        (dict(rates=0.1), "unknown config key(s) ['rates']; did you mean 'rate'?; valid fields: flag, limit, mode"),
    ],
)
def test_bad_values_name_method_key_and_type(values, message):
    with pytest.raises(ConfigError) as error:
        build(**values)
    assert str(error.value).startswith("method 'example' (distribution grpo-plugin-example): ")
    assert message in str(error.value)


def test_config_instances_and_metadata():
    instance = Example(rate=0.5)
    assert build_config(Example, instance, "example", "x") is instance
    described = {d["name"]: d for d in describe_config(Example)}
    assert described["rate"] == {"name": "rate", "type": "float", "default": 0.1, "paper": 0.2, "help": "A rate."}
    assert described["steps"]["paper"] == 3  # the paper value defaults to the default
    with pytest.raises(TypeError, match="immutable"):
        option([1], "A list default.")


def test_adapter_defaults_are_overridden_by_the_run():
    composition = Composition([{"grpo": {"scale": "none"}}], defaults={"grpo": {"epsilon": 1e-4, "scale": "batch"}})
    assert composition.method("grpo").config.epsilon == 1e-4
    assert composition.method("grpo").config.scale == "none"
    with pytest.raises(ConfigError, match=r"'grpo'.*unknown config key\(s\) \['eps'\]"):
        Composition([], defaults={"grpo": {"eps": 1e-4}})
