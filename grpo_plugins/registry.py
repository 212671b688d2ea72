"""Discovery: methods are found through the ``grpo_plugins`` entry-point group.

Installed is not enabled: discovery only lists what could be enabled; a run names what it enables.
``GRPO_PLUGINS_DISABLED=name1,name2`` hides the named methods from discovery;
``GRPO_PLUGINS_LOAD=name1,name2`` hides every method it does not name (set but empty: all of them).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from importlib import metadata

from grpo_plugins.errors import CompositionError
from grpo_plugins.hookspecs import PROJECT

ENTRY_POINT_GROUP = PROJECT


@dataclass(frozen=True)
class MethodInfo:
    """An installed method: its name, the distribution that ships it, and its entry point."""

    name: str
    distribution: str
    version: str
    entry_point: metadata.EntryPoint

    def load(self) -> type:
        """Import the method class, turning an import failure into an error naming the distribution."""
        from grpo_plugins.method import Method

        try:
            cls = self.entry_point.load()
        except Exception as error:
            raise CompositionError(
                f"method '{self.name}' (distribution {self.distribution}) failed to import from entry point "
                f"'{self.entry_point.value}': {type(error).__name__}: {error}"
            ) from error
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise CompositionError(
                f"method '{self.name}' (distribution {self.distribution}): entry point '{self.entry_point.value}' "
                "must name a grpo_plugins.Method subclass"
            )
        if cls.name != self.name:
            raise CompositionError(
                f"method '{self.name}' (distribution {self.distribution}): entry point name '{self.name}' "
                f"differs from the class's name '{cls.name}'"
            )
        from grpo_plugins.api import check_supported

        check_supported(cls, self.distribution)  # a method built for another plugin-API version is refused here
        return cls


def disabled_names() -> set[str]:
    """Method names blocked by ``GRPO_PLUGINS_DISABLED`` (comma-separated)."""
    return {name.strip() for name in os.environ.get("GRPO_PLUGINS_DISABLED", "").split(",") if name.strip()}


def blocked_by(name: str) -> str | None:
    """The environment variable that hides method ``name`` from discovery, or None."""
    if name in disabled_names():
        return "GRPO_PLUGINS_DISABLED"
    load = os.environ.get("GRPO_PLUGINS_LOAD")
    if load is not None and name not in {n.strip() for n in load.split(",")}:
        return "GRPO_PLUGINS_LOAD"
    return None


def discover() -> tuple[dict[str, MethodInfo], dict[str, list[MethodInfo]]]:
    """Installed methods by name, and the names that more than one distribution registers."""
    found: dict[str, list[MethodInfo]] = {}
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = entry_point.dist
        info = MethodInfo(
            name=entry_point.name,
            distribution=dist.metadata["Name"] if dist else "<unknown>",
            version=dist.version if dist else "",
            entry_point=entry_point,
        )
        same = found.setdefault(info.name, [])
        if all(other.distribution != info.distribution for other in same):
            same.append(info)
    found = {name: infos for name, infos in found.items() if blocked_by(name) is None}
    methods = {name: infos[0] for name, infos in found.items() if len(infos) == 1}
    conflicts = {name: sorted(infos, key=lambda i: i.distribution) for name, infos in found.items() if len(infos) > 1}
    return methods, conflicts


def resolve(name: str) -> MethodInfo:
    """The installed method called ``name``.

    Raises:
        CompositionError: the name is registered by two distributions (both named), is hidden by
            ``GRPO_PLUGINS_DISABLED`` / ``GRPO_PLUGINS_LOAD``, or is unknown (close names are suggested).
    """
    methods, conflicts = discover()
    if name in conflicts:
        dists = " and ".join(f"{i.distribution} ({i.entry_point.value})" for i in conflicts[name])
        raise CompositionError(f"method name '{name}' is registered by two distributions: {dists}; uninstall one")
    if name in methods:
        return methods[name]
    variable = blocked_by(name)
    if variable == "GRPO_PLUGINS_DISABLED":
        raise CompositionError(f"method '{name}' is disabled by GRPO_PLUGINS_DISABLED")
    if variable == "GRPO_PLUGINS_LOAD":
        raise CompositionError(f"method '{name}' is not listed in GRPO_PLUGINS_LOAD, which hides every other method")
    close = difflib.get_close_matches(name, list(methods), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    installed = ", ".join(sorted(methods)) or "none"
    raise CompositionError(f"unknown method '{name}'{hint} (installed: {installed})")
