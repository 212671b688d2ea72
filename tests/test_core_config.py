"""Method configs: every installed method documents every field; values are validated and converted."""

import dataclasses
from typing import Literal, Optional

import pytest

from grpo_plugins import FINITE, NON_NEGATIVE, POSITIVE, UNIT, Composition, ConfigError, Range, option
from grpo_plugins.config import build_config, describe_config, undeclared_domains
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


@pytest.mark.parametrize("name", INSTALLED)
def test_every_numeric_option_declares_a_domain_that_holds_its_defaults(name):
    cls = discover()[0][name].load()
    assert undeclared_domains(cls.Config) == [], f"{name}: numeric options without domain=..."
    for field in dataclasses.fields(cls.Config):  # the defaults and the paper's values lie in the domain
        build_config(cls.Config, {field.name: field.default}, name, "x")
        paper = field.metadata["paper"]
        if isinstance(paper, type(field.default)) and not isinstance(field.default, str):
            build_config(cls.Config, {field.name: paper}, name, "x")


@dataclasses.dataclass(frozen=True)
class Example:
    rate: float = option(0.1, "A rate.", paper=0.2, domain=UNIT)
    steps: int = option(3, "Steps.", domain=Range(1, 10))
    flag: bool = option(False, "A flag.")
    mode: Literal["a", "b", 1] = option("a", "A mode.")
    widths: tuple[float, ...] = option((1.0,), "Widths.", domain=POSITIVE)
    pair: tuple[int, str] = option((1, "x"), "A pair.", domain=NON_NEGATIVE)
    limit: Optional[float] = option(None, "An optional limit.", domain=FINITE)
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
        (dict(rate=2), "'rate' must lie in [0, 1], got 2.0"),
        (dict(rate=-0.5), "'rate' must lie in [0, 1], got -0.5"),
        (dict(steps=0), "'steps' must lie in [1, 10], got 0"),
        (dict(widths=[1.0, 0.0]), "'widths' item 1 must lie in (0, inf), got 0.0"),
        (dict(pair=[-1, "x"]), "'pair' item 0 must lie in [0, inf), got -1"),
        (dict(limit=float("nan")), "'limit' must be finite, got nan"),
        (dict(limit=float("inf")), "'limit' must be finite, got inf"),
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
    assert described["rate"] == {
        "name": "rate", "type": "float", "default": 0.1, "paper": 0.2, "domain": "[0, 1]", "help": "A rate."
    }
    assert described["steps"]["paper"] == 3  # the paper value defaults to the default
    assert described["widths"]["domain"] == "(0, inf)" and described["mode"]["domain"] == "'a' | 'b' | 1"
    assert described["flag"]["domain"] == "bool"
    with pytest.raises(TypeError, match="immutable"):
        option([1], "A list default.")


def test_several_domain_errors_are_reported_at_once():
    with pytest.raises(ConfigError) as error:
        build(rate=-1, steps=11)
    assert "'rate' must lie in [0, 1]" in str(error.value) and "'steps' must lie in [1, 10]" in str(error.value)


def test_a_numeric_option_without_domain_is_found():
    @dataclasses.dataclass(frozen=True)
    class Loose:
        scale: float = option(1.0, "No domain.")
        flag: bool = option(True, "Bounded by its type.")
        sizes: tuple[int, ...] = option((1,), "No domain either.")

    assert undeclared_domains(Loose) == ["scale", "sizes"]
    with pytest.raises(TypeError, match="Range"):
        option(1.0, "Bad domain.", domain=(0, 1))


@pytest.mark.parametrize(
    "methods, culprit",
    [
        ([{"grpo": {"epsilon": -1}}], "'epsilon' must lie in [0, inf)"),  # flips the sign of every advantage
        ([{"grpo": {"epsilon": float("nan")}}], "'epsilon' must be finite"),
    ],
)
def test_out_of_domain_values_are_refused_at_start_up(methods, culprit):
    with pytest.raises(ConfigError) as error:
        Composition(methods)
    assert "method 'grpo'" in str(error.value) and culprit in str(error.value)


def test_adapter_defaults_are_overridden_by_the_run():
    composition = Composition([{"grpo": {"scale": "none"}}], defaults={"grpo": {"epsilon": 1e-4, "scale": "batch"}})
    assert composition.method("grpo").config.epsilon == 1e-4
    assert composition.method("grpo").config.scale == "none"
    with pytest.raises(ConfigError, match=r"'grpo'.*unknown config key\(s\) \['eps'\]"):
        Composition([], defaults={"grpo": {"eps": 1e-4}})
