"""Flow-GRPO: in-the-flow optimisation of agentic systems (Li et al., 2025, AgentFlow, arXiv:2510.05592;
code lupantech/AgentFlow, a verl trainer with ``algorithm.adv_estimator=grpo``).

A group is the ``G`` trajectories of one query (one prompt); trajectory ``i`` is a sequence of ``T_i`` policy
turns (steps, ``GRPOBatch.steps``) and earns one verifiable outcome ``R_i``. Every turn gets the
trajectory's group-relative advantage:

    A_{i,t} = (R_i - mean_j R_j) / (std_j R_j + eps)        for every turn t of trajectory i

(std unbiased, ``eps = 1e-6``; ``normalization="mean"`` drops the division). The statistics run over the
query's trajectories (``episode_weighting="trajectory"``, the paper) or over its turn rows, a trajectory
counted once per turn (``"step"``: the released code gives verl's GRPO one row per turn carrying the
trajectory's reward). ``R_i`` is the trajectory's outcome, the reward of its row after any
``shape_rewards`` (on rows that are turns: the row of its last turn), copied to every turn as the card's
single verifiable final reward; the method reads no step rewards (``Steps.reward`` is ignored: an
environment's per-turn rewards belong to ``gigpo`` or ``salt``).
A query with one trajectory scores it against mean 0 and std 1 (``A = R``, as verl does); a query whose
outcomes are all equal gets exactly 0.

The paper's objective averages each trajectory's turns and each turn's tokens,
``(1/G) sum_i (1/T_i) sum_t (1/|a_it|) sum_k loss_{i,t,k}`` (``turn_weighting="nested"``). With the
trainer's sequence-mean aggregation (each row's token mean, then the mean over rows) this is the gate
``g_{r,k} = |o_r| (N / M) / (T_i |a_it|)`` on token ``k`` of turn ``t`` in row ``r``, where ``|o_r|`` is the
row's loss-mask count, ``N`` the batch's rows and ``M`` its trajectories (``N = M`` on TRL, where a row is a
trajectory). ``turn_weighting="trainer"`` keeps the trainer's aggregation (the released code: verl's token
mean over turn rows).

Shapes: ``N`` rows, ``T`` tokens, ``S`` steps, ``M`` trajectories, ``B`` rows of a loss micro-batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from grpo_plugins import NON_NEGATIVE, Example, GRPOBatch, LossInputs, Method, Needs, hookimpl, option
from grpo_plugins.ops import segment_count
from grpo_plugins.steps import Steps, episode_advantages, step_values_on_tokens, token_step_index, trajectories_of_batch

TURN_WEIGHT = "flow_grpo_turn_weight"
"""``row_data`` key of the ``(N, T)`` nested-average weight ``(N / M) / (T_i |a_it|)`` of each token."""


def nested_turn_weights(steps: Steps, trajectory: torch.Tensor, num_trajectories: int,
                        mask: torch.Tensor) -> torch.Tensor:
    """``(N, T)`` float64 ``(N / M) / (T_i |a_it|)`` on the real tokens of step ``(i, t)``, 0 elsewhere.

    ``T_i``: the steps of trajectory ``i``; ``|a_it|``: the real tokens (``mask`` ``(N, T)`` > 0) of the step.
    Times a row's loss-mask count under a sequence-mean aggregation it gives each token the paper's weight
    ``1 / (M T_i |a_it|)`` of the batch's loss.
    """
    n, t = mask.shape
    step_of_token = token_step_index(steps, n, t)
    real = (step_of_token >= 0) & (mask > 0)
    tokens = segment_count(step_of_token[real], steps.num_steps).double()  # |a_it|, (S,)
    turns = segment_count(trajectory, num_trajectories).double()[trajectory]  # T_i, (S,)
    per_step = (n / num_trajectories) / (turns * tokens.clamp(min=1.0))
    return step_values_on_tokens(per_step, steps, mask)


@dataclass(frozen=True)
class FlowGRPOConfig:
    """Flow-GRPO's turn-broadcast outcome advantage (arXiv:2510.05592)."""

    normalization: Literal["mean_std", "mean"] = option(
        "mean_std", "Divide the centred outcome by the group's unbiased std + epsilon ('mean_std') or not ('mean').",
        paper="mean_std")
    epsilon: float = option(1e-6, "Added to the std before dividing.", paper=1e-6, domain=NON_NEGATIVE)
    episode_weighting: Literal["trajectory", "step"] = option(
        "trajectory", "Mean and std over the query's trajectories (the paper's formula) or over its turn rows "
        "(the released code: verl's GRPO on one row per turn, a trajectory counted once per turn).",
        paper="trajectory")
    turn_weighting: Literal["trainer", "nested"] = option(
        "trainer", "The trainer's loss aggregation ('trainer', the released code: verl's token mean over turn rows) or "
        "the paper's nested average 1/(G T_i |a_it|) ('nested'; needs a sequence-mean aggregation: TRL loss_type "
        "'grpo' or 'sapo', verl loss_agg_mode 'seq-mean-token-mean').", paper="nested")


