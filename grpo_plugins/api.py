"""The plugin API's version: what the core provides, what a method supports, and when each part appeared.

The plugin API is everything a method distribution relies on: the hooks (their names, arguments and
output contracts), the fields of the objects hooks receive (``GRPOBatch``, ``LossInputs``,
``PromptRound``, ``RunContext``) and the ``Method`` base class. Its version ``MAJOR.MINOR`` is
separate from the ``grpo-plugins`` release number:

- a **minor** change adds: a hook, an optional field, a method of ``Method`` with a default. A method
  written against ``1.0`` keeps working on every ``1.x`` core, unchanged;
- a **major** change breaks: a hook or field removed or renamed, a hook's arguments or output
  contract changed. A method written against ``1.x`` is refused by a ``2.x`` core, at start-up.

A method declares the range of API versions it supports (``Method.plugin_api``, a specifier such as
``">=1.0,<2"``: comma-separated ``>=``, ``>``, ``<=``, ``<``, ``==`` clauses on ``MAJOR.MINOR``);
discovery refuses a method whose range excludes :data:`PLUGIN_API`, with a message naming the
version it needs. :data:`HOOKS_SINCE` and :data:`FIELDS_SINCE` record in which version each hook and
field appeared, so that a method's lower bound can be checked against what it uses (the conformance
suite does): a method implementing ``setup`` (``1.1``) must not claim to support ``1.0``.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

from grpo_plugins.errors import CompositionError

PLUGIN_API = "1.3"
"""The plugin API version this core provides."""

DEFAULT_RANGE = ">=1.0,<2"
"""The range of a method that declares none: written against the first API, any ``1.x`` core."""

HISTORY: Mapping[str, str] = {
    "1.0": "the first API: hooks sample_prompts, allocate_rollouts, augment_prompts, shape_rewards, "
    "compute_advantages, adjust_advantages, mask_tokens (per-token weights that never change the loss "
    "normaliser), policy_surrogate, gate_loss, loss_terms, observe; Method.requires, disabled_hooks, state",
    "1.1": "hooks setup, keep_rows, inject_rows, loss_objectives, scale_update; GRPOBatch.turn_index (never filled; replaced by GRPOBatch.steps in 1.2), "
    "old_entropies, old_log_probs_at, gradient_statistics; LossInputs.group_index; RunContext; Method.needs, step_generator, "
    "example, plugin_api",
    "1.2": "the old-policy probe and the update preview: GRPOBatch.probes, GRPOBatch.update_preview, Needs.probes "
    "(grpo_plugins.probe: ProbeRequest, OldPolicyProbe, ProbeChunk, UpdatePreview); the multi-turn step records "
    "GRPOBatch.steps (grpo_plugins.steps.Steps), which replace the designed GRPOBatch.turn_index",
    "1.3": "GRPOBatch.unshaped_rewards (the trainer's rewards before shape_rewards); Needs.excludes_hooks (hooks "
    "whose output a method makes meaningless); Needs.runs_first (chain hooks whose input a method ignores); "
    "grpo_plugins.ops.global_all_equal",
}
"""What each version added (a minor version) or changed (a major one)."""

HOOKS_SINCE: Mapping[str, str] = {
    "sample_prompts": "1.0",
    "allocate_rollouts": "1.0",
    "augment_prompts": "1.0",
    "shape_rewards": "1.0",
    "compute_advantages": "1.0",
    "adjust_advantages": "1.0",
    "mask_tokens": "1.0",
    "policy_surrogate": "1.0",
    "gate_loss": "1.0",
    "loss_terms": "1.0",
    "observe": "1.0",
    "setup": "1.1",
    "keep_rows": "1.1",
    "inject_rows": "1.1",
    "loss_objectives": "1.1",
    "scale_update": "1.1",
}
"""The API version in which each hook appeared (every hook of the hook table has a row)."""

FIELDS_SINCE: Mapping[str, str] = {
    "GRPOBatch.old_entropies": "1.1",
    "GRPOBatch.old_log_probs_at": "1.1",
    "GRPOBatch.gradient_statistics": "1.1",
    "LossInputs.group_index": "1.1",
    "GRPOBatch.probes": "1.2",
    "GRPOBatch.update_preview": "1.2",
    "GRPOBatch.steps": "1.2",
    "GRPOBatch.unshaped_rewards": "1.3",
}
"""The API version in which a field appeared, for every field added after ``1.0`` (the others are ``1.0``)."""

_CLAUSE = re.compile(r"^\s*(>=|<=|==|>|<)\s*(\d+)(?:\.(\d+))?\s*$")


class PluginAPIError(CompositionError):
    """A method's declared plugin-API range is malformed or excludes this core's API version."""


def parse_version(text: str) -> tuple[int, int]:
    """``"1.2"`` -> ``(1, 2)``; ``"1"`` -> ``(1, 0)``."""
    match = re.fullmatch(r"\s*(\d+)(?:\.(\d+))?\s*", str(text))
    if not match:
        raise ValueError(f"not a MAJOR.MINOR version: {text!r}")
    return int(match.group(1)), int(match.group(2) or 0)


def parse_range(spec: str) -> list[tuple[str, tuple[int, int]]]:
    """``">=1.0,<2"`` -> ``[(">=", (1, 0)), ("<", (2, 0))]``.

    Raises:
        ValueError: a clause is not ``OP MAJOR[.MINOR]`` with ``OP`` one of ``>= > <= < ==``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a plugin-API range must be a non-empty string such as '>=1.0,<2', got {spec!r}")
    clauses = []
    for part in spec.split(","):
        match = _CLAUSE.match(part)
        if not match:
            raise ValueError(f"cannot read clause {part.strip()!r} of plugin-API range {spec!r} (use e.g. '>=1.0,<2')")
        clauses.append((match.group(1), (int(match.group(2)), int(match.group(3) or 0))))
    return clauses


