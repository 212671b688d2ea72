"""The built-in ``grpo`` method: GRPO's group-normalised advantage.

It is an ordinary method on the same plugin manager as every other, and the default provider of
``compute_advantages``; with it alone an adapter behaves like the trainer it wraps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from grpo_plugins import NON_NEGATIVE, hookimpl
from grpo_plugins.batch import GRPOBatch
from grpo_plugins.config import option
from grpo_plugins.method import Method
from grpo_plugins.ops import global_mean_std, group_normalize


@dataclass(frozen=True)
class GRPOConfig:
    """Group Relative Policy Optimisation (Shao et al., 2024, arXiv:2402.03300)."""

    scale: Literal["group", "batch", "none"] = option(
        "group",
        "Divide the centred reward by the group's std ('group'), the whole batch's std ('batch'), or "
        "not at all ('none', Dr. GRPO). Adapters default it to the trainer's own setting.",
    )
    epsilon: float = option(
        1e-6, "Added to the std before dividing. Adapters default it to the trainer's value.", domain=NON_NEGATIVE
    )


class GRPO(Method):
    """Plain GRPO: A = (r - mean of the prompt's group) / (std + epsilon), broadcast to every token."""

    name = "grpo"
    Config = GRPOConfig
    paper = "https://arxiv.org/abs/2402.03300"

    @hookimpl
    def compute_advantages(self, batch: GRPOBatch) -> torch.Tensor:
        """``(N,)`` group-relative advantages; groups of one have no baseline and are an error."""
        batch.require_group_size(
            2, "group normalisation (give every prompt >= 2 completions, or enable a method built for single "
            "completions such as spo)"
        )
        scale = self.config.scale
        advantages = group_normalize(
            batch.rewards, batch.group_index, batch.num_groups, scale_by_std=scale == "group", epsilon=self.config.epsilon
        )
        if scale == "batch":
            _, std = global_mean_std(batch.rewards, batch.parallel)
            advantages = advantages / (std + self.config.epsilon)
        zero_std = (advantages == 0).float().mean()
        self.log_metric("frac_zero_advantage", zero_std)
        return advantages
