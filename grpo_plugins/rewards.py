"""Reading named reward components: for methods that build the reward from the trainer's reward functions
by name (``accuracy``, ``format``, ...), with errors that say which reward function to add.

``batch.reward_components`` is ``(N, K)`` with one column per reward function, named by
``batch.reward_names`` (TRL: each function's ``__name__``; verl: the ``reward_extra_info`` keys); NaN
marks a completion the function did not score.
"""

from __future__ import annotations

from typing import Literal

import torch

from grpo_plugins.batch import GRPOBatch

OtherRewards = Literal["error", "add", "ignore"]
"""What a method that reads named components does with the trainer's other reward components."""


def named_component(batch: GRPOBatch, name: str, method: str, setting: str, allow_nan: bool = False) -> torch.Tensor:
    """The ``(N,)`` float reward component called ``name``.

    Raises:
        ValueError: naming ``method``, its config ``setting`` and the reward function to add, when the
            trainer has no component ``name``; or when it is NaN for some completion (unless ``allow_nan``).
    """
    names = tuple(batch.reward_names)
    if batch.reward_components is None or name not in names:
        have = f"reward components {list(names)}" if batch.reward_components is not None else "no reward components"
        raise ValueError(
            f"{method} reads the reward '{name}' (config '{setting}'), but the trainer has {have}. Add a reward "
            f"function named '{name}' (TRL: a function with __name__ '{name}' in reward_funcs; verl: a "
            f"reward_extra_info key '{name}'), or set {setting} to the name of yours"
        )
    values = batch.reward_components[:, names.index(name)].float()
    missing = torch.isnan(values)
    if not allow_nan and bool(missing.any()):
        where = missing.nonzero().flatten()[:5].tolist()
        raise ValueError(f"{method}: the reward '{name}' ({setting}) is missing (None/NaN) for completions {where}; "
                         "it must score every completion")
    return values


def other_components(batch: GRPOBatch, used: set[str], policy: OtherRewards, method: str) -> list[int]:
    """Columns of the components ``method`` does not read, under ``policy``: all of them for ``'add'``,
    none for ``'ignore'``; with ``'error'`` any such component is a clear error."""
    names = tuple(batch.reward_names) if batch.reward_components is not None else ()
    others = [k for k, name in enumerate(names) if name not in used]
    if others and policy == "error":
        raise ValueError(
            f"{method} builds the reward from {sorted(used)}, but the trainer also has reward(s) "
            f"{[names[k] for k in others]}; set other_rewards='add' to add them with the trainer's weights, or "
            "'ignore' to leave them out"
        )
    return others if policy == "add" else []


def other_rewards_sum(batch: GRPOBatch, used: set[str], policy: OtherRewards, method: str) -> torch.Tensor | float:
    """``(N,)`` trainer-weighted sum of the components ``method`` does not read (``policy='add'``; NaN counts
    0), 0 for ``'ignore'``; see :func:`other_components`."""
    others = other_components(batch, used, policy, method)
    if not others:
        return 0.0
    columns = batch.reward_components[:, others].float()
    weights = torch.ones(len(batch.reward_names)) if batch.reward_weights is None else batch.reward_weights
    return (columns * weights[others].to(columns)).nansum(dim=1)
