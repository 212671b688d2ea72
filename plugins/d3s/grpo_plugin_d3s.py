"""D3S: Dynamic Dual-Level Down-Sampling (Wang et al., ICLR 2026, arXiv:2509.22115).

Advantages are computed on the full groups first (the baselines are unchanged); ``mask_tokens`` then
decides which completions and tokens enter the loss:

1. **Sample level.** In each group of ``n`` completions keep the ``k = ceil(rho_s n)`` whose advantages have
   the largest population variance. Exact solution: sort the group's advantages; the best subset is the
   ``j`` largest and the ``k - j`` smallest for some ``j`` in ``0..k``; every ``j`` is scanned at once
   (``(G, k_max + 1)`` candidate variances from prefix sums). Ties choose the smallest ``j``; equal
   advantages are ordered by position (stable sort).
2. **Token level.** Among the kept completions' real tokens (``n`` over the whole global batch), score
   ``s_{i,t} = |A_{i,t}| H_{i,t}`` (``H`` the behaviour policy's token entropy, ``GRPOBatch.old_entropies``)
   and keep the ``ceil(rho_t n)`` highest scores, equal scores in batch order (``token_selection='top_count'``,
   the card). ``'quantile'`` keeps instead every score at least the ``1 - rho_t`` quantile (linear
   interpolation, ties kept) -- TRL's rule for ``top_entropy_quantile``, which D3S then equals when ``|A|``
   is constant and ``rho_s = 1``.
3. **Dynamic schedule.** ``rho(step) = rho_start + (1 - rho_start) min(1, step / (ramp_fraction total_steps))``
   for both levels: aggressive down-sampling early, none at the end of the ramp.

The weight of a kept token is 1, or with ``renormalise`` ``n_real / n_kept`` (the batch's real tokens over
the kept ones), so that a token mean over the completion mask equals the mean over the kept tokens (the
paper's "average over kept tokens"; the adapters never change the normaliser). That holds for a token-mean
loss only (one batch-wide factor), so ``renormalise`` declares ``loss_aggregation: token_mean``. Dropped
tokens weigh 0.

Shapes: ``N`` completions, ``G`` groups, ``T`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import math
from typing import Literal

import torch
import torch.distributed as dist

from grpo_plugins import UNIT, ParallelContext, Example, GRPOBatch, Method, Needs, Range, hookimpl, option
from grpo_plugins.ops import group_ranks, masked_mean, segment_count

# --------------------------------------------------------------------------------------------- maths


def schedule(rho_start: float, step: int, ramp_steps: float) -> float:
    """``rho_start + (1 - rho_start) min(1, step / ramp_steps)`` (1 at once when ``ramp_steps <= 0``)."""
    if ramp_steps <= 0:
        return 1.0
    return rho_start + (1.0 - rho_start) * min(1.0, step / ramp_steps)


def max_variance_subset(advantages: torch.Tensor, index: torch.Tensor, num_groups: int, rho: float) -> torch.Tensor:
    """``(N,)`` bool: in each group the ``k = ceil(rho n)`` members whose advantages ``(N,)`` have the largest
    population variance (the ``j`` largest and ``k - j`` smallest, ``j`` scanned over ``0..k``)."""
    n = advantages.numel()
    sizes = segment_count(index, num_groups)
    keep_count = torch.ceil(sizes.double() * rho - 1e-9).long().clamp(min=1).minimum(sizes)
    if bool((keep_count == sizes).all()):
        return torch.ones(n, dtype=torch.bool, device=advantages.device)
    width = int(sizes.max())
    rank_up = group_ranks(index, num_groups, advantages)  # ascending by advantage (ties by position)
    grid = torch.zeros((num_groups, width), dtype=torch.float64, device=advantages.device)
    grid[index, rank_up] = advantages.double()  # (G, width) each group's advantages in ascending order
    valid = torch.arange(width, device=advantages.device)[None, :] < sizes[:, None]
    # prefix sums of the smallest (ascending) and of the largest (descending) members
    zero = grid.new_zeros((num_groups, 1))
    low_sum = torch.cat([zero, torch.cumsum(torch.where(valid, grid, 0.0), 1)], 1)
    low_sq = torch.cat([zero, torch.cumsum(torch.where(valid, grid**2, 0.0), 1)], 1)
    descending = torch.where(valid, grid, float("-inf")).sort(dim=1, descending=True).values
    high_sum = torch.cat([zero, torch.cumsum(torch.where(valid, descending, 0.0), 1)], 1)
    high_sq = torch.cat([zero, torch.cumsum(torch.where(valid, descending**2, 0.0), 1)], 1)
    j = torch.arange(width + 1, device=advantages.device)[None, :]  # (1, width + 1) members taken from the top
    k = keep_count[:, None]
    rest = (k - j).clamp(min=0)
    total = high_sum.gather(1, j.clamp(max=width).expand(num_groups, -1)) + low_sum.gather(1, rest)
    squares = high_sq.gather(1, j.clamp(max=width).expand(num_groups, -1)) + low_sq.gather(1, rest)
    variance = squares / k - (total / k) ** 2
    variance = torch.where(j <= k, variance, float("-inf"))
    best_j = variance.argmax(dim=1)  # first maximum: the smallest j
    # a member is kept if it is among the best_j largest or the k - best_j smallest of its group
    rank_down = sizes[index] - 1 - rank_up
    return (rank_down < best_j[index]) | (rank_up < (keep_count - best_j)[index])


def gather_values(values: torch.Tensor, parallel: ParallelContext) -> torch.Tensor:
    """``(n,)`` values of this rank -> every rank's values concatenated (rank order); unchanged when the
    batch is already global. (The core's ``ParallelContext`` only sums across ranks; a quantile needs the
    values themselves.)"""
    return gather_with_offset(values, parallel)[0]


def gather_with_offset(values: torch.Tensor, parallel: ParallelContext) -> tuple[torch.Tensor, int]:
    """Every rank's ``(n,)`` values concatenated in rank order, and where this rank's values start in it."""
    if parallel.gathered or parallel.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return values, 0
    sizes = [torch.zeros((), dtype=torch.long, device=values.device) for _ in range(parallel.world_size)]
    dist.all_gather(sizes, torch.tensor(values.numel(), device=values.device))
    width = int(max(sizes))
    padded = torch.zeros(width, dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    pieces = [torch.empty_like(padded) for _ in range(parallel.world_size)]
    dist.all_gather(pieces, padded)
    offset = int(sum(int(size) for size in sizes[: parallel.rank]))
    return torch.cat([piece[: int(size)] for piece, size in zip(pieces, sizes)]), offset


def top_count_tokens(
    scores: torch.Tensor, candidates: torch.Tensor, rho: float, parallel: ParallelContext | None = None
) -> torch.Tensor:
    """``(N, T)`` bool: the ``ceil(rho n)`` candidate tokens with the highest scores, ``n`` the candidates over
    every rank (the card's rule); equal scores are taken in batch order (row-major, ranks in order)."""
    if rho >= 1.0:
        return candidates.clone()
    pool, offset = gather_with_offset(scores[candidates].double(), parallel or ParallelContext())
    if pool.numel() == 0:
        return candidates.clone()
    count = max(1, math.ceil(rho * pool.numel() - 1e-9))
    chosen = torch.zeros(pool.numel(), dtype=torch.bool, device=pool.device)
    chosen[torch.argsort(-pool, stable=True)[:count]] = True
    kept = torch.zeros_like(candidates)
    kept[candidates] = chosen[offset: offset + int(candidates.sum())]
    return kept


def top_score_tokens(
    scores: torch.Tensor, candidates: torch.Tensor, rho: float, parallel: ParallelContext | None = None
) -> torch.Tensor:
    """``(N, T)`` bool: the candidate tokens whose score is at least the ``1 - rho`` quantile (linear
    interpolation) of the candidates' scores over every rank (``scores``, ``candidates`` ``(N, T)``); ties
    are kept."""
    if rho >= 1.0:
        return candidates.clone()
    pool = gather_values(scores[candidates].double(), parallel or ParallelContext())
    if pool.numel() == 0:
        return candidates.clone()
    threshold = torch.quantile(pool, 1.0 - rho)
    return candidates & (scores.double() >= threshold)


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class D3SConfig:
    """D3S (arXiv:2509.22115); no public code: the schedule's shape and its start values are inferred."""

    sample_rho_start: float = option(0.5, "Fraction rho_s of each group's completions kept at step 0 (1: no "
                                     "sample-level down-sampling).", paper="not given (inferred 0.5)",
                                     domain=Range(0, 1, low_open=True))
    token_rho_start: float = option(0.5, "Fraction rho_t of the kept completions' tokens kept at step 0 (1: no "
                                    "token-level down-sampling).", paper="not given (inferred 0.5)",
                                    domain=Range(0, 1, low_open=True))
    ramp_fraction: float = option(0.5, "Both fractions rise linearly to 1 over this fraction of the run's steps "
                                  "(0: no down-sampling at all; the run's length must be known otherwise).",
                                  paper="not given (inferred half of training)", domain=UNIT)
    token_selection: Literal["top_count", "quantile"] = option(
        "top_count", "Token level: keep the ceil(rho_t n) highest scores ('top_count', the card; ties in batch "
        "order) or every score at least the 1 - rho_t quantile ('quantile', TRL's top_entropy_quantile rule, "
        "ties kept).", paper="top_count")
    renormalise: bool = option(True, "Weight kept tokens by n_real / n_kept so that the token mean runs over the "
                               "kept tokens (the paper); needs a token-mean loss (checked at start-up). False: "
                               "weight 1 (TRL's top_entropy_quantile convention), any loss.")


class D3S(Method):
    """D3S: keep each group's max-variance completions and the top |A|·H tokens, on a relaxing schedule."""

    name = "d3s"
    Config = D3SConfig
    paper = "https://arxiv.org/abs/2509.22115"
    plugin_api = ">=1.1,<2"

    @classmethod
    def example(cls) -> Example:
        return Example(order_dependent="completions with equal advantages are chosen by their position in the batch "
                                       "(stable sort), as the paper's tie-breaking")

    def needs(self) -> Needs:
        why = {"old_entropies": "the token scores |A| H"}
        if not self.config.renormalise:
            return Needs(batch_fields={"old_entropies"}, why=why)
        # one batch-wide factor n_real / n_kept turns the token mean into the mean over kept tokens only when the
        # loss divides by the batch's token count; under a sequence mean it would be a plain global rescale
        why["loss_aggregation"] = ("renormalise weights kept tokens by n_real / n_kept, the mean over kept tokens only "
                                   "under a token-mean loss (set renormalise: false for another loss)")
        return Needs(batch_fields={"old_entropies"}, settings={"loss_aggregation": ("token_mean",)}, why=why)

    def fractions(self, batch: GRPOBatch) -> tuple[float, float]:
        """``(rho_s, rho_t)`` at the batch's step."""
        if self.config.ramp_fraction == 0:
            return 1.0, 1.0
        if batch.total_steps is None:
            raise ValueError("d3s's schedule needs the run's length (GRPOBatch.total_steps); set max_steps, or "
                             "ramp_fraction=0")
        ramp = self.config.ramp_fraction * batch.total_steps
        return (schedule(self.config.sample_rho_start, batch.step, ramp),
                schedule(self.config.token_rho_start, batch.step, ramp))

    @hookimpl
    def mask_tokens(self, batch: GRPOBatch) -> torch.Tensor:
        mask = batch.token_mask > 0
        advantages = batch.advantages
        per_sequence = advantages if advantages.dim() == 1 else masked_mean(advantages, batch.token_mask, dim=-1)
        rho_s, rho_t = self.fractions(batch)
        kept_rows = max_variance_subset(per_sequence, batch.group_index, batch.num_groups, rho_s)
        token_advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        entropies = torch.where(mask, batch.old_entropies, 0.0)
        scores = token_advantages.abs() * entropies
        candidates = mask & kept_rows[:, None]
        select = top_count_tokens if self.config.token_selection == "top_count" else top_score_tokens
        kept = select(scores, candidates, rho_t, batch.parallel)
        real, count = batch.parallel.all_reduce_sum(torch.stack([mask.sum(), kept.sum()]).double()).tolist()
        weight = real / count if self.config.renormalise and count > 0 else 1.0
        rows = batch.parallel.all_reduce_sum(torch.stack([kept_rows.sum(), torch.tensor(kept_rows.numel(), device=kept_rows.device)]).double())
        self.log_metric("kept_completions", rows[0] / rows[1].clamp(min=1))
        self.log_metric("kept_tokens", count / max(real, 1.0))
        self.log_metric("rho_sample", rho_s)
        self.log_metric("rho_token", rho_t)
        return kept.to(batch.rewards.dtype) * weight
