"""Per-method configuration: a frozen dataclass per method, validated from YAML or a dict.

Every field is declared with :func:`option`, which records its help text, the paper's value and its
domain (the values that make sense; a value outside it is refused at start-up)::

    @dataclass(frozen=True)
    class Config:
        baseline_decay: float = option(0.9, "Decay of the value tracker.", paper=0.9, domain=Range(0, 1))

Numeric options (``int``, ``float``, tuples of them) must declare a domain; ``bool``, ``Literal`` and
``str`` options are bounded by their type. Shorthands: :data:`POSITIVE` ``(0, inf)``,
:data:`NON_NEGATIVE` ``[0, inf)``, :data:`UNIT` ``[0, 1]``, :data:`FINITE` (any finite number).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Mapping, Union

from grpo_plugins.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Range:
    """The domain of a numeric option: finite numbers between ``low`` and ``high``.

    ``None`` leaves a side unbounded; ``low_open`` / ``high_open`` exclude the bound itself. Every
    number must be finite (no NaN, no inf) unless ``allow_inf`` is set. For a tuple option the domain
    applies to every item.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    allow_inf: bool = False

    def problem(self, value: Any) -> str | None:
        """Why ``value`` (a number) lies outside the domain, or None."""
        number = float(value)
        if number != number or (number in (float("inf"), float("-inf")) and not self.allow_inf):
            return f"must be finite, got {value!r}"
        if self.low is not None and (number < self.low or (self.low_open and number == self.low)):
            return f"must lie in {self}, got {value!r}"
        if self.high is not None and (number > self.high or (self.high_open and number == self.high)):
            return f"must lie in {self}, got {value!r}"
        return None

    def __str__(self) -> str:
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        return f"{left}{low}, {high}{right}"


POSITIVE = Range(0, None, low_open=True)
NON_NEGATIVE = Range(0, None)
UNIT = Range(0, 1)
FINITE = Range()


def option(default: Any, help: str, paper: Any = None, domain: Range | None = None) -> Any:
    """A config field with its default, its help text, the paper's value (``paper`` defaults to
    ``default``) and its ``domain`` (required for numeric options; see :class:`Range`)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("config defaults must be immutable: use a tuple instead of a list")
    if domain is not None and not isinstance(domain, Range):
        raise TypeError(f"domain must be a grpo_plugins.config.Range, got {type(domain).__name__}")
    metadata = {"help": help, "paper": default if paper is None else paper, "domain": domain}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class NoConfig:
    """This method has no options."""


def describe_config(config_cls: type) -> list[dict[str, Any]]:
    """One dict per field: ``name``, ``type``, ``default``, ``paper``, ``domain`` (text), ``help``."""
    hints = typing.get_type_hints(config_cls)
    return [
        {
            "name": f.name,
            "type": _type_name(hints[f.name]),
            "default": f.default,
            "paper": f.metadata.get("paper", f.default),
            "domain": describe_domain(f, hints[f.name]),
            "help": f.metadata.get("help", ""),
        }
        for f in dataclasses.fields(config_cls)
    ]


def describe_domain(field: dataclasses.Field, annotation: Any) -> str | None:
    """The field's domain as text (``"(0, inf)"``, ``"'a' | 'b'"``, ``"bool"``), or None when a numeric
    field declares none."""
    domain = field.metadata.get("domain")
    if domain is not None:
        return str(domain)
    return None if _is_numeric(annotation) else _type_name(annotation)


def undeclared_domains(config_cls: type) -> list[str]:
    """Names of the numeric fields of ``config_cls`` that declare no domain (each must declare one)."""
    hints = typing.get_type_hints(config_cls)
    return [
        f.name for f in dataclasses.fields(config_cls)
        if f.metadata.get("domain") is None and _is_numeric(hints[f.name])
    ]


def _is_numeric(annotation: Any) -> bool:
    """Whether ``annotation`` admits an int or a float (directly, in a union or as a tuple's items)."""
    if annotation in (int, float):
        return True
    return any(_is_numeric(arg) for arg in typing.get_args(annotation) if arg is not Ellipsis)


def _domain_problem(value: Any, domain: Range | None) -> str | None:
    """Why ``value`` (a number, a tuple of numbers, None or another value) lies outside ``domain``."""
    if domain is None or value is None or isinstance(value, (bool, str)):
        return None
    if isinstance(value, tuple):
        for i, item in enumerate(value):
            problem = _domain_problem(item, domain)
            if problem:
                return f"item {i} {problem}"
        return None
    if isinstance(value, (int, float)):
        return domain.problem(value)
    return None


def build_config(config_cls: type, values: Mapping[str, Any] | None, method: str, distribution: str) -> Any:
    """Validate ``values`` against ``config_cls`` and build the frozen config.

    Raises:
        ConfigError: an unknown key (the message lists the valid fields) or a value of the wrong type.
    """
    if isinstance(values, config_cls):
        return values
    values = dict(values or {})
    hints = typing.get_type_hints(config_cls)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    where = f"method '{method}' (distribution {distribution})"
    unknown = sorted(set(values) - fields)
    if unknown:
        valid = ", ".join(sorted(fields)) or "none: this method takes no options"
        close = [c for key in unknown for c in difflib.get_close_matches(str(key), fields, n=1, cutoff=0.6)]
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"{where}: unknown config key(s) {unknown}{hint}; valid fields: {valid}")
    checked = {}
    for key, value in values.items():
        ok, converted = _check(value, hints[key])
        if not ok:
            raise ConfigError(
                f"{where}: config key '{key}' expects {_type_name(hints[key])}, got {value!r} "
                f"({type(value).__name__})"
            )
        checked[key] = converted
    domains = {f.name: f.metadata.get("domain") for f in dataclasses.fields(config_cls)}
    problems = [
        f"config key '{key}' {problem}"
        for key, value in checked.items()
        if (problem := _domain_problem(value, domains[key]))
    ]
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
    try:
        return config_cls(**checked)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{where}: invalid config: {error}") from error


def _check(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits ``annotation``, and the value converted (int -> float, list -> tuple)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return True, value
    if origin is Literal:
        return any(value == arg and type(value) is type(arg) for arg in args), value
    if origin in (Union, types.UnionType):
        for arg in args:
            ok, converted = _check(value, arg)
            if ok:
                return True, converted
        return False, value
    if annotation is type(None):
        return value is None, value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if annotation is str:
        return isinstance(value, str), value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            return False, value
        results = [_check(item, item_type) for item, item_type in zip(value, item_types)]
        return all(ok for ok, _ in results), tuple(converted for _, converted in results)
    if origin is not None:  # another parameterised generic (e.g. dict[str, float]): check the container only
        return isinstance(value, origin), value
    return isinstance(value, annotation), value


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")
