"""Per-method configuration: a frozen dataclass per method, validated from YAML or a dict.

Every field is declared with :func:`option`, which records its help text and the paper's value::

    @dataclass(frozen=True)
    class Config:
        baseline_decay: float = option(0.9, "Decay of the value tracker.", paper=0.9)
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Mapping, Union

from grpo_plugins.errors import ConfigError


def option(default: Any, help: str, paper: Any = None) -> Any:
    """A config field with its default, its help text and the paper's value (``paper`` defaults to ``default``)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("config defaults must be immutable: use a tuple instead of a list")
    metadata = {"help": help, "paper": default if paper is None else paper}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class NoConfig:
    """This method has no options."""


def describe_config(config_cls: type) -> list[dict[str, Any]]:
    """One dict per field: ``name``, ``type``, ``default``, ``paper``, ``help``."""
    hints = typing.get_type_hints(config_cls)
    return [
        {
            "name": f.name,
            "type": _type_name(hints[f.name]),
            "default": f.default,
            "paper": f.metadata.get("paper", f.default),
            "help": f.metadata.get("help", ""),
        }
        for f in dataclasses.fields(config_cls)
    ]


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
