"""Length penalty: subtract a fixed cost per completion token from every reward.

    shaped_i = r_i - penalty_per_token * L_i

``r``: ``(N,)`` rewards, ``L``: ``(N,)`` completion lengths (tokens kept by the completion mask).
A linear length cost is the simplest way to make a policy prefer short answers among equally good
ones; it is a worked example of a third-party method distribution, not the method of one paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpo_plugins import NON_NEGATIVE, GRPOBatch, Method, hookimpl, option


def length_penalised_rewards(
    rewards: torch.Tensor, completion_mask: torch.Tensor, penalty_per_token: float
) -> torch.Tensor:
    """``rewards`` ``(N,)`` minus ``penalty_per_token`` times the length of each completion.

    ``completion_mask``: ``(N, T)``, non-zero on real completion tokens. Returns ``(N,)``.
    """
    lengths = completion_mask.gt(0).sum(dim=-1).to(rewards.dtype)
    return rewards - penalty_per_token * lengths


@dataclass(frozen=True)
class LengthPenaltyConfig:
    """Options of the length penalty."""

    penalty_per_token: float = option(
        0.001,
        "Reward subtracted per completion token. 0.001 costs a 1000-token answer one unit of a 0/1 reward.",
        domain=NON_NEGATIVE,
    )


class LengthPenalty(Method):
    """Subtract a per-token length penalty from each completion's reward (shape_rewards)."""

    name = "length_penalty"
    Config = LengthPenaltyConfig
    paper = ""

    @hookimpl
    def shape_rewards(self, batch: GRPOBatch, rewards: torch.Tensor) -> torch.Tensor:
        """``(N,)`` rewards minus the per-token penalty times the completion length."""
        shaped = length_penalised_rewards(rewards, batch.token_mask, self.config.penalty_per_token)
        self.log_metric("mean_penalty", (rewards - shaped).mean())
        return shaped
