"""SALT: step-level advantage assignment for long-horizon agents via a trajectory graph (arXiv:2510.20022;
no public code found).

A group is the ``G`` trajectories of one prompt; trajectory ``i`` is a sequence of steps (policy turns,
``GRPOBatch.steps``) with outcome advantage ``A_i``, GRPO's ``(R_i - mean_j R_j) / (std_j R_j + eps)`` over the
prompt's trajectories (``R_i``: the trajectory's outcome, as in ``flow_grpo``). The trajectories form a graph
whose edges are (state, action) pairs; an edge shared by several trajectories carries their mean advantage:

    A_{i,t} = (1 / |S(e)|) sum_{j in S(e)} A_j,    e = edge(i, t),  S(e) = the distinct trajectories through e

so steps common to successes and failures are pulled toward 0 while steps unique to one trajectory keep
``A_i``. Edge keys (``edge``):

- ``"prefix"`` (a tree): the history up to the step, ``(s_0, a_0, ..., s_t, a_t)``: steps merge while their
  trajectories coincide;
- ``"state"``: ``(s_t, a_t)``: an identical action from the same state merges anywhere.

An action is the exact token sequence of the step (``completion_ids`` over its span); a state is the step's
``Steps.key``. Unknown states (key -1) add nothing to a prefix (the actions then decide) and never merge
under ``"state"`` keying. Edges never join two prompts. With no shared edge SALT is the trajectory GRPO
advantage broadcast to the turns. A prompt whose outcomes are all equal gets exactly 0.

Shapes: ``N`` rows, ``T`` tokens, ``S`` steps, ``M`` trajectories, ``E`` edges, ``W`` the longest step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from grpo_plugins import NON_NEGATIVE, Example, GRPOBatch, Method, Needs, hookimpl, option
from grpo_plugins.ops import group_ranks, segment_count, segment_sum
from grpo_plugins.steps import Steps, episode_advantages, step_values_on_tokens, trajectories_of_batch


def step_actions(steps: Steps, completion_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(S,)`` int64 action id of each step: equal ids exactly when the steps' real tokens (``mask`` > 0)
    are the same sequence. The spans are gathered into one ``(S, W)`` matrix (no loop)."""
    if steps.num_steps == 0:
        return steps.row.new_zeros(0)
    length = steps.end - steps.start
    offsets = torch.arange(int(length.max()), device=steps.row.device)
    position = (steps.start[:, None] + offsets).clamp(max=mask.shape[1] - 1)
    rows = steps.row[:, None].expand_as(position)
    real = (offsets < length[:, None]) & (mask[rows, position] > 0)
    tokens = torch.where(real, completion_ids[rows, position].long(), -1)
    return torch.unique(tokens, dim=0, return_inverse=True)[1]


def edge_index(steps: Steps, task: torch.Tensor, trajectory: torch.Tensor, num_trajectories: int,
               action: torch.Tensor, keying: Literal["prefix", "state"]) -> tuple[torch.Tensor, int]:
    """``(edge, E)``: the graph edge of each step ``(S,)`` in ``[0, E)``.

    ``"state"``: one edge per distinct (task, state, action), a step of unknown state alone. ``"prefix"``:
    one node per distinct history, built turn by turn over an ``(M, L)`` grid of the steps in turn order:
    the node of step ``(i, t)`` is the distinct (node of ``(i, t-1)`` -- the task for ``t = 0`` --, state,
    action); the loop runs over the ``L`` turns, never over steps.
    """
    s = steps.num_steps
    if keying == "state":
        state = torch.where(steps.key >= 0, steps.key, -1 - torch.arange(s, device=steps.key.device))
        edges, edge = torch.unique(torch.stack([task, state, action]), dim=1, return_inverse=True)
        return edge, int(edges.shape[1])
    position = group_ranks(trajectory, num_trajectories, steps.turn.double())
    width = int(position.max()) + 1 if s else 0
    grid = torch.full((num_trajectories, width), -1, dtype=torch.long, device=steps.row.device)
    grid[trajectory, position] = torch.arange(s, device=steps.row.device)
    node, count = torch.empty(s, dtype=torch.long, device=steps.row.device), 0
    for column in range(width):
        present = grid[:, column] >= 0
        here = grid[present, column]
        parent = task[here] if column == 0 else node[grid[present, column - 1]]
        _, ids = torch.unique(torch.stack([parent, steps.key[here], action[here]]), dim=1, return_inverse=True)
        node[here] = ids + count
        count += int(ids.max()) + 1
    return node, count


