"""NGRPO: Negative-enhanced GRPO (Nan et al., 2025, arXiv:2509.18851).

Two changes to GRPO:

1. Advantage calibration: each group's mean and (unbiased) std are taken over its real rewards plus
   ``k`` virtual samples of the maximum attainable reward ``R_max``; only the real completions get
   advantages. An all-wrong group now gets negative advantages instead of zeros.
2. Asymmetric clipping: the PPO surrogate clips the ratio to ``[1 - clip_low, 1 + clip_high]`` with a
   tighter lower bound (0.16) than upper bound (0.24).

Shapes: ``N`` completions, ``G`` groups, ``B`` rows of a loss micro-batch, ``T`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpo_plugins import FINITE, NON_NEGATIVE, GRPOBatch, LossInputs, Method, Range, hookimpl, option
from grpo_plugins import Example
from grpo_plugins.ops import segment_count, segment_max, segment_min, segment_sum
from grpo_plugins.surrogates import ppo_clip_loss


def ngrpo_advantages(
    rewards: torch.Tensor,
    index: torch.Tensor,
    num_groups: int,
    max_reward: float = 1.0,
    num_virtual: int = 1,
    epsilon: float = 1e-6,
) -> torch.Tensor:
    """Advantages with ``num_virtual`` virtual ``max_reward`` samples in each group's statistics.

    Args:
        rewards: ``(N,)`` finite rewards.
        index: ``(N,)`` int64 group of each completion in ``[0, G)``; groups may differ in size.
        num_groups: ``G``.
        max_reward: ``R_max``, the reward of each virtual sample.
        num_virtual: ``k >= 0`` virtual samples per group.
        epsilon: added to the std (outside the square root).

    Returns:
        ``(N,)`` ``(r_i - mu_g) / (sigma_g + epsilon)`` where ``mu_g`` and the unbiased ``sigma_g``
        are over the ``n_g + k`` augmented rewards. A group of one has no statistics and uses
        ``mu = 0, sigma = 1`` (the released code's convention), so ``A = r / (1 + epsilon)``.
        ``R_max`` is first rounded to the rewards' dtype, and a group of two or more whose augmented
        rewards are all equal (every reward ``== R_max``, or a constant group with ``k = 0``) gets
        exactly 0.
    """
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("ngrpo: rewards contain NaN/inf; map missing rewards to a number before computing advantages")
    if num_virtual < 0:
        raise ValueError(f"ngrpo: num_virtual must be >= 0, got {num_virtual}")
    dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    max_reward = torch.tensor(max_reward, dtype=dtype).item()  # R_max as the rewards' dtype holds it
    rewards = rewards.to(torch.float64)  # the statistics in double precision, returned in the input's dtype
    counts = segment_count(index, num_groups).to(rewards.dtype)
    total = counts + num_virtual
    mean = (segment_sum(rewards, index, num_groups) + num_virtual * max_reward) / total.clamp(min=1)
    squares = segment_sum((rewards - mean[index]) ** 2, index, num_groups) + num_virtual * (max_reward - mean) ** 2
    std = (squares / (total - 1).clamp(min=1)).sqrt()
    single = counts < 2
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single | (total < 2), torch.ones_like(std), std)
    low = segment_min(rewards, index, num_groups)
    flat = (segment_max(rewards, index, num_groups) <= low) & ((low == max_reward) | (num_virtual == 0)) & ~single
    advantages = (rewards - mean[index]) / (std[index] + epsilon)
    return torch.where(flat[index], 0.0, advantages).to(dtype)


def asymmetric_clip_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float = 0.16,
    clip_high: float = 0.24,
) -> torch.Tensor:
    """PPO's clipped surrogate with separate lower and upper clip ranges.

    Args:
        log_probs: ``(B, T)`` current log-probs (with gradient).
        old_log_probs: ``(B, T)`` behaviour log-probs.
        advantages: ``(B, T)`` advantages.
        clip_low, clip_high: the ratio is clipped to ``[1 - clip_low, 1 + clip_high]``.

    Returns:
        ``(B, T)`` per-token loss ``max(-A rho, -A clip(rho, 1 - clip_low, 1 + clip_high))``.
    """
    return ppo_clip_loss(torch.exp(log_probs - old_log_probs), advantages, clip_low, clip_high)


def all_at_max(rewards: torch.Tensor, index: torch.Tensor, num_groups: int, max_reward: float) -> torch.Tensor:
    """``(N,)`` bool: the completion's whole group scored ``max_reward`` (the "all correct" filter)."""
    return (segment_min(rewards, index, num_groups) >= max_reward)[index]


@dataclass(frozen=True)
class NGRPOConfig:
    """NGRPO: Negative-enhanced GRPO (https://arxiv.org/abs/2509.18851)."""

    max_reward: float = option(
        1.0, "R_max, the maximum attainable reward given to each virtual sample.", paper=1.0, domain=FINITE
    )
    num_virtual: int = option(
        1, "k, virtual maximum-reward samples added to each group's statistics.", paper=1, domain=NON_NEGATIVE
    )
    epsilon: float = option(1e-6, "Added to the group std before dividing.", paper=1e-6, domain=NON_NEGATIVE)
    clip_low: float = option(
        0.16, "Lower clip range: the ratio is clipped below at 1 - clip_low.", paper=0.16, domain=Range(0, 1)
    )
    clip_high: float = option(
        0.24, "Upper clip range: the ratio is clipped above at 1 + clip_high.", paper=0.24, domain=NON_NEGATIVE
    )
    asymmetric_clip: bool = option(
        True,
        "Provide the asymmetric clipped surrogate (policy_surrogate). Set False to keep the trainer's own "
        "loss, or to leave the surrogate slot to another method.",
        paper=True,
    )
    filter_all_correct: bool = option(
        False,
        "Drop from the loss the groups whose every completion scored max_reward (the released script's "
        "'all_correct' group filter; there the batch is refilled by resampling, here the groups are only masked).",
        paper=True,
    )

    def __post_init__(self):
        if self.num_virtual < 0:
            raise ValueError(f"num_virtual must be >= 0, got {self.num_virtual}")
        if not (0.0 <= self.clip_low < 1.0) or self.clip_high < 0.0:
            raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {self.clip_low}, {self.clip_high}")


class NGRPO(Method):
    """NGRPO: virtual maximum-reward samples in the group statistics, plus asymmetric clipping."""

    name = "ngrpo"
    Config = NGRPOConfig
    paper = "https://arxiv.org/abs/2509.18851"

    @classmethod
    def example(cls) -> Example:
        """The conformance suite's example run (see grpo_plugins.example)."""
        return Example(
            min_group_size=1,
            nonzero_constant_groups="the virtual maximum-reward sample gives an all-wrong group negative advantages "
            "(the point of NGRPO)",
        )

    def disabled_hooks(self) -> set[str]:
        off = set()
        if not self.config.asymmetric_clip:
            off.add("policy_surrogate")
        if not self.config.filter_all_correct:
            off.add("mask_tokens")
        return off

    @hookimpl
    def compute_advantages(self, batch: GRPOBatch) -> torch.Tensor:
        """``(N,)`` calibrated advantages (see :func:`ngrpo_advantages`)."""
        cfg, index, groups = self.config, batch.group_index, batch.num_groups
        rewards = batch.rewards if batch.rewards.is_floating_point() else batch.rewards.float()
        advantages = ngrpo_advantages(rewards, index, groups, cfg.max_reward, cfg.num_virtual, cfg.epsilon)
        uniform = segment_max(rewards, index, groups) == segment_min(rewards, index, groups)
        with_signal = segment_max(advantages.abs(), index, groups) > 0
        self.log_metric("frac_zero_advantage", (advantages == 0).float().mean())
        self.log_metric(
            "frac_uniform_groups_with_signal",
            (uniform & with_signal).float().sum() / uniform.float().sum().clamp(min=1),
        )
        return advantages

    @hookimpl
    def mask_tokens(self, batch: GRPOBatch) -> torch.Tensor:
        """``(N, T)`` 0 on every token of an all-correct group, 1 elsewhere (only with ``filter_all_correct``)."""
        rewards = batch.rewards if batch.rewards.is_floating_point() else batch.rewards.float()
        full = all_at_max(rewards, batch.group_index, batch.num_groups, self.config.max_reward)
        self.log_metric("frac_filtered", full.float().mean())
        if bool(full.all()):  # nothing else to learn from; their advantages are zero anyway
            full = torch.zeros_like(full)
        keep = (~full).to(batch.token_mask.dtype)
        return keep[:, None].expand_as(batch.token_mask).contiguous()

    @hookimpl
    def policy_surrogate(self, inputs: LossInputs) -> torch.Tensor:
        """``(B, T)`` asymmetric clipped surrogate (see :func:`asymmetric_clip_loss`)."""
        return asymmetric_clip_loss(
            inputs.log_probs, inputs.old_log_probs, inputs.advantages, self.config.clip_low, self.config.clip_high
        )
