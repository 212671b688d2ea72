"""Building a run from its method list: parse the list, load and configure each method, register it
with pluggy, and collect every hook's implementations in the run's configured order.

Everything here happens at start-up; every mistake is a :class:`CompositionError` naming the method
(and its distribution) before any training.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import pluggy

from grpo_plugins import hookspecs
from grpo_plugins.batch import GRPOBatch
from grpo_plugins.api import check_supported
from grpo_plugins.config import build_config
from grpo_plugins.errors import CompositionError
from grpo_plugins.method import Method
from grpo_plugins.registry import disabled_names, resolve

BUILTIN_DISTRIBUTION = "grpo-plugins"
MethodSpec = str | Mapping[str, Any] | Method
ORDER_OPTIONS = ("tryfirst", "trylast", "wrapper", "hookwrapper", "optionalhook")
"""pluggy hookimpl options the core refuses: the order of methods is the run's configured order, and
every hook implementation must name a hook of the spec."""


@dataclass(frozen=True)
class EnabledMethod:
    """One enabled method: its instance and where it comes from."""

    name: str
    distribution: str
    version: str
    method: Method
    builtin: bool = False


def parse_specs(specs: Iterable[MethodSpec] | MethodSpec | None) -> list[tuple[str, Any]]:
    """Normalise a run's method list to ``[(name, config dict | Method instance)]``.

    Accepts ``"spo"``, ``{"spo": {...}}``, ``{"spo": None}`` or a ``Method`` instance per item. A
    single name or ``Method`` instead of a list is one method (``plugins="spo"``).
    """
    if isinstance(specs, (str, Method)):
        specs = [specs]
    elif isinstance(specs, Mapping):
        raise CompositionError(
            f"the method list must be a list, got a mapping {dict(specs)!r:.80}; write each method as one list item: "
            "[name, {name: {config}}, ...] (YAML: one '- name: {config}' line per method)"
        )
    elif specs is not None and not isinstance(specs, Iterable):
        raise CompositionError(
            f"the method list must be a list of names, {{name: {{config}}}} or Method instances, "
            f"got {type(specs).__name__} {specs!r:.80}"
        )
    parsed: list[tuple[str, Any]] = []
    for item in specs or ():
        if isinstance(item, Method):
            if not item.name:
                raise CompositionError(f"method object {type(item).__name__} has no name: set the class attribute `name`")
            parsed.append((item.name, item))
        elif isinstance(item, str):
            parsed.append((item, {}))
        elif isinstance(item, Mapping) and len(item) == 1:
            (name, config), = item.items()
            if config is not None and not isinstance(config, Mapping):
                raise CompositionError(f"method '{name}': its config must be a mapping, got {config!r}")
            parsed.append((str(name), dict(config or {})))
        else:
            raise CompositionError(
                f"cannot read method entry {item!r}: use a name, {{name: {{config}}}} or a Method instance"
            )
    names = [name for name, _ in parsed]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise CompositionError(f"method(s) {repeated} are enabled more than once")
    return parsed


def methods_from_config(config: Mapping[str, Any]) -> list[Any]:
    """The method list under a run config's ``grpo_plugins`` key (empty when absent).

    A single name (``grpo_plugins: ngrpo``) is a list of one method.
    """
    value = config.get("grpo_plugins") or []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        raise CompositionError(
            f"'grpo_plugins' must be a list of methods, got a mapping {dict(value)!r:.80}; write one list item per "
            "method ('- name: {config}'), in the order they compose"
        )
    if not isinstance(value, (list, tuple)):
        raise CompositionError(
            f"'grpo_plugins' must be a list of methods (names or {{name: {{config}}}}), got "
            f"{type(value).__name__} {value!r:.80}"
        )
    return list(value)


def instantiate(name: str, spec: Any, defaults: Mapping[str, Mapping]) -> EnabledMethod:
    """Load, configure and construct one method (``spec``: a config dict or a ``Method`` instance)."""
    from grpo_plugins import __version__
    from grpo_plugins.default import GRPO

    if isinstance(spec, Method):
        if type(spec) is GRPO:  # the built-in default, configured by hand
            return EnabledMethod(name, BUILTIN_DISTRIBUTION, __version__, spec, builtin=True)
        module = type(spec).__module__.split(".")[0]
        check_supported(type(spec), f"<object from {module}>")  # as discovery checks an installed method
        return EnabledMethod(name, f"<object from {module}>", "", spec)
    if name == "grpo" and "grpo" in disabled_names():
        raise CompositionError("method 'grpo' is disabled by GRPO_PLUGINS_DISABLED")
    if name == "grpo":
        cls, distribution, version, builtin = GRPO, BUILTIN_DISTRIBUTION, __version__, True
    else:
        info = resolve(name)
        cls, distribution, version, builtin = info.load(), info.distribution, info.version, False
    values = {**dict(defaults.get(name, {})), **spec}
    config = build_config(cls.Config, values, name, distribution)
    try:
        method = cls(config)
    except Exception as error:
        raise CompositionError(
            f"method '{name}' (distribution {distribution}) failed to start: {type(error).__name__}: {error}"
        ) from error
    return EnabledMethod(name, distribution, version, method, builtin)


def enable(methods: Iterable[MethodSpec] | MethodSpec | None, defaults: Mapping[str, Mapping]) -> list[EnabledMethod]:
    """The run's enabled methods in configured order, the built-in ``grpo`` appended unless named (or
    blocked by ``GRPO_PLUGINS_DISABLED``)."""
    parsed = parse_specs(methods)
    if "grpo" not in {name for name, _ in parsed} and "grpo" not in disabled_names():
        parsed.append(("grpo", {}))
    return [instantiate(name, spec, defaults) for name, spec in parsed]


def register(enabled: Sequence[EnabledMethod]) -> pluggy.PluginManager:
    """A plugin manager holding the hook spec and every enabled method.

    Raises:
        CompositionError: a hook implementation has an argument the spec lacks, names no hook of the
            spec, or uses a pluggy ordering option.
    """
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    for entry in enabled:
        refuse_order_options(entry)
        try:
            manager.register(entry.method, name=entry.name)
        except pluggy.PluginValidationError as error:
            raise CompositionError(f"method '{entry.name}' (distribution {entry.distribution}): {error}") from error
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as error:
        entry = _entry(enabled, manager.get_name(error.plugin))
        designed = [h for h in hookspecs.HOOK_NAMES if h not in hookspecs.PROVIDED_HOOKS]
        raise CompositionError(
            f"method '{entry.name}' (distribution {entry.distribution}) implements an unknown hook: {error}. "
            f"Valid hooks: {', '.join(hookspecs.PROVIDED_HOOKS)}; designed, not yet run by the adapters: "
            f"{', '.join(designed)}"
        ) from error
    return manager


def refuse_order_options(entry: EnabledMethod) -> None:
    """Refuse pluggy's ``tryfirst`` / ``trylast`` / ``wrapper`` / ``hookwrapper`` / ``optionalhook``
    on any hook implementation of the method (the run's configured order is the only order)."""
    marker = f"{hookspecs.PROJECT}_impl"
    for attribute in dir(entry.method):
        try:
            options = getattr(getattr(entry.method, attribute, None), marker, None)
        except Exception:  # a property that cannot be read is no hook implementation
            continue
        if not isinstance(options, Mapping):
            continue
        used = [f"{option}=True" for option in ORDER_OPTIONS if options.get(option)]
        if used:
            raise CompositionError(
                f"method '{entry.name}' (distribution {entry.distribution}): hook '{attribute}' uses pluggy's "
                f"{', '.join(used)}; grpo_plugins runs plain hook implementations only (no wrappers), in the "
                "run's configured order (use a bare @hookimpl and order the methods in the run's list)"
            )


def in_config_order(found: Sequence[Any], enabled: Sequence[EnabledMethod]) -> list[Any]:
    """The hook implementations ``found`` sorted into the run's configured order (pluggy's own order
    depends on registration and its call order runs last-registered first)."""
    order = {entry.name: i for i, entry in enumerate(enabled)}
    return sorted(found, key=lambda impl: order[impl.plugin_name])


def collect_impls(manager: pluggy.PluginManager, enabled: Sequence[EnabledMethod]) -> dict[str, list[tuple[EnabledMethod, Any]]]:
    """``{hook: [(method, implementation)]}`` in configured order, without the hooks a method switches
    off (:meth:`Method.disabled_hooks`) and with a user's single-provider hook replacing the built-in's.

    Raises:
        CompositionError: two methods provide a single-provider hook, or none estimates advantages.
    """
    impls: dict[str, list[tuple[EnabledMethod, Any]]] = {}
    for hook in hookspecs.HOOK_NAMES:
        ranked = in_config_order(getattr(manager.hook, hook).get_hookimpls(), enabled)
        entries = [(_entry(enabled, impl.plugin_name), impl) for impl in ranked]
        impls[hook] = [(e, impl) for e, impl in entries if hook not in e.method.disabled_hooks()]
    for hook in hookspecs.SINGLE_PROVIDER_HOOKS:
        providers = [entry for entry, _ in impls[hook] if not entry.builtin]
        if len(providers) > 1:
            who = " and ".join(f"'{e.name}' (distribution {e.distribution})" for e in providers)
            raise CompositionError(
                f"methods {who} both implement hook '{hook}', which takes a single provider; enable only one, "
                "or switch the hook off in one method's config (`grpo-plugins show NAME` lists the switches)"
            )
        if providers:  # a user provider replaces the built-in default
            impls[hook] = [(e, impl) for e, impl in impls[hook] if not e.builtin]
    if not impls["compute_advantages"]:
        raise CompositionError(
            "GRPO_PLUGINS_DISABLED blocks the built-in 'grpo', the default advantage estimator, and no enabled "
            "method implements 'compute_advantages': enable one or unblock 'grpo'"
        )
    return impls


def collect_required(enabled: Sequence[EnabledMethod]) -> frozenset[str]:
    """The union of the methods' required ``GRPOBatch`` fields (:meth:`Method.requires` and
    ``Method.needs().batch_fields``).

    Raises:
        CompositionError: a method requires a field ``GRPOBatch`` does not have.
    """
    known = {f.name for f in dataclasses.fields(GRPOBatch)}
    required: set[str] = set()
    for entry in enabled:
        fields = set(entry.method.requires())
        if callable(getattr(entry.method, "needs", None)):  # a shadowing attribute is refused by needs_of
            fields |= set(entry.method.needs().batch_fields)
        unknown = sorted(fields - known)
        if unknown:
            raise CompositionError(
                f"method '{entry.name}' (distribution {entry.distribution}) requires unknown batch field(s) "
                f"{unknown}; valid GRPOBatch fields: {', '.join(sorted(known))}"
            )
        required |= fields
    return frozenset(required)


def hooks_of(cls: type) -> list[str]:
    """Names of the hooks a method class implements (in hook-table order)."""
    marker = f"{hookspecs.PROJECT}_impl"
    return [h for h in hookspecs.HOOK_NAMES if hasattr(getattr(cls, h, None), marker)]


def _entry(enabled: Sequence[EnabledMethod], name: str) -> EnabledMethod:
    return next(e for e in enabled if e.name == name)
