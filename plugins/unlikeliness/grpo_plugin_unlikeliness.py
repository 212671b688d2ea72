"""Unlikeliness reward (He, Fried, Welleck, 2025, "Rewarding the Unlikely", arXiv:2506.02355).

GRPO reinforces most the correct completions the model already finds likely, which sharpens the
distribution and lowers pass@N for large N. The unlikeliness reward cuts each completion's reward by
its likelihood rank within its group:

    R'_i = R_i * (1 - beta * rank_i / G_i),

where ``rank_i`` in ``{0, ..., G_i - 1}`` is the ascending position of the completion's score
``s_i`` (its behaviour-policy log-likelihood, by default the mean over its tokens) among the ``G_i``
completions of its prompt, ties broken by batch position. The rarest completion keeps its reward,
the most likely loses ``beta (G_i - 1) / G_i`` of it. Advantages are then GRPO's z-score of ``R'``.

Shapes: ``N`` completions, ``T`` completion tokens, ``G`` groups (sizes may differ).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from grpo_plugins import UNIT, GRPOBatch, Method, hookimpl, option
from grpo_plugins.ops import constant_groups, group_ranks, masked_mean, masked_sum


def sequence_scores(old_log_probs: torch.Tensor, mask: torch.Tensor, reduce: Literal["mean", "sum"] = "mean") -> torch.Tensor:
    """Each completion's log-likelihood score -> ``(N,)``.

    Args:
        old_log_probs: ``(N, T)`` behaviour-policy token log-probs (padding may hold anything).
        mask: ``(N, T)`` completion mask (> 0 on real tokens).
        reduce: ``"mean"`` (length-normalised, the released code) or ``"sum"`` (the sequence log-likelihood).

    A completion without tokens scores 0. Raises ``ValueError`` on NaN log-probs of real tokens.
    """
    keep = mask > 0
    values = torch.where(keep, old_log_probs, torch.zeros_like(old_log_probs))
    if bool(torch.isnan(values).any()):
        rows = torch.isnan(values).any(-1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"old_log_probs are NaN on real completion tokens of completion(s) {rows}")
    tokens = keep.to(values.dtype)
    return masked_mean(values, tokens, dim=-1) if reduce == "mean" else masked_sum(values, tokens, dim=-1)


def unlikeliness_rewards(
    rewards: torch.Tensor,
    scores: torch.Tensor,
    index: torch.Tensor,
    num_groups: int,
    rank_penalty: float = 0.25,
) -> torch.Tensor:
    """``R' = R * (1 - rank_penalty * rank / G_i)`` -> ``(N,)``.

    Args:
        rewards: ``(N,)`` finite rewards (binary in the paper: incorrect completions stay 0).
        scores: ``(N,)`` likelihood scores (see :func:`sequence_scores`).
        index: ``(N,)`` group of each completion in ``[0, G)``.
        num_groups: ``G``.
        rank_penalty: ``beta``.
    """
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN/inf; the unlikeliness reward needs finite rewards")
    ranks = group_ranks(index, num_groups, scores).to(rewards.dtype)
    sizes = torch.bincount(index, minlength=num_groups).to(rewards.dtype)
    return rewards * (1.0 - rank_penalty * ranks / sizes[index])


@dataclass(frozen=True)
class UnlikelinessConfig:
    """Unlikeliness reward (He, Fried, Welleck, 2025, arXiv:2506.02355)."""

    rank_penalty: float = option(
        0.25, "beta: the most likely of G completions loses beta*(G-1)/G of its reward (the release's lean.rank_penalty).",
        domain=UNIT,
    )
    score: Literal["mean", "sum"] = option(
        "mean",
        "How token log-probs make the ranking score: 'mean' over completion tokens (length-normalised, as the "
        "released code does) or 'sum' (the sequence log-likelihood).",
    )
    shape_uniform_groups: bool = option(
        True,
        "Shape groups whose incoming rewards are all equal (e.g. all correct), giving them a signal. False leaves "
        "them unshaped (zero advantage), which is what the release's advantage_threshold filter amounts to.",
        paper=False,
    )


class Unlikeliness(Method):
    """Unlikeliness reward: cut correct completions' rewards by their likelihood rank in the group."""

    name = "unlikeliness"
    Config = UnlikelinessConfig
    paper = "https://arxiv.org/abs/2506.02355"

    def requires(self) -> set[str]:
        """The behaviour log-probs that rank the completions."""
        return {"old_log_probs"}

    @hookimpl
    def shape_rewards(self, batch: GRPOBatch, rewards: torch.Tensor) -> torch.Tensor:
        """``(N,)`` rank-penalised rewards; needs ``batch.old_log_probs`` and ``batch.completion_mask``."""
        if batch.old_log_probs is None or batch.completion_mask is None:
            missing = "old_log_probs" if batch.old_log_probs is None else "completion_mask"
            raise ValueError(
                f"the unlikeliness reward ranks completions by their behaviour-policy log-likelihood, but the batch "
                f"has no {missing}. The adapter must provide per-token old log-probs (this method requires them; "
                "the TRL adapter computes them when TRL itself would not)"
            )
        scores = sequence_scores(batch.old_log_probs, batch.completion_mask, self.config.score)
        index, groups = batch.group_index, batch.num_groups
        shaped = unlikeliness_rewards(rewards, scores, index, groups, self.config.rank_penalty)
        if not self.config.shape_uniform_groups:
            shaped = torch.where(constant_groups(rewards, index, groups)[index], rewards, shaped)
        with torch.no_grad():
            rewarded = rewards != 0
            if bool(rewarded.any()):
                self.log_metric("mean_reward_scale", (shaped[rewarded] / rewards[rewarded]).mean())
            multi = batch.group_sizes > 1
            if bool(multi.any()):
                flat_before = constant_groups(rewards, index, groups)[multi]
                flat_after = constant_groups(shaped, index, groups)[multi]
                self.log_metric("frac_flat_groups_before", flat_before.float().mean())
                self.log_metric("frac_flat_groups_after", flat_after.float().mean())
        return shaped
