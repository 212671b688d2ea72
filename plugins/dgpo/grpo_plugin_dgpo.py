"""DGPO: Difficulty-aware Group Policy Optimisation (MathForge, "Harder Is Better", arXiv:2601.20614).

GRPO divides a group's centred rewards by their standard deviation. With 0/1 rewards and accuracy
``p`` the group's total ``|A|`` is then ``2 G sqrt(p (1 - p))``: hard (and easy) questions get a
smaller update than questions at ``p = 1/2``. DGPO fixes the total and then tilts it toward hard
questions, in three factors:

    DGAE (mean-absolute-deviation scaling), per group g of size G:
        A_i = G (r_i - mean_g r) / (sum_{j in g} |r_j - mean_g r| + eps)      (0 for a constant group)
        so that sum_{i in g} |A_i| = G for every accuracy.
    DQW (difficulty question weighting), over the valid groups (reward not constant) of the batch:
        acc_g = mean accuracy reward of g, with acc_g = 0 read as 1 (valid only through another reward)
        lambda_g = M_v softmax_g(-acc_g / T)          (mean 1 over the M_v valid groups)
        lambda_g = 1 for invalid groups
    Valid-token ratio (the token-mean loss divides by every token, but invalid groups carry no signal):
        rho = tokens(all completions) / tokens(completions of valid groups)     (1 if none is valid)

    A_final_i = A_i * lambda_g(i) * rho

Shapes: ``N`` completions, ``G`` groups, ``T`` tokens, ``K`` reward components. Advantages are
``(N,)``. Batch-global sums (valid groups, softmax denominator, token counts) go through
``ParallelContext.all_reduce_sum``, so they are correct across data-parallel ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpo_plugins import NON_NEGATIVE, GRPOBatch, Method, ParallelContext, Range, hookimpl, option
from grpo_plugins import Example
from grpo_plugins.ops import segment_count, segment_max, segment_mean, segment_min, segment_sum


def dgae_advantages(rewards: torch.Tensor, index: torch.Tensor, num_groups: int, epsilon: float = 1e-4) -> torch.Tensor:
    """Mean-absolute-deviation scaled advantages ``G (r - mean_g) / (sum_g |r - mean_g| + epsilon)`` -> ``(N,)``.

    ``rewards``: ``(N,)`` finite; ``index``: ``(N,)`` group of each completion in ``[0, G)``; ``G``
    in the formula is each group's own size. A group whose rewards are all equal (a group of one
    included) gives exactly 0.
    """
    centred = rewards - segment_mean(rewards, index, num_groups).index_select(0, index)
    spread = segment_sum(centred.abs(), index, num_groups)
    sizes = segment_count(index, num_groups).to(rewards.dtype)
    scaled = sizes.index_select(0, index) * centred / (spread.index_select(0, index) + epsilon)
    constant = segment_max(rewards, index, num_groups) == segment_min(rewards, index, num_groups)
    return torch.where(constant.index_select(0, index), torch.zeros_like(scaled), scaled)


def difficulty_weights(
    accuracy: torch.Tensor, valid: torch.Tensor, temperature: float = 2.0, parallel: ParallelContext | None = None
) -> torch.Tensor:
    """DQW weights ``lambda_g = M_v softmax(-acc_g / T)`` over valid groups, 1 elsewhere -> ``(G,)``.

    Args:
        accuracy: ``(G,)`` mean accuracy reward per group, in ``[0, 1]``; 0 is read as 1 (a group
            that is valid only through another reward component is treated as the easiest).
        valid: ``(G,)`` bool, groups whose total reward is not constant.
        temperature: ``T`` > 0.
        parallel: data-parallel context; ``M_v`` and the softmax denominator are global sums.

    The softmax is computed as ``exp((1 - acc) / T) / sum(...)`` in float64: the shift by ``1 / T``
    (the largest possible logit) keeps every term in ``[1, exp(1 / T)]``, so no global maximum is
    needed.
    """
    parallel = parallel or ParallelContext()
    acc = torch.where(accuracy == 0, torch.ones_like(accuracy), accuracy).double()
    terms = torch.where(valid, torch.exp((1.0 - acc) / temperature), torch.zeros_like(acc))
    total, num_valid = parallel.all_reduce_sum(torch.stack([terms.sum(), valid.sum().double()])).unbind()
    weights = num_valid * terms / total.clamp(min=torch.finfo(torch.float64).tiny)
    return torch.where(valid, weights, torch.ones_like(weights)).to(accuracy.dtype)


def valid_token_ratio(lengths: torch.Tensor, valid_member: torch.Tensor, parallel: ParallelContext | None = None) -> torch.Tensor:
    """``tokens(all) / tokens(valid groups)`` over the global batch -> scalar (1 when no valid token).

    ``lengths``: ``(N,)`` completion lengths; ``valid_member``: ``(N,)`` bool, the completion's group is valid.
    """
    parallel = parallel or ParallelContext()
    lengths = lengths.double()
    sums = torch.stack([lengths.sum(), torch.where(valid_member, lengths, torch.zeros_like(lengths)).sum()])
    total, valid_tokens = parallel.all_reduce_sum(sums).unbind()
    return torch.where(valid_tokens > 0, total / valid_tokens.clamp(min=1), torch.ones_like(total))


def group_accuracy(accuracy: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Mean accuracy per group over the completions where it applied (NaN = did not apply) -> ``(G,)``;
    a group where it never applied gets 0 (read as "unsolved")."""
    applied = ~torch.isnan(accuracy)
    values = torch.where(applied, accuracy, torch.zeros_like(accuracy))
    counts = segment_sum(applied.to(accuracy.dtype), index, num_groups)
    return segment_sum(values, index, num_groups) / counts.clamp(min=1)


