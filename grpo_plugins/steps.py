"""Per-step records of multi-turn trajectories (batch field ``steps``).

An agent trajectory is a sequence of turns: the policy acts (generates tokens), the environment answers.
A step is one policy turn. The adapters describe them in :class:`Steps`, one entry per step, ``(S,)``
each, in any order:

- ``row``, ``start``, ``end``: the completion row holding the step's tokens and their span
  ``[start, end)`` in that row's completion. On TRL a row is a whole trajectory and its steps are the
  spans of ``tool_mask``/``env_mask`` == 1; on verl a row is one turn (``start = 0``, ``end`` its length).
- ``trajectory``: an id shared by the steps of one trajectory; ``turn``: 0, 1, ... within it.
- ``reward``: the step's reward, NaN where the environment gives none.
- ``key``: a 63-bit key of the step's observation (the state the action was taken in), -1 where unknown;
  steps of a group that share a key start from the same state (GiGPO's anchor states).

:func:`token_step_index` maps the records to an ``(N, T)`` step id per token (one pass, no loop).

Shared by the multi-turn estimators (``gigpo``, ``flow_grpo``, ``salt``): :func:`trajectories_of_batch`
(validates the records against the batch and numbers the trajectories), :func:`step_rewards` (the outcome
on a trajectory's last step), :func:`group_relative`, :func:`episode_advantages` (GRPO over a prompt's
trajectories, broadcast to their steps) and :func:`step_values_on_tokens`.

Shapes: ``N`` rows, ``T`` tokens, ``S`` steps, ``M`` trajectories.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from grpo_plugins.arithmetic import group_mean_std
from grpo_plugins.ops import constant_groups, group_normalize, segment_count, segment_max, segment_min

if TYPE_CHECKING:
    from grpo_plugins.batch import GRPOBatch

EPSILON = 1e-6  # verl's GRPO std epsilon (the multi-turn methods' released code runs on verl)


@dataclass(frozen=True)
class Steps:
    """The steps of the batch's trajectories, ``(S,)`` tensors (see the module docstring)."""

    row: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    trajectory: torch.Tensor
    turn: torch.Tensor
    reward: torch.Tensor
    key: torch.Tensor

    @property
    def num_steps(self) -> int:
        return int(self.row.shape[0])

    def rows_of(self, index: torch.Tensor, num_rows: int) -> "Steps":
        """The records of a batch restricted to its rows ``index`` (distinct, in that order): steps of other
        rows dropped, ``row`` renumbered to the new positions."""
        position = torch.full((num_rows,), -1, dtype=torch.long, device=self.row.device)
        position[index] = torch.arange(index.numel(), device=self.row.device)
        keep = position[self.row] >= 0
        fields = {name: getattr(self, name)[keep] for name in ("start", "end", "trajectory", "turn", "reward", "key")}
        return Steps(row=position[self.row][keep], **fields)

    def problems(self, num_rows: int, num_tokens: int) -> list[str]:
        """What is inconsistent in the records of a batch of ``num_rows`` rows of ``num_tokens`` tokens."""
        s = self.num_steps
        for name in ("row", "start", "end", "trajectory", "turn", "reward", "key"):
            if getattr(self, name).shape != (s,):
                return [f"steps.{name} has shape {tuple(getattr(self, name).shape)}, expected ({s},)"]
        problems = []
        if s and not (bool((self.row >= 0).all()) and bool((self.row < num_rows).all())):
            problems.append(f"steps.row must lie in [0, {num_rows})")
        if s and not (bool((self.start >= 0).all()) and bool((self.start < self.end).all())
                      and bool((self.end <= num_tokens).all())):
            problems.append(f"every step span must satisfy 0 <= start < end <= {num_tokens}")
        if s and bool(torch.isinf(self.reward).any()):
            problems.append("steps.reward holds inf (NaN means: no reward for this step)")
        if not problems and s:
            trajectories, inverse = torch.unique(self.trajectory, return_inverse=True)
            pairs = torch.unique(torch.stack([inverse, self.turn]), dim=1)
            if pairs.shape[1] != s:
                problems.append("two steps share a trajectory and a turn")
            order = torch.argsort(self.row * (num_tokens + 1) + self.start)
            same_row = self.row[order][1:] == self.row[order][:-1]
            if bool((same_row & (self.start[order][1:] < self.end[order][:-1])).any()):
                problems.append("two steps' token spans overlap in one row")
        return problems


