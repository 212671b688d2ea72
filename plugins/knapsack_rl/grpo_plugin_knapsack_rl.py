"""Knapsack RL: spend a round's rollout budget where GRPO's gradient is most likely to be non-zero.

Li et al., 2025 (arXiv:2509.25849). Each prompt ``i`` of a round has a success-rate estimate ``p_i``
from earlier epochs. Giving it ``N`` rollouts is worth

    Value(N, p) = (1 - p^N - (1 - p)^N) * p (1 - p)^2

(probability that the group has mixed rewards, times the approximate gain of one update), and the
allocation maximises ``sum_i Value(N_i, p_i)`` subject to ``sum_i N_i = budget`` and
``N_low <= N_i <= N_up``, with the released code's conventions for prompts that cannot enter the
knapsack (no estimate yet, ``p = 0``, ``p = 1``), its fallback of sending surplus budget to unsolved
prompts, and its spreading of budget the knapsack cannot place.

The value is concave in ``N`` for every ``0 < p < 1``, so the knapsack is a max-plus convolution of
concave sequences: its exact optimum takes the ``W`` largest marginal gains over all (prompt, extra
rollout) pairs (``solver="greedy"``, one sort). ``solver="dp"`` runs the textbook dynamic programme over
(item, budget), vectorised over the budget axis, and reaches the same optimal value.

Shapes: ``P`` prompts in the round, ``N`` completions, ``G`` groups, ``L`` reward-buffer length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from grpo_plugins import FINITE, NON_NEGATIVE, GRPOBatch, Method, PromptRound, Range, hookimpl, option
from grpo_plugins import Example, Needs
from grpo_plugins.ops import group_ranks, segment_mean
from grpo_plugins.budgets import spread_evenly  # noqa: F401  (re-exported: the shared even split)
from grpo_plugins.prompt_table import PromptTable

# --------------------------------------------------------------------------------------------- maths


def info_gain(p: torch.Tensor) -> torch.Tensor:
    """``p (1 - p)^2``, the approximate one-step gain in success probability; ``p``: any shape."""
    return p * (1 - p) ** 2


def nonzero_gradient_probability(n: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``1 - p^n - (1 - p)^n``: chance that ``n`` rollouts at success rate ``p`` have mixed rewards."""
    return 1 - p**n - (1 - p) ** n