@dataclass(frozen=True)
class DGPOConfig:
    """DGPO (MathForge, arXiv:2601.20614): MAD-scaled group advantages x difficulty weights x valid-token ratio."""

    temperature: float = option(
        2.0, "DQW softmax temperature T: lower puts more weight on hard questions.", paper=2.0,
        domain=Range(0.01, None),
    )
    epsilon: float = option(1e-4, "Added to the group's summed absolute deviation.", paper=1e-4, domain=NON_NEGATIVE)
    mad_scaling: bool = option(
        True, "Scale by the mean absolute deviation (DGAE); False keeps only the mean-centred reward "
        "(the paper code's scale_rewards=False).", paper=True,
    )
    difficulty_weighting: bool = option(True, "Apply the difficulty weights DQW (enable_dgpo_dqw).", paper=True)
    token_ratio: bool = option(
        True, "Multiply by tokens(all) / tokens(valid groups), for a token-mean loss.", paper=True,
    )
    accuracy_reward: str = option(
        "", "Name of the reward component DQW reads as accuracy (in [0, 1]); '' = the first reward "
        "function, as the paper code does (rewards_per_func[:, 0]).", paper="",
    )


class DGPO(Method):
    """DGPO: MAD-scaled group advantages, softmax difficulty weights over valid groups, valid-token ratio."""

    name = "dgpo"
    Config = DGPOConfig
    paper = "https://arxiv.org/abs/2601.20614"

    @classmethod
    def example(cls) -> Example:
        """The conformance suite's example run (see grpo_plugins.example)."""
        return Example(reward_names=("accuracy", "format"), reward_values=(0.0, 1.0), min_group_size=1)

    @hookimpl
    def compute_advantages(self, batch: GRPOBatch) -> torch.Tensor:
        """``(N,)`` DGPO advantages from ``batch.rewards``, the accuracy component and the token mask."""
        cfg, index, groups = self.config, batch.group_index, batch.num_groups
        # at least float32, float64 kept: a float32 copy would merge rewards that differ below its precision
        rewards = batch.rewards.to(torch.promote_types(batch.rewards.dtype, torch.float32))
        if cfg.mad_scaling:
            advantages = dgae_advantages(rewards, index, groups, cfg.epsilon)
        else:
            advantages = rewards - segment_mean(rewards, index, groups).index_select(0, index)
        valid = segment_max(rewards, index, groups) > segment_min(rewards, index, groups)
        self.log_metric("frac_valid_groups", valid.float().mean())
        if cfg.difficulty_weighting:
            accuracy = group_accuracy(self._accuracy(batch), index, groups)
            weights = difficulty_weights(accuracy, valid, cfg.temperature, batch.parallel)
            advantages = advantages * weights.index_select(0, index)
            if bool(valid.any()):
                self.log_metric("difficulty_weight_max", weights[valid].max())
                self.log_metric("difficulty_weight_min", weights[valid].min())
        if cfg.token_ratio:
            if batch.completion_mask is None:
                raise ValueError(
                    "token_ratio needs the completion tokens, but the batch carries none; set token_ratio: false"
                )
            lengths = batch.token_mask.gt(0).sum(dim=-1)
            ratio = valid_token_ratio(lengths, valid.index_select(0, index), batch.parallel)
            advantages = advantages * ratio.to(advantages.dtype)
            self.log_metric("valid_token_ratio", ratio)
        self.log_metric("frac_zero_advantage", (advantages == 0).float().mean())
        return advantages

    def _accuracy(self, batch: GRPOBatch) -> torch.Tensor:
        """``(N,)`` the accuracy reward (NaN where it did not apply), checked to lie in [0, 1]."""
        name = self.config.accuracy_reward
        if batch.reward_components is None:
            if name:
                raise ValueError(f"accuracy_reward '{name}' is set but the batch has no reward components")
            accuracy = batch.rewards
        else:
            names = list(batch.reward_names)
            if name and name not in names:
                raise ValueError(f"accuracy_reward '{name}' is not a reward component; the batch has {names}")
            accuracy = batch.reward_components[:, names.index(name) if name else 0]
        accuracy = accuracy.float()
        applied = accuracy[~torch.isnan(accuracy)]
        if applied.numel() and bool(((applied < 0) | (applied > 1)).any()):
            raise ValueError(
                f"the accuracy reward {name or '(first component)'} must lie in [0, 1] for the difficulty weights, "
                f"got values in [{applied.min().item():g}, {applied.max().item():g}]; name a 0/1 component with "
                "accuracy_reward, or set difficulty_weighting: false"
            )
        return accuracy
