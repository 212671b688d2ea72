"""BNPO: Beta Normalization Policy Optimization (arXiv:2506.02864).

GRPO divides a group's centred rewards by their standard deviation. BNPO instead divides by a Beta
density evaluated at the group's success rate, with Beta parameters fitted to the batch's success
rates at every step (no state across steps):

    s_i   = (r_i - r_min) / (r_max - r_min)              rewards mapped to [0, 1] by a fixed range
    p_g   = mean_{i in g} s_i                            (0 for a group of one, as in the paper's code)
    m, v  = mean and unbiased variance of p_g over the batch's groups  (m = 0, v = 1 with one group)
    k     = m (1 - m) / v - 1
    alpha = max(1 + k m / 3, 1),   beta = max(1 + k (1 - m) / 3, 1)   (alpha = beta = 1 when v = 0)
    w_g   = clip(1 / BetaPDF(p_g; alpha, beta), 0, 1e6)
    A_i   = w_g (s_i - p_g)

With several binary rewards, the paper's "advantage decomposition" normalises each reward
component separately (its own alpha, beta) and averages: ``A = (1/K) sum_k A^(k)``. Where a
component is NaN (it did not apply) it is left out of its group's ``p_g`` and of the Beta fit, and
``A^(k) = 0`` there.

A group of one has ``p = 0``; with ``alpha > 1`` its density is 0, so a lone correct completion gets
``A = max_weight`` (the default ``single_completion="zero_baseline"``, the paper code's choice).

This is **not** TRL's ``loss_type="bnpo"``, which is a loss normaliser (token mean over the local
batch); this method changes the advantages and works with any loss type.

Shapes: ``N`` completions, ``G`` groups, ``K`` reward components. Advantages are ``(N,)``. The
batch statistics of ``p_g`` (count, mean, variance) are global across data-parallel ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from grpo_plugins import FINITE, POSITIVE, GRPOBatch, Method, ParallelContext, hookimpl, option
from grpo_plugins import Example
from grpo_plugins.ops import global_all_equal, global_mean_std, segment_count, segment_max, segment_min, segment_sum


def success_rates(
    scores: torch.Tensor, index: torch.Tensor, num_groups: int, applied: torch.Tensor | None = None
) -> torch.Tensor:
    """``p_g``: mean of ``scores`` ``(N,)`` in each group -> ``(G,)`` float64; a group of one gets 0 (the paper's code).

    ``applied``: ``(N,)`` bool, the completions whose score counts (None: all); the others (a reward
    component that did not apply) are left out of their group's mean, and a group where none applied
    gets 0. Summed in float64, where a sum of float32 scores in ``[0, 1]`` is exact in any order (unless
    their binary exponents span about 29 or more bits): two groups holding the same rewards in another
    order get the very same rate (so an all-equal batch has ``v = 0``).
    """
    applied = torch.ones_like(scores, dtype=torch.bool) if applied is None else applied
    values = torch.where(applied, scores.double(), 0.0)
    means = segment_sum(values, index, num_groups) / segment_sum(applied.double(), index, num_groups).clamp(min=1)
    return torch.where(segment_count(index, num_groups) > 1, means, torch.zeros_like(means))


def beta_parameters(rates: torch.Tensor, parallel: ParallelContext | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The adaptive ``(alpha, beta)`` (two scalars) from the success rates ``rates`` ``(G,)`` of the batch.

    Method of moments with a third of the fitted excess: ``k = m (1 - m) / v - 1``,
    ``alpha = max(1 + k m / 3, 1)``, ``beta = max(1 + k (1 - m) / 3, 1)``. One group in the whole
    batch uses ``m = 0, v = 1``; a zero variance (every group at the same rate) uses ``alpha = beta = 1``.
    "Every group at the same rate" is decided exactly from the global maximum and minimum of ``rates``
    (in ``[0, 1]``), not from a float variance, which can keep a rounding residue and then give a
    huge ``k``.
    """
    parallel = parallel or ParallelContext()
    rates = rates.double()
    all_equal = global_all_equal(rates, parallel)
    count = parallel.all_reduce_sum(rates.new_tensor([rates.numel()]))[0]
    mean, std = global_mean_std(rates, parallel, unbiased=True)
    mean = torch.where(count > 1, mean, torch.zeros_like(mean))
    var = torch.where(count > 1, std**2, torch.ones_like(std))
    excess = mean * (1 - mean) / var.clamp(min=torch.finfo(torch.float64).tiny) - 1
    alpha = torch.clamp(1 + excess * mean / 3, min=1.0)
    beta = torch.clamp(1 + excess * (1 - mean) / 3, min=1.0)
    flat = (var == 0) | ((count > 1) & all_equal)
    one = torch.ones_like(alpha)
    return torch.where(flat, one, alpha), torch.where(flat, one, beta)


def beta_density(p: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``BetaPDF(p; alpha, beta)`` for ``p`` in ``[0, 1]`` (any shape); ``0 log 0`` counts as 0, so
    ``alpha = 1`` (or ``beta = 1``) gives a finite density at the edge."""
    p = p.double()
    log_norm = torch.lgamma(alpha + beta) - torch.lgamma(alpha) - torch.lgamma(beta)
    return torch.exp(log_norm + torch.xlogy(alpha - 1, p) + torch.xlogy(beta - 1, 1 - p))


def bnpo_advantages(
    scores: torch.Tensor,
    index: torch.Tensor,
    num_groups: int,
    parallel: ParallelContext | None = None,
    max_weight: float = 1e6,
    applied: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BNPO advantages of one reward in ``[0, 1]`` -> ``((N,) advantages, alpha, beta)``.

    ``scores``: ``(N,)`` rewards already mapped to ``[0, 1]``; ``index``: ``(N,)`` group of each
    completion in ``[0, G)``. A group whose scores are all equal gives exactly 0 (also where the
    density is 0 and the weight is clipped at ``max_weight``). ``applied``: ``(N,)`` bool (None: all),
    where the reward applied: the others (any value, NaN included) get 0 and are left out of their
    group's rate, and groups where it never applied are left out of the Beta fit.
    """
    applied = torch.ones_like(scores, dtype=torch.bool) if applied is None else applied
    scores = torch.where(applied, scores, torch.zeros_like(scores))
    rates = success_rates(scores, index, num_groups, applied)
    alpha, beta = beta_parameters(rates[segment_sum(applied.long(), index, num_groups) > 0], parallel)
    weights = (1.0 / beta_density(rates, alpha, beta)).clamp(0.0, max_weight).to(scores.dtype)
    advantages = weights.index_select(0, index) * (scores - rates.index_select(0, index).to(scores.dtype))
    highest = segment_max(torch.where(applied, scores, float("-inf")), index, num_groups)
    lowest = segment_min(torch.where(applied, scores, float("inf")), index, num_groups)
    constant = (highest <= lowest) & (segment_count(index, num_groups) > 1)  # a group of one keeps s - 0 (the code's baseline)
    zero = constant.index_select(0, index) | ~applied
    return torch.where(zero, torch.zeros_like(advantages), advantages), alpha, beta


@dataclass(frozen=True)
class BNPOConfig:
    """BNPO (arXiv:2506.02864): advantages divided by an adaptive Beta density of the group's success rate."""

    reward_min: float = option(0.0, "Lowest possible reward; s = (r - reward_min) / (reward_max - reward_min).",
                               paper=0.0, domain=FINITE)
    reward_max: float = option(1.0, "Highest possible reward.", paper=1.0, domain=FINITE)
    max_weight: float = option(1e6, "Upper clip of the weight 1 / BetaPDF(p).", paper=1e6, domain=POSITIVE)
    decompose: bool = option(
        False, "Advantage decomposition: normalise every reward component separately and average "
        "(the paper's use_advantage_decomposition; its run script leaves it off).", paper=False,
    )
    single_completion: Literal["zero_baseline", "error"] = option(
        "zero_baseline", "A group of one completion: 'zero_baseline' uses p = 0 as the paper's code does "
        "(its advantage is w * s: a lone correct completion gets max_weight); 'error' refuses such batches.",
        paper="zero_baseline",
    )

    def __post_init__(self):
        if self.reward_max <= self.reward_min:
            raise ValueError(f"reward_max ({self.reward_max}) must be greater than reward_min ({self.reward_min})")


class BNPO(Method):
    """BNPO: A = (s - p_g) / BetaPDF(p_g; alpha, beta), with alpha, beta fitted to the batch (not TRL's loss_type='bnpo')."""

    name = "bnpo"
    Config = BNPOConfig
    paper = "https://arxiv.org/abs/2506.02864"
    plugin_api = ">=1.3,<2"  # grpo_plugins.ops.global_all_equal

    @classmethod
    def example(cls) -> Example:
        """The conformance suite's example run (see grpo_plugins.example)."""
        return Example(
            reward_names=("reward",), reward_values=(0.0, 0.25, 0.5, 1.0), min_group_size=1,
        )

    @hookimpl
    def compute_advantages(self, batch: GRPOBatch) -> torch.Tensor:
        """``(N,)`` BNPO advantages from ``batch.rewards`` (or each of ``batch.reward_components`` with ``decompose``)."""
        if self.config.single_completion == "error":
            batch.require_group_size(2, "bnpo with single_completion='error'")
        if self.config.decompose and batch.reward_components is not None:
            columns = batch.reward_components.float().unbind(1)  # NaN: the component did not apply (A^(k) = 0 there)
            names = batch.reward_names or tuple(f"component {k}" for k in range(len(columns)))
        else:
            columns, names = (batch.rewards.float(),), ("reward",)
        results = [self._one_reward(column, name, batch) for column, name in zip(columns, names)]
        advantages = torch.stack([adv for adv, _, _ in results]).mean(0)
        self.log_metric("alpha", results[0][1])
        self.log_metric("beta", results[0][2])
        self.log_metric("frac_zero_advantage", (advantages == 0).float().mean())
        return advantages

    def _one_reward(self, rewards: torch.Tensor, name: str, batch: GRPOBatch):
        low, high = self.config.reward_min, self.config.reward_max
        applied = ~torch.isnan(rewards)
        outside = (rewards < low) | (rewards > high)
        if bool(outside.any()):
            values = rewards[applied]
            raise ValueError(
                f"{name} has values in [{values.min().item():g}, {values.max().item():g}], outside "
                f"[reward_min, reward_max] = [{low:g}, {high:g}]; set reward_min / reward_max to the reward's range"
            )
        scores = (rewards - low) / (high - low)
        return bnpo_advantages(scores, batch.group_index, batch.num_groups, batch.parallel, self.config.max_weight, applied)
