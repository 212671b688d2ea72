"""Multi-turn step records (batch field ``steps``, :class:`grpo_plugins.steps.Steps`) for
:class:`~grpo_plugins_trl.PluginGRPOTrainer`, filled only when an enabled method needs them.

On TRL a row is one whole trajectory. Its steps are the runs of policy tokens: TRL's ``tool_mask`` (its
tool-calling loop, or the ``env_mask`` a ``rollout_func`` returns) times the completion mask; a
single-turn completion is one step. A ``rollout_func`` may return, per row, one value per step:

- ``step_rewards``: the step's reward (None or NaN: none; a method such as ``gigpo`` then puts the row's
  outcome reward on the last step);
- ``step_keys``: a 63-bit key of the state the step acted in (e.g. a hash of the observation text), None
  or -1 when unknown. Without it the first step's state is the prompt (its prompt id: every trajectory
  of a group starts there) and later states are unknown.

TRL hands these extra fields to the reward functions with each row; the trainer keeps them per row
(``STEP_FIELDS``) and a row whose list length differs from its number of steps is an error naming it.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import TYPE_CHECKING, Any, Sequence

import torch

from grpo_plugins import Steps, TrainerCapabilities
from grpo_plugins.steps import spans_of_mask

if TYPE_CHECKING:
    from grpo_plugins import Composition

STEP_FIELDS = ("step_rewards", "step_keys")
"""The ``rollout_func`` extra fields read per row."""


def with_steps(caps: TrainerCapabilities) -> TrainerCapabilities:
    """``caps`` plus the batch field ``steps``."""
    return dataclasses.replace(caps, batch_fields=caps.batch_fields | {"steps"})


def wanted(composition: "Composition") -> bool:
    return "steps" in composition.required_fields()


def row_fields(inputs: Sequence[dict]) -> list[dict[str, Any]]:
    """This rank's ``step_rewards`` / ``step_keys`` of each row (None where the rollout gave none)."""
    return [{name: row.get(name) for name in STEP_FIELDS} for row in inputs]


def _per_step(values: list, counts: torch.Tensor, name: str, missing: float | int, dtype: torch.dtype) -> torch.Tensor | None:
    """One flat ``(S,)`` tensor from per-row lists (None rows and None items: ``missing``)."""
    if all(v is None for v in values):
        return None
    lengths = [counts[i].item() if v is None else len(v) for i, v in enumerate(values)]
    wrong = [i for i, (n, c) in enumerate(zip(lengths, counts.tolist())) if n != c]
    if wrong:
        raise ValueError(f"rollout field '{name}' holds {lengths[wrong[0]]} value(s) for row {wrong[0]}, which has "
                         f"{counts[wrong[0]].item()} step(s) (runs of env_mask/tool_mask == 1); rows {wrong[:5]} differ")
    flat = itertools.chain.from_iterable([missing] * c if v is None else v for v, c in zip(values, counts.tolist()))
    cast = float if dtype.is_floating_point else int
    return torch.tensor([missing if x is None else cast(x) for x in flat], dtype=dtype)


def batch_steps(action_mask: torch.Tensor, prompt_ids: torch.Tensor, fields: Sequence[dict[str, Any]]) -> Steps:
    """The global batch's steps from its ``(N, T)`` action mask (completion mask times tool mask), the rows'
    prompt ids ``(N,)`` and their rollout fields (``row_fields`` of every rank, in row order)."""
    row, start, end, turn = spans_of_mask(action_mask)
    counts = torch.bincount(row, minlength=action_mask.shape[0])
    rewards = _per_step([f["step_rewards"] for f in fields], counts, "step_rewards", float("nan"), torch.float32)
    keys = _per_step([f["step_keys"] for f in fields], counts, "step_keys", -1, torch.long)
    prompt_state = torch.where(turn == 0, prompt_ids[row], -1)  # every trajectory of a group starts at its prompt
    return Steps(
        row=row, start=start, end=end, trajectory=row, turn=turn,
        reward=torch.full(row.shape, float("nan")) if rewards is None else rewards,
        key=prompt_state if keys is None else keys,
    )
