"""The e2e runs' reward: the example's exact-answer reward plus a dense component.

A randomly initialised model never answers the example's sums, so with the example's reward alone
every group is constant and every advantage 0. ``digits`` (the share of the completion's characters
that are digits) varies within a group, so the methods see real, uneven rewards. ``score`` is
``acc + digits``; both components reach the adapter as ``reward_extra_info``.

A method whose :meth:`~grpo_plugins.Method.example` names its reward components gets those instead
(:data:`COMPONENTS_VAR`, set by the test): each is a dense function of the completion's text, mapped
onto the example's reward values when it declares them, and ``score`` is their sum (weights 1).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

COMPONENTS_VAR = "GRPO_PLUGINS_E2E_REWARDS"
"""JSON ``{"names": [...], "values": [...] | null}``: the reward components of a method's example."""

_spec = importlib.util.spec_from_file_location(
    "tiny_example_reward", Path(__file__).resolve().parents[4] / "examples" / "verl" / "reward.py"
)
_example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_example)


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    """``{"score": acc + digits, "acc": ..., "digits": ...}``, or the example's named components."""
    if os.environ.get(COMPONENTS_VAR):
        return example_components(solution_str or "", **json.loads(os.environ[COMPONENTS_VAR]))
    acc = _example.compute_score(data_source, solution_str, ground_truth, extra_info)["acc"]
    text = solution_str or ""
    digits = sum(ch.isdigit() for ch in text) / max(len(text), 1)
    return {"score": acc + digits, "acc": acc, "digits": digits}


def example_components(text: str, names: list[str], values: list[float] | None = None) -> dict[str, float]:
    """Component ``k``: the share of characters ``c`` with ``(ord(c) + k) % 3 == 0`` (dense, varies within a
    group), snapped to the nearest of ``values`` when given; ``score`` is the sum."""
    out = {}
    for k, name in enumerate(names):
        share = sum((ord(ch) + k) % 3 == 0 for ch in text) / max(len(text), 1)
        out[name] = share if values is None else float(values[min(int(share * len(values)), len(values) - 1)])
    return {"score": sum(out.values()), **out}