def salt_step_advantages(outcome_advantage: torch.Tensor, trajectory: torch.Tensor, num_trajectories: int,
                         edge: torch.Tensor, num_edges: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_step, shared)`` ``(S,)``: the mean of ``A_j`` over the distinct trajectories through each step's edge
    (float64), and whether that edge holds other trajectories.

    ``outcome_advantage`` ``(S,)`` is each step's trajectory advantage ``A_i`` (equal on a trajectory's steps).
    """
    per_trajectory = outcome_advantage.new_zeros(num_trajectories).scatter_(0, trajectory, outcome_advantage)
    pairs = torch.unique(torch.stack([edge, trajectory]), dim=1)  # (2, P): each trajectory once per edge
    total = segment_sum(per_trajectory[pairs[1]], pairs[0], num_edges)
    members = segment_count(pairs[0], num_edges)
    return (total / members.clamp(min=1).to(total.dtype))[edge], members[edge] > 1


@dataclass(frozen=True)
class SALTConfig:
    """SALT's trajectory-graph step advantages (arXiv:2510.20022)."""

    edge: Literal["prefix", "state"] = option(
        "prefix", "Edge key: the step's history of states and actions ('prefix', a tree) or its (state, action) pair "
        "('state'). Inferred from the abstract.", paper="prefix")
    normalization: Literal["mean_std", "mean"] = option(
        "mean_std", "Outcome advantage divided by the group's unbiased std + epsilon ('mean_std', GRPO) or only "
        "centred ('mean').", paper="mean_std")
    epsilon: float = option(1e-6, "Added to the std before dividing.", paper=1e-6, domain=NON_NEGATIVE)
    episode_weighting: Literal["trajectory", "step"] = option(
        "trajectory", "Outcome mean and std over the prompt's trajectories, or over its turn rows (a trajectory "
        "counted once per turn, as verl's GRPO on rows that are turns).", paper="trajectory")


class SALT(Method):
    """The outcome advantage averaged over the trajectories that share each step's edge."""

    name = "salt"
    Config = SALTConfig
    paper = "https://arxiv.org/abs/2510.20022"

    @classmethod
    def example(cls) -> Example:
        return Example(min_group_size=1)

    def needs(self) -> Needs:
        return Needs(batch_fields={"steps", "completion_mask", "completion_ids"},
                     why={"steps": "the turns of each trajectory and the states they acted in",
                          "completion_ids": "the actions (token sequences) that key the graph's edges"})

    @hookimpl
    def compute_advantages(self, batch: GRPOBatch) -> torch.Tensor:
        """``(N, T)``: ``A_{i,t}`` on the tokens of step ``(i, t)``, 0 on environment tokens and padding."""
        steps, mask, c = batch.steps, batch.completion_mask, self.config
        task, trajectory, m = trajectories_of_batch(batch, self.name)
        outcome, _ = episode_advantages(steps, task, trajectory, m, batch.rewards, c.normalization == "mean_std",
                                        c.episode_weighting, c.epsilon)
        action = step_actions(steps, batch.completion_ids, mask)
        edge, num_edges = edge_index(steps, task, trajectory, m, action, c.edge)
        advantage, shared = salt_step_advantages(outcome, trajectory, m, edge, num_edges)
        if steps.num_steps:
            self.log_metric("frac_shared_steps", shared.double().mean())
            self.log_metric("mean_abs_shift", (advantage - outcome).abs().mean())
        return step_values_on_tokens(advantage, steps, mask).to(batch.rewards.dtype)
