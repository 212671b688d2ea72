"""GDPO: Group reward-Decoupled normalisation Policy Optimisation (arXiv:2601.05242).

With several rewards, GRPO sums them first and normalises the sum within each group, so distinct
reward combinations with the same total (``(1, 0)`` and ``(0, 1)``) get the same advantage. GDPO
normalises every reward component within its group first, sums the normalised components with the
reward weights, then normalises the sum over the whole (global) batch:

    r_{i,k}  <- 0 where NaN (the reward function did not apply)
    Ahat_{i,k} = (r_{i,k} - mean_g(r_{.,k})) / (std_g(r_{.,k}) + eps)      per group g, unbiased std
    S_i      = sum_k w_k Ahat_{i,k}
    A_i      = (S_i - mean(S)) / (std(S) + eps)                            over the batch, unbiased std

The statistics run in float64, and a group whose ``S`` is constant (every component constant within it,
for one) gets exactly 0: ``mean(S)`` is 0 in exact arithmetic, so only its rounding residue would move it.

Shapes: ``N`` completions, ``G`` groups, ``K`` reward components.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from grpo_plugins import NON_NEGATIVE, GRPOBatch, Method, ParallelContext, hookimpl, option
from grpo_plugins.ops import constant_groups, global_mean_std, group_normalize


def decoupled_group_normalize(
    components: torch.Tensor, index: torch.Tensor, num_groups: int, epsilon: float = 1e-4
) -> torch.Tensor:
    """Per-component group z-scores ``(r - mean_g) / (std_g + epsilon)`` -> ``(N, K)``.

    ``components``: ``(N, K)`` finite rewards; ``index``: ``(N,)`` group of each completion in
    ``[0, G)``. The std is unbiased. A component that is constant within a group gives exactly 0
    there (not the rounding residue of its mean divided by ``epsilon``).
    """
    columns = [group_normalize(column, index, num_groups, epsilon=epsilon) for column in components.unbind(1)]
    return torch.stack(columns, dim=1)


def gdpo_advantages(
    components: torch.Tensor,
    weights: torch.Tensor,
    index: torch.Tensor,
    num_groups: int,
    parallel: ParallelContext | None = None,
    epsilon: float = 1e-4,
    batch_normalize: bool = True,
) -> torch.Tensor:
    """GDPO advantages -> ``(N,)``.

    Args:
        components: ``(N, K)`` rewards per completion and reward function; NaN (not applicable)
            counts as 0, as in the paper's code. Statistics in float64; the result is float32, exactly 0 on
            every group whose weighted sum ``S`` is constant.
        weights: ``(K,)`` reward weights.
        index: ``(N,)`` group of each completion in ``[0, G)``; every group needs >= 2 members.
        num_groups: ``G``.
        parallel: data-parallel context for the batch statistics (the global batch by default).
        epsilon: added to both standard deviations.
        batch_normalize: the final batch z-score (the paper's step 4).
    """
    components = components.double()
    components = torch.where(torch.isnan(components), torch.zeros_like(components), components)
    if not bool(torch.isfinite(components).all()):
        raise ValueError("reward components contain +-inf; GDPO needs finite rewards (NaN is read as 0)")
    normalized = decoupled_group_normalize(components, index, num_groups, epsilon)
    summed = normalized @ weights.to(normalized)
    flat = constant_groups(summed, index, num_groups).index_select(0, index)  # (N,) S constant in the group
    if batch_normalize:
        mean, std = global_mean_std(summed, parallel or ParallelContext())
        summed = (summed - mean) / (std + epsilon)
    return torch.where(flat, torch.zeros_like(summed), summed).float()


@dataclass(frozen=True)
class GDPOConfig:
    """GDPO (NVIDIA, arXiv:2601.05242): normalise each reward per group, sum with weights, then over the batch."""

    epsilon: float = option(
        1e-4, "Added to the group std (per component) and to the batch std.", paper=1e-4, domain=NON_NEGATIVE
    )
    batch_normalize: bool = option(True, "Z-score the weighted sum over the global batch (the paper's last step).")
    single_reward: Literal["grpo", "gdpo"] = option(
        "grpo",
        "With one reward component: 'grpo' falls back to GRPO's group normalisation of the reward (what the "
        "paper's code does); 'gdpo' applies the GDPO steps anyway (what TRL's normalize_then_sum does).",
        paper="grpo",
    )


class GDPO(Method):
    """GDPO: per-reward group normalisation, weighted sum, then batch normalisation (multi-reward GRPO)."""

    name = "gdpo"
    Config = GDPOConfig
    paper = "https://arxiv.org/abs/2601.05242"
    plugin_api = ">=1.3,<2"  # GRPOBatch.unshaped_rewards

    @hookimpl
    def compute_advantages(self, batch: GRPOBatch) -> torch.Tensor:
        """``(N,)`` GDPO advantages from ``batch.reward_components`` ``(N, K)`` and ``batch.reward_weights``."""
        batch.require_group_size(2, "GDPO normalises every reward within its group (the unbiased std of one value is undefined)")
        components = batch.reward_components
        if components is None:
            components, weights = batch.rewards[:, None], torch.ones(1)
        else:
            k = components.shape[1]
            weights = batch.reward_weights if batch.reward_weights is not None else torch.ones(k)
            if tuple(weights.shape) != (k,):
                raise ValueError(
                    f"reward_weights must be ({k},) like the reward components, got {tuple(weights.shape)}"
                )
        eps = self.config.epsilon
        if components.shape[1] == 1 and self.config.single_reward == "grpo":
            advantages = group_normalize(batch.rewards.float(), batch.group_index, batch.num_groups, epsilon=eps)
        else:
            if batch.reward_components is not None:
                _refuse_dropped_shaping(batch, components, weights)
            advantages = gdpo_advantages(
                components, weights, batch.group_index, batch.num_groups, batch.parallel, eps,
                self.config.batch_normalize,
            )
        self.log_metric("frac_zero_advantage", (advantages == 0).float().mean())
        distinct = _distinct_per_group(advantages, batch.group_index, batch.num_groups)
        self.log_metric("distinct_advantages_per_group", distinct)
        return advantages


def _refuse_dropped_shaping(batch: GRPOBatch, components: torch.Tensor, weights: torch.Tensor) -> None:
    """Raise when a ``shape_rewards`` method changed ``batch.rewards`` (``(N,)``) away from the weighted sum
    of the ``(N, K)`` components GDPO reads: its shaping would be dropped without a word. A shaper that
    writes its reward into ``reward_components`` / ``reward_weights`` (``mo_grpo``, ``s_grpo``) passes."""
    shaped, trainer = batch.rewards, batch.unshaped_rewards
    if trainer is None or torch.equal(shaped, trainer):
        return
    read = torch.nan_to_num(components.double(), nan=0.0) @ weights.double().to(components.device)
    differs = ~torch.isclose(read, shaped.double(), rtol=1e-4, atol=1e-6)
    if bool(differs.any()):
        row = int(differs.nonzero()[0])
        raise ValueError(
            f"gdpo normalises the {components.shape[1]} reward component(s) {list(batch.reward_names)} with "
            "reward_weights and never reads batch.rewards, but a shape_rewards method of this run changed the "
            f"rewards away from the weighted sum of those components (row {row}: shaped reward "
            f"{float(shaped[row]):.4g}, components give {float(read[row]):.4g}); its shaping would be dropped. "
            "Run the shaping method without gdpo, or have it write its reward into batch.reward_components and "
            "reward_weights (as mo_grpo and s_grpo do)"
        )


def _distinct_per_group(advantages: torch.Tensor, index: torch.Tensor, num_groups: int) -> float:
    """Mean number of distinct advantage values per group (rounded to 1e-6): GDPO's resolution metric.

    Each (group, rounded value) pair is packed into one int64 key, so counting the pairs is one 1-D sort
    (a 2-row ``torch.unique(dim=1)`` is several times slower); keys that would not fit fall back to it.
    """
    rounded = torch.round(advantages.double() * 1e6).long()
    low, high = torch.aminmax(rounded)
    span = int(high) - int(low) + 1
    if span * max(num_groups, 1) < (1 << 62):
        keys = torch.sort(index * span + (rounded - low)).values
        distinct = int(keys.diff().ne(0).sum()) + 1
    else:
        distinct = torch.unique(torch.stack([index, rounded]), dim=1).shape[1]
    return distinct / max(num_groups, 1)