class FlowGRPO(Method):
    """The trajectory's group-relative outcome advantage on every turn; optionally the paper's turn averaging."""

    name = "flow_grpo"
    Config = FlowGRPOConfig
    paper = "https://arxiv.org/abs/2510.05592"

    @classmethod
    def example(cls) -> Example:
        return Example(min_group_size=1)

    def disabled_hooks(self) -> set[str]:
        return set() if self.config.turn_weighting == "nested" else {"gate_loss"}

    def needs(self) -> Needs:
        why = {"steps": "the turns of each trajectory"}
        if self.config.turn_weighting != "nested":
            return Needs(batch_fields={"steps", "completion_mask"}, why=why)
        return Needs(batch_fields={"steps", "completion_mask"}, loss_fields={"row_data"},
                     settings={"loss_aggregation": ("sequence_mean",)},
                     why={**why, "row_data": "each token's turn-count weight, carried to the loss",
                          "loss_aggregation": "turn_weighting='nested' turns each row's token mean into the paper's "
                          "average over turns (use turn_weighting='trainer' with other aggregations)"})

    @hookimpl
    def compute_advantages(self, batch: GRPOBatch) -> torch.Tensor:
        """``(N, T)``: the trajectory's ``A_i`` on the tokens of each of its turns, 0 on environment tokens."""
        steps, mask, c = batch.steps, batch.completion_mask, self.config
        task, trajectory, m = trajectories_of_batch(batch, self.name)
        # outcome only: with every step reward unknown, R_i is the (shaped) reward of its last turn's row
        outcome_only = dataclasses.replace(steps, reward=torch.full_like(steps.reward, float("nan")))
        advantage, _ = episode_advantages(outcome_only, task, trajectory, m, batch.rewards,
                                          c.normalization == "mean_std", c.episode_weighting, c.epsilon)
        if c.turn_weighting == "nested":
            batch.row_data[TURN_WEIGHT] = nested_turn_weights(steps, trajectory, m, mask).to(batch.rewards.dtype)
        if m:
            self.log_metric("turns_per_trajectory", torch.tensor(steps.num_steps / m))
        zero = (advantage == 0).double().mean() if steps.num_steps else torch.tensor(1.0)
        self.log_metric("frac_zero_advantage", zero)
        return step_values_on_tokens(advantage, steps, mask).to(batch.rewards.dtype)

    @hookimpl
    def gate_loss(self, inputs: LossInputs) -> torch.Tensor:
        """``(B, T)`` gate ``|o_r| (N / M) / (T_i |a_it|)`` (``|o_r|`` the row's loss-mask count)."""
        weight = inputs.row_data.get(TURN_WEIGHT)
        if weight is None:
            raise ValueError(f"flow_grpo: row_data['{TURN_WEIGHT}'] is missing; the adapter must carry row_data to "
                             "the loss")
        row_tokens = (inputs.mask > 0).sum(dim=-1, keepdim=True).to(inputs.log_probs.dtype)
        return weight.to(inputs.log_probs.dtype) * row_tokens