def token_step_index(steps: Steps, num_rows: int, num_tokens: int) -> torch.Tensor:
    """``(N, T)`` int64 index into ``steps`` of the step each token belongs to, -1 outside every step.

    A difference array: ``+(s + 1)`` at each step's start, ``-(s + 1)`` at its end, summed along the
    tokens (spans of one row do not overlap).
    """
    marks = torch.zeros(num_rows, num_tokens + 1, dtype=torch.long, device=steps.row.device)
    ids = torch.arange(steps.num_steps, device=steps.row.device) + 1
    marks.index_put_((steps.row, steps.start), ids, accumulate=True)
    marks.index_put_((steps.row, steps.end), -ids, accumulate=True)
    return marks[:, :num_tokens].cumsum(dim=1) - 1


def spans_of_mask(action_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The runs of 1s of an ``(N, T)`` 0/1 mask (TRL's ``tool_mask`` times the completion mask): the steps
    of trajectories stored one per row -> ``(row, start, end, turn)``, ``(S,)`` each, ``turn`` counting
    the runs of each row from 0."""
    mask = action_mask.long()
    padded = torch.nn.functional.pad(mask, (1, 1))
    change = padded[:, 1:] - padded[:, :-1]  # (N, T + 1): +1 where a run starts, -1 where it ends
    row, start = (change == 1).nonzero(as_tuple=True)
    _, end = (change == -1).nonzero(as_tuple=True)  # row-major: the k-th end closes the k-th start
    runs_before = torch.cumsum((change == 1).long(), dim=1)
    turn = runs_before[row, start] - 1
    return row, start, end, turn


def turn_row_steps(lengths: torch.Tensor, trajectory: torch.Tensor, turn: torch.Tensor, prompt_ids: torch.Tensor,
                   reward: torch.Tensor | None = None, key: torch.Tensor | None = None) -> Steps:
    """The steps of trajectories stored one turn per row (verl's agent loop: row ``{uid}_{session}_{index}``
    is turn ``index`` of trajectory ``session``): step ``s`` is the whole response ``[0, lengths)`` of a row.

    Args: ``(N,)`` each -- ``lengths`` the rows' response lengths (a row without a token holds no step),
    ``trajectory`` and ``turn`` of each row, ``prompt_ids`` its prompt group, ``reward`` the step reward
    (NaN none; None: none anywhere), ``key`` the state key (-1 unknown; None: the first turn's state is the
    prompt, every trajectory of a group starting there, later states unknown).
    """
    row = (lengths > 0).nonzero().flatten()
    turn = turn.long()[row]
    if key is None:
        key = torch.where(turn == 0, prompt_ids.long()[row], -1)
    else:
        key = key.long()[row]
    return Steps(
        row=row, start=torch.zeros_like(row), end=lengths.long()[row], trajectory=trajectory.long()[row], turn=turn,
        reward=torch.full(row.shape, float("nan")) if reward is None else reward.float()[row], key=key,
    )


def last_turn_rows(trajectory: torch.Tensor, turn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows that are turns (``(N,)`` trajectory id and turn index each): ``(last, position)`` -- ``(M,)``
    the row of each trajectory's last turn, trajectories in order of first appearance, and ``(N,)`` the
    position in ``last`` of each row's trajectory. verl's multi-trajectory GRPO scores the ``last`` rows in
    this order and gives every row its trajectory's advantage."""
    ids, inverse = torch.unique(trajectory, return_inverse=True)
    m, n = int(ids.numel()), int(trajectory.numel())
    rows = torch.arange(n, device=turn.device)
    first = torch.full((m,), n, dtype=torch.long, device=turn.device).scatter_reduce(0, inverse, rows, "amin")
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(m, device=turn.device)
    is_last = segment_max(turn.double(), inverse, m)[inverse] == turn.double()
    last = torch.full((m,), -1, dtype=torch.long, device=turn.device)
    last[inverse[is_last]] = rows[is_last]
    return last[order], rank[inverse]


def trajectories_of_batch(batch: "GRPOBatch", method: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(task, trajectory, M)``: each step's task group ``(S,)`` (its row's prompt group), its trajectory
    numbered ``0 .. M-1`` ``(S,)`` and ``M``.

    Raises ``ValueError`` naming ``method`` when a row holds generated tokens but no step, or when the steps
    of one trajectory lie in rows of different prompts.
    """
    steps, mask = batch.steps, batch.completion_mask
    covered = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device).index_fill_(0, steps.row, True)
    uncovered = (mask.gt(0).any(dim=1) & ~covered).nonzero().flatten()
    if uncovered.numel():
        raise ValueError(f"{method}: completion row(s) {uncovered[:5].tolist()} hold tokens but no step (every "
                         "generated token must belong to a step of GRPOBatch.steps)")
    task = batch.group_index[steps.row]
    trajectory_ids, trajectory = torch.unique(steps.trajectory, return_inverse=True)
    m = int(trajectory_ids.numel())
    if bool((segment_max(task.double(), trajectory, m) != segment_min(task.double(), trajectory, m)).any()):
        raise ValueError(f"{method}: a trajectory's steps lie in rows of different prompts (one trajectory, one task)")
    return task, trajectory, m


def step_rewards(steps: Steps, trajectory: torch.Tensor, num_trajectories: int, outcome: torch.Tensor) -> torch.Tensor:
    """``(S,)`` float64 reward of each step: NaN -> 0, except on its trajectory's last turn, where NaN ->
    ``outcome`` ``(N,)`` of the step's row (outcome-only environments need no step rewards)."""
    last_turn = segment_max(steps.turn.double(), trajectory, num_trajectories)[trajectory] == steps.turn.double()
    missing = torch.isnan(steps.reward)
    fill = torch.where(last_turn, outcome.double()[steps.row], torch.zeros_like(steps.reward, dtype=torch.float64))
    return torch.where(missing, fill, steps.reward.double())


def group_relative(values: torch.Tensor, index: torch.Tensor, num_groups: int, by_std: bool,
                   alone: Literal["value", "zero"], epsilon: float = EPSILON) -> torch.Tensor:
    """``(values - mean_g) / F`` per group ``(N,)`` (``F`` = unbiased std + ``epsilon``, or 1); a constant
    group of two or more gets exactly 0; a group of one gets ``values`` itself (``alone="value"``: mean 0,
    std 1, as verl scores it) or 0 (``alone="zero"``)."""
    if alone == "zero":
        return group_normalize(values, index, num_groups, scale_by_std=by_std, epsilon=epsilon)
    mean, std = group_mean_std(values, index, num_groups, "verl")  # a group of one: mean 0, std 1
    out = values - mean[index]
    if by_std:
        out = out / (std[index] + epsilon)
    flat = constant_groups(values, index, num_groups) & (segment_count(index, num_groups) > 1)
    return torch.where(flat[index], torch.zeros_like(out), out)


def episode_advantages(steps: Steps, task: torch.Tensor, trajectory: torch.Tensor, num_trajectories: int,
                       outcome: torch.Tensor, by_std: bool, weighting: Literal["trajectory", "step"],
                       epsilon: float = EPSILON) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_E, R)``: each step's episode advantage ``(S,)`` (float64) and each trajectory's return ``(M,)``.

    ``R_i = sum_t r_{i,t}`` (:func:`step_rewards`: the outcome ``(N,)`` on the last step where it has no
    reward); ``A_E(i) = (R_i - mean) / F`` with mean and std over the task's trajectories
    (``weighting="trajectory"``) or over its steps, a trajectory counted once per step
    (``"step"``: verl's GRPO on rows that are turns, each carrying its trajectory's return); a task with one
    trajectory (one step row) scores it against mean 0 and std 1, as verl does.
    """
    rewards = step_rewards(steps, trajectory, num_trajectories, outcome)
    returns = torch.zeros(num_trajectories, dtype=torch.float64, device=rewards.device)
    returns.index_add_(0, trajectory, rewards)
    task_ids, task_of_step = torch.unique(task, return_inverse=True)
    if weighting == "trajectory":
        task_of_trajectory = task_of_step.new_zeros(num_trajectories).scatter_(0, trajectory, task_of_step)
        advantage = group_relative(returns, task_of_trajectory, int(task_ids.numel()), by_std, "value", epsilon)
        return advantage[trajectory], returns
    return group_relative(returns[trajectory], task_of_step, int(task_ids.numel()), by_std, "value", epsilon), returns


def step_values_on_tokens(values: torch.Tensor, steps: Steps, mask: torch.Tensor) -> torch.Tensor:
    """``(N, T)``: each step's value ``(S,)`` on the real tokens (``mask`` ``(N, T)`` > 0) of its span, 0 on
    every other token (environment output, padding)."""
    n, t = mask.shape
    step_of_token = token_step_index(steps, n, t)
    per_token = torch.where(step_of_token >= 0, values[step_of_token.clamp(min=0)], 0.0)
    return torch.where(mask > 0, per_token, 0.0)