def satisfies(version: str, spec: str) -> bool:
    """Whether API ``version`` lies in the range ``spec``."""
    value = parse_version(version)
    compare = {">=": value.__ge__, ">": value.__gt__, "<=": value.__le__, "<": value.__lt__, "==": value.__eq__}
    return all(compare[op](bound) for op, bound in parse_range(spec))


def lowest_supported(spec: str) -> tuple[int, int] | None:
    """The lowest API version the range admits from below (its ``>=`` / ``==`` bound, or the minor after a
    ``>`` bound), or None when the range has no lower bound."""
    lows = []
    for op, (major, minor) in parse_range(spec):
        if op in (">=", "=="):
            lows.append((major, minor))
        elif op == ">":
            lows.append((major, minor + 1))
    return max(lows) if lows else None


def method_range(cls: type) -> str:
    """The plugin-API range a method class declares (``plugin_api``), or :data:`DEFAULT_RANGE`."""
    return getattr(cls, "plugin_api", None) or DEFAULT_RANGE


def check_supported(cls: type, distribution: str = "") -> None:
    """Refuse a method class whose declared plugin-API range excludes this core's :data:`PLUGIN_API`.

    Raises:
        PluginAPIError: the range is malformed, or it does not admit :data:`PLUGIN_API`; the message
            names the method, its distribution, the range and this core's version.
    """
    from grpo_plugins import __version__

    spec = method_range(cls)
    where = f"method '{getattr(cls, 'name', '') or cls.__name__}'" + (f" (distribution {distribution})" if distribution else "")
    try:
        ok = satisfies(PLUGIN_API, spec)
    except ValueError as error:
        raise PluginAPIError(f"{where} declares an unreadable plugin_api: {error}") from error
    if not ok:
        low = lowest_supported(spec)
        newer = low is not None and low > parse_version(PLUGIN_API)
        advice = (
            "upgrade grpo-plugins to a release providing it"
            if newer
            else "install a release of the method built for this API, or an older grpo-plugins"
        )
        raise PluginAPIError(
            f"{where} supports plugin API {spec}, but this core (grpo-plugins {__version__}) provides plugin API "
            f"{PLUGIN_API}: {advice}"
        )


def range_problems(cls: type, hooks: Iterable[str]) -> list[str]:
    """Why a method's declared range does not fit what it uses: every hook it implements that appeared
    after the lowest version the range admits (a core of that version would not run the hook)."""
    spec = method_range(cls)
    try:
        low = lowest_supported(spec)
    except ValueError as error:
        return [str(error)]
    if low is None:
        return [f"plugin_api {spec!r} has no lower bound; declare the version the method was written against (e.g. '>={PLUGIN_API},<2')"]
    problems = []
    for hook in hooks:
        since = HOOKS_SINCE.get(hook)
        if since is not None and parse_version(since) > low:
            problems.append(
                f"implements hook '{hook}', which appeared in plugin API {since}, but plugin_api {spec!r} admits "
                f"{low[0]}.{low[1]}: raise the lower bound to >={since}"
            )
    return problems