def rollout_value(n: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``Value(n, p) = (1 - p^n - (1 - p)^n) p (1 - p)^2`` (broadcasting ``n`` and ``p``)."""
    return nonzero_gradient_probability(n, p) * info_gain(p)


def needed_rollouts(p: torch.Tensor, confidence: float = 0.9) -> torch.Tensor:
    """``ln(1 - a) / ln(max(p, 1 - p))``: rollouts for a mixed group with probability ``a``; ``p`` in (0, 1)."""
    return math.log(1 - confidence) / torch.log(torch.maximum(p, 1 - p))


def item_gains(
    p: torch.Tensor, min_n: int, max_extra: int, zero_extra: Literal["paper", "released_code"] = "paper"
) -> torch.Tensor:
    """Value of giving each item ``k = 0 .. max_extra`` rollouts beyond ``min_n`` -> ``(I, max_extra + 1)``.

    ``zero_extra="paper"`` scores ``k = 0`` as ``Value(min_n, p)``; ``"released_code"`` scores it 0, as the
    authors' dynamic programme does.
    """
    k = torch.arange(max_extra + 1, dtype=torch.float64)
    gains = rollout_value(min_n + k[None, :], p.double()[:, None])
    if zero_extra == "released_code":
        gains[:, 0] = 0.0
    return gains


def knapsack_dp(gains: torch.Tensor, budget: int) -> torch.Tensor:
    """Exact knapsack by dynamic programming over (item, budget), vectorised over the budget axis.

    ``gains``: ``(I, K + 1)`` value of giving item ``i`` exactly ``k`` units. Returns ``(I,)`` int64
    units summing to ``min(budget, I * K)`` that maximise the total value (every unit of that budget
    is used). At ties the smallest ``k`` wins, as in the released code's backtracking.
    """
    num_items, width = gains.shape
    budget = min(int(budget), num_items * (width - 1))
    best = torch.full((budget + 1,), float("-inf"), dtype=torch.float64)
    best[0] = 0.0
    choice = torch.zeros((num_items, budget + 1), dtype=torch.int16 if width <= 2**15 else torch.int32)
    pad = torch.full((width - 1,), float("-inf"), dtype=torch.float64)
    for i in range(num_items):
        # windows[w, k] = best[w - k]  (max-plus convolution of best with the item's gains)
        windows = torch.cat([pad, best]).unfold(0, width, 1).flip(1)
        total = windows + gains[i]
        best, k = total.max(dim=1)  # first maximum -> smallest k
        choice[i] = k.to(choice.dtype)
    units = torch.zeros(num_items, dtype=torch.int64)
    w = budget
    for i in range(num_items - 1, -1, -1):  # backtrack: O(I) scalar steps
        units[i] = int(choice[i, w])
        w -= int(units[i])
    return units


def knapsack_greedy(gains: torch.Tensor, budget: int) -> torch.Tensor:
    """Exact knapsack for concave gains: the ``budget`` largest marginal gains over all (item, unit).

    ``gains``: ``(I, K + 1)`` concave in ``k`` per row. The max-plus convolution of concave sequences is
    the merge of their sorted marginal gains, so one stable sort solves it. Returns ``(I,)`` int64
    units summing to ``min(budget, I * K)``; ties go to the earlier item.
    """
    num_items, width = gains.shape
    budget = min(int(budget), num_items * (width - 1))
    if budget == 0:
        return torch.zeros(num_items, dtype=torch.int64)
    marginal = (gains[:, 1:] - gains[:, :-1]).reshape(-1)
    order = torch.sort(marginal, descending=True, stable=True).indices[:budget]
    return torch.bincount(torch.div(order, width - 1, rounding_mode="floor"), minlength=num_items)


def knapsack_allocate(
    p: torch.Tensor,
    valid: torch.Tensor,
    budget: int,
    n_default: int,
    min_n: int = 2,
    max_n: int = 128,
    negative_n: int | None = None,
    positive_n: int | None = None,
    confidence: float = 0.9,
    allow_fallback: bool = True,
    unseen_count_as_unsolved: bool = True,
    zero_extra: Literal["paper", "released_code"] = "paper",
    solver: Literal["greedy", "dp"] = "greedy",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Rollouts per prompt ``(P,)`` int64 summing to ``budget``, and a few statistics.

    ``p``: ``(P,)`` success-rate estimates; ``valid``: ``(P,)`` bool, whether ``p`` is an estimate (a prompt
    without one gets ``n_default``). ``p = 0`` prompts get ``negative_n``, ``p = 1`` prompts
    ``positive_n`` (both default to ``min_n``); ``0 < p < 1`` prompts start at ``min_n`` and the rest
    of the budget is placed by the knapsack over extra rollouts in ``[0, max_n - min_n]``.

    Fallback (``allow_fallback``): if the rollouts the knapsack prompts "need",
    ``sum floor(min(max_n, needed_rollouts(p)))``, are fewer than the remaining budget, the surplus
    goes evenly to the unsolved prompts (``p = 0``; with ``unseen_count_as_unsolved`` also prompts
    without an estimate, as in the released code), or to every non-knapsack prompt if there is none,
    and the knapsack places only the needed amount. Budget the knapsack cannot place (every item at
    ``max_n``) is spread evenly over the knapsack prompts. Without any ``0 < p < 1`` prompt the
    remaining budget goes to the unsolved prompts, else evenly to all prompts.

    Raises:
        ValueError: the minimum allocation exceeds the budget.
    """
    negative_n = min_n if negative_n is None else negative_n
    positive_n = min_n if positive_n is None else positive_n
    p = p.double()
    valid = valid.bool()
    counts = torch.where(
        ~valid,
        torch.full_like(p, n_default),
        torch.where(p == 0, float(negative_n), torch.where(p == 1, float(positive_n), float(min_n))),
    ).long()
    knapsack = valid & (p > 0) & (p < 1)
    unsolved = (valid & (p == 0)) | (~valid if unseen_count_as_unsolved else torch.zeros_like(valid))
    remaining = int(budget) - int(counts.sum())
    if remaining < 0:
        raise ValueError(
            f"the round's budget {budget} is below the minimum allocation {int(counts.sum())} "
            f"({p.numel()} prompts at min_n={min_n}, negative_n={negative_n}, positive_n={positive_n}, "
            f"n_default={n_default}); lower these or raise the budget"
        )
    info = {"fallback": 0.0, "num_knapsack_prompts": float(knapsack.sum()), "fallback_surplus": 0.0}
    if not bool(knapsack.any()):
        if remaining > 0:
            if bool(unsolved.any()):
                counts = spread_evenly(counts, unsolved, remaining)
            else:
                counts = spread_evenly(torch.zeros_like(counts), torch.ones_like(valid), int(budget))
        return counts, info
    dp_budget = remaining
    if allow_fallback:
        needed = int(torch.floor(torch.clamp(needed_rollouts(p[knapsack], confidence), max=max_n)).sum())
        candidates = unsolved if bool(unsolved.any()) else ~knapsack
        if needed < remaining and bool(candidates.any()):
            counts = spread_evenly(counts, candidates, remaining - needed)
            info.update(fallback=1.0, fallback_surplus=float(remaining - needed))
            dp_budget = needed
    gains = item_gains(p[knapsack], min_n, max_n - min_n, zero_extra)
    solve = knapsack_greedy if solver == "greedy" else knapsack_dp
    extra = solve(gains, dp_budget)
    counts = counts.index_add(0, knapsack.nonzero().flatten(), extra)
    counts = spread_evenly(counts, knapsack, dp_budget - int(extra.sum()))
    return counts, info


def robust_epoch_estimate(
    buffer: torch.Tensor, epoch_rewards: torch.Tensor, epoch_sizes: torch.Tensor, robust: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Push each group's rewards into its recent-reward buffer and estimate its success rate.

    ``buffer``: ``(G, L)`` most recent rewards of each prompt, right-aligned (newest last), NaN where
    empty. ``epoch_rewards``: ``(G, M)`` this visit's rewards, right-aligned, NaN-padded;
    ``epoch_sizes``: ``(G,)`` rewards per visit. Returns the new buffer ``(G, L)`` and ``p`` ``(G,)``:
    the visit's mean if it holds ``>= L`` rewards (or ``robust`` is off), else the mean of the ``L``
    most recent rewards across visits.
    """
    width = buffer.shape[1]
    joined = torch.cat([buffer, epoch_rewards], dim=1)
    present = ~torch.isnan(joined)
    from_right = present.flip(1).long().cumsum(1).flip(1)  # 1 = newest present reward
    keep = present & (from_right <= width)
    # Kept rewards go to their column (distinct within a row); the rest to a spare column dropped after.
    target = torch.where(keep, width - from_right, width)
    spare = torch.full((buffer.shape[0], width + 1), float("nan"), dtype=joined.dtype, device=joined.device)
    new_buffer = spare.scatter_(1, target, joined)[:, :width]
    epoch_mean = torch.nanmean(epoch_rewards, dim=1)
    if not robust:
        return new_buffer, epoch_mean
    return new_buffer, torch.where(epoch_sizes >= width, epoch_mean, torch.nanmean(new_buffer, dim=1))


def right_aligned(values: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Scatter ``values`` ``(N,)`` into ``(G, M)`` rows by group, right-aligned in batch order, NaN-padded."""
    sizes = torch.bincount(index, minlength=num_groups)
    width = int(sizes.max()) if sizes.numel() else 0
    rank = group_ranks(index, num_groups)  # batch order within each group
    out = torch.full((num_groups, width), float("nan"), dtype=torch.float64)
    out[index, width - sizes[index] + rank] = values.double()
    return out


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class KnapsackRLConfig:
    """Knapsack RL (Li et al., 2025, arXiv:2509.25849); defaults of the released 7B script."""

    min_n: int = option(2, "N_low: rollouts every prompt with 0 < p < 1 gets at least.", paper=2, domain=NON_NEGATIVE)
    max_n: int = option(128, "N_up: most rollouts the knapsack gives one prompt.", paper=128, domain=Range(1))
    negative_n: int | None = option(
        None, "Rollouts for prompts with p = 0 before the fallback; None = min_n.", paper=2, domain=NON_NEGATIVE
    )
    positive_n: int | None = option(
        None, "Rollouts for prompts with p = 1; None = min_n.", paper=2, domain=NON_NEGATIVE
    )
    n_default: int | None = option(
        None,
        "Rollouts for prompts without an estimate; None = the trainer's per-prompt default (round.default_rollouts).",
        paper=8,
        domain=NON_NEGATIVE,
    )
    confidence: float = option(
        0.9, "a in the 'needed rollouts' ln(1-a)/ln(max(p,1-p)) of the fallback.", paper=0.9,
        domain=Range(0, 1, low_open=True, high_open=True),
    )
    allow_fallback: bool = option(True, "Send budget beyond what knapsack prompts need to unsolved prompts.")
    unseen_count_as_unsolved: bool = option(
        True,
        "Prompts without an estimate share the fallback surplus with p = 0 prompts (the released code keeps "
        "their success rate at 0); False: only p = 0 prompts.",
    )
    min_rewards: int = option(
        8, "Rewards a prompt needs in total before its estimate is used.", paper=8, domain=NON_NEGATIVE
    )
    buffer_length: int = option(
        16, "Robust epoch estimation: a visit with fewer rewards uses the latest this many.", domain=Range(1)
    )
    robust_epoch_estimation: bool = option(
        True, "Use the recent-reward buffer for small visits (else the visit's mean)."
    )
    zero_extra: Literal["paper", "released_code"] = option(
        "paper",
        "Score of giving a knapsack prompt no extra rollout: Value(min_n, p) ('paper') or 0 ('released_code').",
    )
    solver: Literal["greedy", "dp"] = option(
        "greedy",
        "Exact solver: sorted marginal gains ('greedy', fast) or dynamic programming over (item, budget) ('dp').",
    )
    reward_range: tuple[float, float] = option(
        (0.0, 1.0), "Rewards are mapped from this range onto [0, 1] (and clipped) to count successes.", domain=FINITE
    )

    def __post_init__(self):
        if not 0 <= self.min_n <= self.max_n:
            raise ValueError(f"need 0 <= min_n <= max_n, got min_n={self.min_n}, max_n={self.max_n}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.buffer_length < 1 or self.min_rewards < 0:
            raise ValueError("buffer_length must be >= 1 and min_rewards >= 0")
        if not self.reward_range[1] > self.reward_range[0]:
            raise ValueError(f"reward_range must be (low, high) with high > low, got {self.reward_range}")


# --------------------------------------------------------------------------------------------- method


class KnapsackRL(Method):
    """Knapsack RL: allocate each round's rollouts by a knapsack over per-prompt success rates."""

    name = "knapsack_rl"
    Config = KnapsackRLConfig
    paper = "https://arxiv.org/abs/2509.25849"
    plugin_api = ">=1.3,<2"  # GRPOBatch.unshaped_rewards

    @classmethod
    def example(cls) -> Example:
        """The conformance suite's example run (see grpo_plugins.example)."""
        return Example(
            order_dependent="a prompt's recent-reward buffer keeps its rewards in batch order (which ones are the "
            "newest only matters once the buffer is full)",
        )

    def __init__(self, config=None):
        super().__init__(config)
        self.table = PromptTable(
            success_rate=(0.0, torch.float64, ()),  # latest estimate
            reward_count=(0, torch.int64, ()),  # rewards seen in total
            buffer=(float("nan"), torch.float64, (self.config.buffer_length,)),  # recent rewards, newest last
        )

    def needs(self) -> Needs:
        """With any allocation rule that can give a prompt one rollout (min_n, negative_n, positive_n or
        n_default below 2), groups of one reach the advantage stage: the built-in ``grpo`` estimator, which
        needs >= 2 completions per group, is then excluded (pair it with one that accepts single
        completions, e.g. ``spo``)."""
        cfg = self.config
        counts = {"min_n": cfg.min_n, "negative_n": cfg.negative_n, "positive_n": cfg.positive_n, "n_default": cfg.n_default}
        singles = sorted(f"{key}={value}" for key, value in counts.items() if value is not None and value < 2)
        if not singles:
            return Needs()
        return Needs(excludes={"grpo"}, why={"grpo": f"{', '.join(singles)} can give a prompt a single rollout, and "
                                                     "grpo's group normalisation needs >= 2 completions per prompt"})

    def estimates(self, prompt_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(p, valid)`` ``(P,)`` of ``prompt_ids``; a prompt with fewer than ``min_rewards`` rewards is not valid."""
        p = self.table.get("success_rate", prompt_ids)
        return p, self.table.get("reward_count", prompt_ids) >= self.config.min_rewards

    @hookimpl
    def allocate_rollouts(self, round: PromptRound, prompt_ids: torch.Tensor) -> torch.Tensor:
        """``(P,)`` rollouts per prompt summing to ``round.budget`` (identical on every rank)."""
        c = self.config
        p, valid = self.estimates(prompt_ids)
        counts, info = knapsack_allocate(
            p, valid, round.budget,
            n_default=round.default_rollouts if c.n_default is None else c.n_default,
            min_n=c.min_n, max_n=c.max_n, negative_n=c.negative_n, positive_n=c.positive_n,
            confidence=c.confidence, allow_fallback=c.allow_fallback,
            unseen_count_as_unsolved=c.unseen_count_as_unsolved, zero_extra=c.zero_extra, solver=c.solver,
        )
        for key, value in info.items():
            self.log_metric(key, value)
        self.log_metric("max_rollouts", counts.max())
        self.log_metric("min_rollouts", counts.min())
        self.log_metric("frac_prompts_with_estimate", valid.double().mean())
        return counts

    @hookimpl
    def observe(self, batch: GRPOBatch) -> None:
        """Add each group's rewards to its prompt's history and refresh its success-rate estimate.

        The rewards are the trainer's, before any ``shape_rewards`` (``batch.unshaped_rewards``): the card's
        per-completion binary rewards, not a shaper's output."""
        low, high = self.config.reward_range
        rewards = batch.rewards if batch.unshaped_rewards is None else batch.unshaped_rewards
        success = (rewards.double() - low) / (high - low)
        if not bool(torch.isfinite(success).all()):
            raise ValueError("rewards contain NaN/inf; the success-rate estimates cannot be updated")
        success = success.clamp(0, 1)
        index, num_groups, sizes = batch.group_index, batch.num_groups, batch.group_sizes
        rows, col = self.table.rows(batch.group_prompt_ids), self.table.columns
        epoch = right_aligned(success, index, num_groups)
        buffer, p = robust_epoch_estimate(col["buffer"][rows], epoch, sizes, self.config.robust_epoch_estimation)
        col["buffer"][rows], col["success_rate"][rows] = buffer, p
        col["reward_count"][rows] += sizes
        visit_mean = segment_mean(success, index, num_groups)
        self.log_metric("mixed_group_fraction", ((visit_mean > 0) & (visit_mean < 1)).double().mean())
        self.log_metric("mean_success_rate", p.mean())

    def state_dict(self) -> dict:
        return self.table.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if state["buffer"].shape[1:] != (self.config.buffer_length,):
            raise ValueError(
                f"checkpoint reward buffer {tuple(state['buffer'].shape)} does not match "
                f"buffer_length={self.config.buffer_length}"
            )
        self.table.load_state_dict(state)
