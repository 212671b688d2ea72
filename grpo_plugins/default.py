"""The built-in ``grpo`` method: GRPO's group-normalised advantage.

It is an ordinary method on the same plugin manager as every other, and the default provider of
``compute_advantages``; with it alone an adapter behaves like the trainer it wraps: each adapter sets
its trainer's defaults (``scale``, ``epsilon``, ``arithmetic``, ``aggregation``) so that the same
numbers come out, bit for bit, with one deliberate difference: a group whose rewards are all equal gets
exactly 0 (the trainers leave the rounding residue of their float mean, divided by ``std + epsilon``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from grpo_plugins import NON_NEGATIVE, hookimpl
from grpo_plugins.batch import GRPOBatch
from grpo_plugins.config import option
from grpo_plugins.method import Method
from grpo_plugins.arithmetic import group_mean_std, two_pass_std
from grpo_plugins.ops import constant_groups, global_mean_std, group_normalize


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
    arithmetic: Literal["segments", "trl", "verl"] = option(
        "segments",
        "How the group statistics are rounded: 'segments' (one pass of segment sums, any group sizes), or "
        "exactly as 'trl' or 'verl' compute them (their adapters default to their own; 'verl' also scores a "
        "group of one against mean 0 and std 1, as verl does). The values agree to ~1e-7.",
    )
    aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = option(
        "sum_then_normalize",
        "How several reward functions combine: normalise their weighted sum ('sum_then_normalize'), or "
        "normalise each function within the group, sum with the weights and normalise the sum over the batch "
        "('normalize_then_sum', TRL's multi_objective_aggregation; 'scale' is then ignored). Adapters default "
        "it to the trainer's setting.",
    )

    def __post_init__(self):
        if self.aggregation == "normalize_then_sum" and self.arithmetic == "verl":
            raise ValueError("aggregation='normalize_then_sum' is computed in TRL's arithmetic (arithmetic='trl' "
                             "or 'segments'), not verl's")


class GRPO(Method):
    """Plain GRPO: A = (r - mean of the prompt's group) / (std + epsilon), broadcast to every token."""

    name = "grpo"
    Config = GRPOConfig
    paper = "https://arxiv.org/abs/2402.03300"

    @hookimpl
    def compute_advantages(self, batch: GRPOBatch) -> torch.Tensor:
        """``(N,)`` group-relative advantages; groups of one have no baseline and are an error (except with
        ``arithmetic="verl"``, which scores them as verl does)."""
        config = self.config
        if config.arithmetic != "verl":
            batch.require_group_size(
                2, "group normalisation (give every prompt >= 2 completions, or enable a method built for single "
                "completions such as spo)"
            )
        if config.aggregation == "normalize_then_sum":
            advantages = self._normalize_then_sum(batch)
        elif config.arithmetic == "segments":
            advantages = group_normalize(batch.rewards, batch.group_index, batch.num_groups,
                                         scale_by_std=config.scale == "group", epsilon=config.epsilon)
            if config.scale == "batch":
                _, std = global_mean_std(batch.rewards, batch.parallel)
                advantages = advantages / (std + config.epsilon)
        else:
            advantages = self._exact(batch)
        self.log_metric("frac_zero_advantage", (advantages == 0).float().mean())
        return advantages

    def _exact(self, batch: GRPOBatch) -> torch.Tensor:
        """``(r - mean_g) / (std + epsilon)`` with the statistics rounded as ``config.arithmetic``'s trainer
        rounds them; ``std`` is the group's, the batch's (TRL: ``nanstd`` of every reward; the batch is
        gathered) or none. Constant groups: exactly 0."""
        config, rewards, index = self.config, batch.rewards, batch.group_index
        mean, std = group_mean_std(rewards, index, batch.num_groups, config.arithmetic)
        advantages = rewards - mean[index]
        if config.scale == "group":
            advantages = advantages / (std[index] + config.epsilon)
        elif config.scale == "batch":
            std = two_pass_std(rewards) if config.arithmetic == "trl" else global_mean_std(rewards, batch.parallel)[1]
            advantages = advantages / (std + config.epsilon)
        constant = constant_groups(rewards, index, batch.num_groups) & (batch.group_sizes > 1)
        return torch.where(constant[index], torch.zeros_like(advantages), advantages)

    def _normalize_then_sum(self, batch: GRPOBatch) -> torch.Tensor:
        """TRL's ``normalize_then_sum``, in TRL's arithmetic: each reward function normalised within its
        group, ``(c - mean_g) / (std_g + epsilon)`` (NaN: did not apply, ignored), summed with the reward
        weights, and the sum normalised over the (gathered) batch, ``(s - mean) / (std + epsilon)``. A
        function constant within a group contributes exactly 0 there, a constant sum gives exactly 0."""
        index, groups, epsilon = batch.group_index, batch.num_groups, self.config.epsilon
        components = batch.reward_components if batch.reward_components is not None else batch.rewards[:, None]
        weights = batch.reward_weights if batch.reward_weights is not None else components.new_ones(components.shape[1])
        mean, std = group_mean_std(components, index, groups, "trl")
        normalised = (components - mean[index]) / (std[index] + epsilon)
        columns = index[:, None].expand_as(components)
        spread = (components.new_full(mean.shape, -torch.inf).scatter_reduce(0, columns, components, "amax")
                  - components.new_full(mean.shape, torch.inf).scatter_reduce(0, columns, components, "amin"))
        normalised = torch.where((spread == 0)[index], torch.zeros_like(normalised), normalised)
        summed = (normalised * weights.to(components.dtype)[None, :]).nansum(dim=1)
        if bool(summed.max() == summed.min()):
            return torch.zeros_like(summed)
        return (summed - torch.nanmean(summed)) / (two_pass_std(summed) + epsilon)
