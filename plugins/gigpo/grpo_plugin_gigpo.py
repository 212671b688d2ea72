"""GiGPO: Group-in-Group Policy Optimization for LLM agent training (Feng et al., 2025, arXiv:2505.10978;
code langfengQ/verl-agent, ``gigpo/core_gigpo.py``).

A critic-free estimator for multi-turn agents. A group is the ``G`` trajectories of one task (one prompt);
each trajectory ``i`` is a sequence of steps ``t`` (policy turns, ``GRPOBatch.steps``) with step reward
``r_{i,t}`` and the state ``s_{i,t}`` it acted in (``Steps.key``). Two levels of relative advantage:

- **episode**: ``R_i = sum_t r_{i,t}``, ``A_E(i) = (R_i - mean_j R_j) / F`` over the task's trajectories
  (``episode_weighting="trajectory"``, the paper) or over its step rows (``"step"``: each trajectory counted
  once per step, the released code);
- **step**: the discounted return ``Rd_{i,t} = sum_{k >= 0} gamma^k r_{i,t+k}``; the *anchor-state group* of a
  step is every step of the task's trajectories that acted in the same state (same key, repeats within one
  trajectory included); ``A_S(i,t) = (Rd_{i,t} - mean_anchor Rd) / F``;
- ``A(i,t) = A_E(i) + omega * A_S(i,t)`` on every token of step ``(i,t)``.

``F = 1`` (``normalization="mean"``) or the group's unbiased std ``+ 1e-6`` (``"mean_std"``). A task with one
trajectory scores it against mean 0 and std 1 (``A_E = R``, the released code); a step alone in its anchor
group gets ``A_S = 0``; a group whose values are all equal gets exactly 0. Step rewards: NaN (no reward)
counts as 0, except on a trajectory's last step, where it is the trajectory's outcome (the row's reward),
so outcome-only environments need no step rewards.

Shapes: ``N`` rows, ``T`` tokens, ``S`` steps, ``M`` trajectories, ``L`` the most steps of a trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from grpo_plugins import NON_NEGATIVE, UNIT, Example, GRPOBatch, Method, Needs, hookimpl, option
from grpo_plugins.ops import group_ranks, segment_count
from grpo_plugins.steps import (Steps, episode_advantages, group_relative, step_rewards, step_values_on_tokens,
                                trajectories_of_batch)


def discounted_returns(rewards: torch.Tensor, trajectory: torch.Tensor, turn: torch.Tensor, num_trajectories: int,
                       gamma: float) -> torch.Tensor:
    """``Rd_{i,t} = r_{i,t} + gamma * Rd_{i,t+1}`` along each trajectory's turns -> ``(S,)``.

    The steps are laid out in an ``(M, L)`` grid by turn order; the loop runs over the ``L`` columns
    (turns), never over steps.
    """
    position = group_ranks(trajectory, num_trajectories, turn.double())
    width = int(position.max()) + 1 if position.numel() else 0
    grid = rewards.new_zeros((num_trajectories, width + 1))
    grid[trajectory, position] = rewards
    for column in range(width - 1, -1, -1):
        grid[:, column] += gamma * grid[:, column + 1]
    return grid[trajectory, position]


def gigpo_step_advantages(steps: Steps, task: torch.Tensor, outcome: torch.Tensor, gamma: float, omega: float,
                          by_std: bool, episode_weighting: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, A_S, shared)`` per step ``(S,)``: GiGPO's advantage and its step part (float64), and whether the
    step's anchor-state group holds other steps (bool).

    ``task`` ``(S,)`` is the task group of each step (its row's group), ``outcome`` ``(N,)`` the rows' rewards.
    """
    trajectory_ids, trajectory = torch.unique(steps.trajectory, return_inverse=True)
    m = int(trajectory_ids.numel())
    a_episode, _ = episode_advantages(steps, task, trajectory, m, outcome, by_std, episode_weighting)
    returns = discounted_returns(step_rewards(steps, trajectory, m, outcome), trajectory, steps.turn, m, gamma)
    _, task_of_step = torch.unique(task, return_inverse=True)
    unknown = -1 - torch.arange(steps.num_steps, device=steps.key.device)  # a step of unknown state is alone
    state = torch.where(steps.key >= 0, steps.key, unknown)
    anchors, anchor = torch.unique(torch.stack([task_of_step, state]), dim=1, return_inverse=True)
    a_step = group_relative(returns, anchor, int(anchors.shape[1]), by_std, "zero")
    shared = segment_count(anchor, int(anchors.shape[1]))[anchor] > 1
    return a_episode + omega * a_step, a_step, shared


@dataclass(frozen=True)
class GiGPOConfig:
    """GiGPO's two-level advantage (arXiv:2505.10978)."""

    gamma: float = option(0.95, "Discount of the step returns Rd.", paper=0.95, domain=UNIT)
    omega: float = option(1.0, "Weight of the step-level advantage A_S.", paper=1.0, domain=NON_NEGATIVE)
    normalization: Literal["mean", "mean_std"] = option(
        "mean", "F = 1 ('mean', the ALFWorld scripts) or the group's std + 1e-6 ('mean_std').", paper="mean")
    episode_weighting: Literal["trajectory", "step"] = option(
        "trajectory", "Episode mean and std over the task's trajectories (the paper's formula) or over its step rows "
        "(the released code: a trajectory counts once per step).", paper="trajectory")


class GiGPO(Method):
    """Episode-level plus anchor-state step-level advantages for multi-turn agents."""

    name = "gigpo"
    Config = GiGPOConfig
    paper = "https://arxiv.org/abs/2505.10978"

    @classmethod
    def example(cls) -> Example:
        return Example(nonzero_constant_groups="a state shared by trajectories of different lengths has different "
                       "discounted returns, so A_S is not 0 even when every episode return of the group is equal",
                       min_group_size=1)

    def needs(self) -> Needs:
        return Needs(batch_fields={"steps", "completion_mask"},
                     why={"steps": "the turns of each trajectory, their rewards and the states they acted in"})

    @hookimpl
    def compute_advantages(self, batch: GRPOBatch) -> torch.Tensor:
        """``(N, T)`` per-token advantages: ``A(i,t)`` on the tokens of step ``(i,t)``, 0 elsewhere."""
        task, _, _ = trajectories_of_batch(batch, self.name)
        c = self.config
        advantage, a_step, shared = gigpo_step_advantages(batch.steps, task, batch.rewards, c.gamma, c.omega,
                                                          c.normalization == "mean_std", c.episode_weighting)
        per_token = step_values_on_tokens(advantage, batch.steps, batch.completion_mask).to(batch.rewards.dtype)
        self.log_metric("frac_shared_state_steps", shared.double().mean())
        self.log_metric("frac_nonzero_step_advantage", (a_step != 0).double().mean())
        return per_token
