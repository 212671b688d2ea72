"""GDRO: group-DRO curricula over difficulty bins — Prompt-GDRO (which prompts) and Rollout-GDRO (how many rollouts).

Group DRO-driven RL for LLM reasoning (Tencent, 2026; public code not found: the formulas below are
inferred from the abstract, see the docs page). Each prompt ``x`` falls in a difficulty bin ``b(x)``
by its latest pass rate ``p_x`` (edges ``[0, .2, .4, .6, .8, 1]``; a prompt never seen is in the
hardest bin); the pass rates are read from the trainer's rewards before any ``shape_rewards``
(``batch.unshaped_rewards``). Per observed step and bin ``g`` (bins as the prompts were sampled)::

    l_g = mean over the bin's prompts of (1 - p_x)                       (this visit's pass rates)
    m_g <- (1 - a) m_g + a l_g,      mhat_g = m_g / (1 - (1 - a)^{n_g})     (n_g: updates of bin g)
    log w_g += eta mhat_g,           q = (1 - gamma) softmax(log w) + gamma / B

Prompt-GDRO (``sample_prompts``) draws each prompt's bin from ``q`` (restricted to non-empty bins, in log space)
and the prompt uniformly inside the bin (distinct prompts while the bin has enough). Rollout-GDRO
(``allocate_rollouts``) minimises ``sum_g q_g sigma_g^2 / n_g`` under the round's budget, which gives
the square-root rule ``n_x = clamp(sqrt(q_b sigma_b^2 / lambda), n_min, n_max)`` with
``sigma_b^2 = p_b (1 - p_b) + tau`` (``p_b`` the mean pass rate of the round's prompts in bin ``b``);
the shadow price ``lambda`` is found exactly by water-filling and the counts are rounded by largest
remainder, so they sum exactly to the budget.

Shapes: ``D`` dataset prompts, ``P`` prompts in a round, ``B`` bins, ``N`` completions, ``G`` groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from grpo_plugins import FINITE, NON_NEGATIVE, UNIT, GRPOBatch, Method, Needs, PromptRound, Range, hookimpl, option
from grpo_plugins.budgets import apportion, check_budget
from grpo_plugins.ops import segment_count, segment_mean
from grpo_plugins.prompt_table import PromptTable, group_outcomes, unit_outcomes

# --------------------------------------------------------------------------------------------- maths


def difficulty_bins(pass_rate: torch.Tensor, seen: torch.Tensor, edges: tuple[float, ...]) -> torch.Tensor:
    """``(D,)`` int64 bin of each prompt: ``k`` with ``edges[k] <= p < edges[k + 1]`` (the last bin
    includes 1); a prompt never seen (``seen`` False) is in bin 0, the hardest."""
    inner = torch.tensor(edges[1:-1], dtype=torch.float64)
    bins = torch.bucketize(pass_rate.double(), inner, right=True)
    return torch.where(seen.bool(), bins, 0)


def hedge_update(
    log_weights: torch.Tensor, ema: torch.Tensor, updates: torch.Tensor, losses: torch.Tensor,
    observed: torch.Tensor, rate: float = 0.1, step_size: float = 1.0, all_seen: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Hedge step on the bins, all ``(B,)``: returns ``(log_weights, ema, updates)``.

    ``m_g <- (1 - a) m_g + a l_g`` and ``n_g += 1`` for the ``observed`` bins; ``log w_g += eta
    m_g / (1 - (1 - a)^{n_g})`` for every bin updated at least once (``all_seen``) or only the observed
    ones. The log-weights are shifted so that their maximum is 0 (same distribution, no overflow).
    """
    ema = torch.where(observed, (1 - rate) * ema + rate * losses, ema)
    updates = updates + observed.long()
    debiased = torch.where(updates > 0, ema / (1 - (1 - rate) ** updates.double()).clamp(min=1e-300), 0.0)
    moves = (updates > 0) if all_seen else observed
    log_weights = log_weights + step_size * torch.where(moves, debiased, 0.0)
    return log_weights - log_weights.max(), ema, updates


def bin_distribution(log_weights: torch.Tensor, mixing: float = 0.1, available: torch.Tensor | None = None) -> torch.Tensor:
    """``q = (1 - gamma) softmax(log w) + gamma / B`` ``(B,)``; with ``available`` ``(B,)`` bool, ``q`` restricted
    to those bins and renormalised.

    Computed in log space (``log q = logaddexp(log(1 - gamma) + log_softmax(log w), log(gamma / B))``), so that
    with ``gamma = 0`` a bin trailing the others by more than ~745 in log-weight keeps its share relative to
    the other available bins instead of underflowing to 0.
    """
    b = log_weights.numel()
    log_mix = torch.tensor([1.0 - mixing, mixing / b], dtype=torch.float64).log()
    log_q = torch.logaddexp(log_mix[0] + torch.log_softmax(log_weights.double(), 0), log_mix[1])
    if available is not None:
        log_q = torch.where(available, log_q, float("-inf"))
    return torch.softmax(log_q, 0)


def draw_by_bins(bins: torch.Tensor, q: torch.Tensor, num: int, generator: torch.Generator) -> torch.Tensor:
    """``(num,)`` indices into ``bins`` ``(D,)``: each draw's bin from ``q`` ``(B,)`` (restricted to
    non-empty bins), then a prompt uniformly inside the bin — distinct prompts while the bin has
    enough, cycling through it again otherwise."""
    num_bins = q.numel()
    sizes = torch.bincount(bins, minlength=num_bins)
    q = torch.where(sizes > 0, q.double(), 0.0)
    drawn_bins = torch.multinomial(q, num, replacement=True, generator=generator)
    per_bin = torch.bincount(drawn_bins, minlength=num_bins)
    order = torch.sort(bins.double() + torch.rand(bins.numel(), dtype=torch.float64, generator=generator)).indices
    start = torch.cumsum(sizes, 0) - sizes  # where each bin begins in ``order`` (shuffled inside)
    which = torch.repeat_interleave(torch.arange(num_bins), per_bin)
    rank = torch.arange(num) - (torch.cumsum(per_bin, 0) - per_bin)[which]
    return order[start[which] + rank % sizes[which]]


def sqrt_rule_weights(q: torch.Tensor, pass_rate: torch.Tensor, bins: torch.Tensor, variance_floor: float = 0.05) -> torch.Tensor:
    """``(P,)`` weights ``sqrt(q_b sigma_b^2)``, ``sigma_b^2 = p_b (1 - p_b) + tau`` with ``p_b`` the mean
    ``pass_rate`` ``(P,)`` of the round's prompts in bin ``b``; ``bins``: ``(P,)``."""
    mean_rate = segment_mean(pass_rate.double(), bins, q.numel())
    variance = mean_rate * (1 - mean_rate) + variance_floor
    return torch.sqrt(q.double() * variance)[bins]


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class GDROConfig:
    """GDRO (Tencent, 2026); every constant is the card's placeholder (the paper's code is not public)."""

    use_prompt_gdro: bool = option(True, "Prompt-GDRO: draw prompts by Hedge weights over difficulty bins (sample_prompts).")
    use_rollout_gdro: bool = option(True, "Rollout-GDRO: square-root rollout allocation per bin (allocate_rollouts).")
    bin_edges: tuple[float, ...] = option(
        (0.0, 0.2, 0.4, 0.6, 0.8, 1.0), "Pass-rate edges of the difficulty bins (from 0 to 1, increasing).", domain=UNIT
    )
    ema_rate: float = option(0.1, "a: EMA rate of each bin's loss.", domain=Range(0, 1, low_open=True))
    step_size: float = option(1.0, "eta: Hedge step size on the debiased bin losses.", domain=NON_NEGATIVE)
    mixing: float = option(0.1, "gamma: share of the uniform distribution mixed into the bin distribution.", domain=UNIT)
    hedge_bins: Literal["all_seen", "observed"] = option(
        "all_seen",
        "Bins whose log-weight moves each step: every bin observed at least once, with its debiased EMA loss "
        "('all_seen', visit frequency does not bias the weights), or only the bins of this step ('observed', "
        "the card's 'per step and observed bin g').",
        paper="observed",
    )
    min_rollouts: int = option(2, "n_min: fewest rollouts of a prompt (Rollout-GDRO).", domain=Range(0, None))
    max_rollouts: int = option(32, "n_max: most rollouts of a prompt (Rollout-GDRO).", domain=Range(1, None))
    variance_floor: float = option(0.05, "tau added to p(1-p) in sigma^2 (Rollout-GDRO).", domain=NON_NEGATIVE)
    reward_range: tuple[float, float] = option(
        (0.0, 1.0), "Rewards are mapped from this range onto [0, 1] (and clipped) to count passes.", domain=FINITE
    )

    def __post_init__(self):
        edges = self.bin_edges
        if len(edges) < 2 or edges[0] != 0.0 or edges[-1] != 1.0 or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"bin_edges must increase strictly from 0 to 1, got {edges}")
        if self.min_rollouts > self.max_rollouts:
            raise ValueError(f"min_rollouts ({self.min_rollouts}) must be <= max_rollouts ({self.max_rollouts})")
        if not self.reward_range[1] > self.reward_range[0]:
            raise ValueError(f"reward_range must be (low, high) with high > low, got {self.reward_range}")
        if not (self.use_prompt_gdro or self.use_rollout_gdro):
            raise ValueError("use_prompt_gdro and use_rollout_gdro are both off: nothing to do")


# --------------------------------------------------------------------------------------------- method


class GDRO(Method):
    """GDRO: Hedge over difficulty bins for prompt sampling, square-root rule for rollout budgets."""

    name = "gdro"
    Config = GDROConfig
    paper = ""  # the arXiv id was not found (Tencent, January 2026); see the docs page
    plugin_api = ">=1.3,<2"  # GRPOBatch.unshaped_rewards

    def __init__(self, config=None):
        super().__init__(config)
        num_bins = len(self.config.bin_edges) - 1
        self.table = PromptTable(pass_rate=(0.0, torch.float64, ()), seen=(False, torch.bool, ()))
        self.log_weights = torch.zeros(num_bins, dtype=torch.float64)
        self.ema = torch.zeros(num_bins, dtype=torch.float64)
        self.updates = torch.zeros(num_bins, dtype=torch.long)

    def needs(self) -> Needs:
        """With Rollout-GDRO and ``min_rollouts < 2`` a prompt can get one rollout: the built-in ``grpo``
        estimator, which needs >= 2 completions per group, is then excluded."""
        c = self.config
        if not c.use_rollout_gdro or c.min_rollouts >= 2:
            return Needs()
        return Needs(excludes={"grpo"}, why={"grpo": f"Rollout-GDRO with min_rollouts={c.min_rollouts} can give a "
                                                     "prompt a single rollout, and grpo's group normalisation needs "
                                                     ">= 2 completions per prompt (set min_rollouts >= 2, or use an "
                                                     "estimator that accepts single completions)"})

    def disabled_hooks(self) -> set[str]:
        off = set()
        if not self.config.use_prompt_gdro:
            off.add("sample_prompts")
        if not self.config.use_rollout_gdro:
            off.add("allocate_rollouts")
        return off

    @property
    def num_bins(self) -> int:
        return self.log_weights.numel()

    def distribution(self) -> torch.Tensor:
        """``q`` ``(B,)``: the current bin distribution."""
        return bin_distribution(self.log_weights, self.config.mixing)

    def bins(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """``(P,)`` difficulty bin of each prompt (by its latest pass rate)."""
        seen = self.table.get("seen", prompt_ids)
        return difficulty_bins(self.table.get("pass_rate", prompt_ids), seen, self.config.bin_edges)

    @hookimpl
    def sample_prompts(self, round: PromptRound, generator: torch.Generator) -> torch.Tensor:
        """``(P,)`` dataset indices: bins drawn from ``q``, prompts uniformly inside (Prompt-GDRO)."""
        bins = self.bins(torch.arange(round.dataset_size))
        occupied = torch.bincount(bins, minlength=self.num_bins) > 0
        q = bin_distribution(self.log_weights, self.config.mixing, occupied)  # over the non-empty bins
        chosen = draw_by_bins(bins, q, round.num_prompts, generator)
        share = torch.bincount(bins[chosen], minlength=self.num_bins).double() / chosen.numel()
        self.log_metric("hardest_bin_share", share[0])
        return chosen

    @hookimpl
    def allocate_rollouts(self, round: PromptRound, prompt_ids: torch.Tensor) -> torch.Tensor:
        """``(P,)`` rollouts by the square-root rule, in ``[n_min, n_max]``, summing to the budget (Rollout-GDRO)."""
        c = self.config
        try:
            check_budget(prompt_ids.numel(), round.budget, c.min_rollouts, c.max_rollouts)
        except ValueError as error:
            raise ValueError(
                f"Rollout-GDRO: {error} (min_rollouts={c.min_rollouts}, max_rollouts={c.max_rollouts}); change them, "
                "the trainer's generation batch, or set use_rollout_gdro=False"
            ) from None
        bins = self.bins(prompt_ids)
        weights = sqrt_rule_weights(self.distribution(), self.table.get("pass_rate", prompt_ids), bins, c.variance_floor)
        counts = apportion(weights, round.budget, c.min_rollouts, c.max_rollouts)
        self.log_metric("hardest_bin_rollouts", counts[bins == 0].double().mean() if bool((bins == 0).any()) else 0.0)
        return counts.to(prompt_ids.device)

    @hookimpl
    def observe(self, batch: GRPOBatch) -> None:
        """Hedge step on the bins the batch's prompts were drawn from, then record their pass rates."""
        c = self.config
        rewards = batch.rewards if batch.unshaped_rewards is None else batch.unshaped_rewards  # before any shaping
        ids, passes, trials = group_outcomes(batch, unit_outcomes(rewards, c.reward_range))
        rate = (passes / trials).cpu()
        bins = self.bins(ids)  # as sampled: before this visit's pass rates are recorded
        losses = segment_mean(1 - rate, bins, self.num_bins)
        observed = segment_count(bins, self.num_bins) > 0
        self.log_weights, self.ema, self.updates = hedge_update(
            self.log_weights, self.ema, self.updates, losses, observed, c.ema_rate, c.step_size, c.hedge_bins == "all_seen"
        )
        self.table.set("pass_rate", ids, rate)
        self.table.set("seen", ids, True)
        for k, value in enumerate(self.distribution().tolist()):
            self.log_metric(f"bin_{k}_weight", value)

    def state_dict(self) -> dict:
        return {
            "table": self.table.state_dict(), "log_weights": self.log_weights.clone(),
            "ema": self.ema.clone(), "updates": self.updates.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if state["log_weights"].shape != (self.num_bins,):
            raise ValueError(f"checkpoint has {state['log_weights'].numel()} bins, this config {self.num_bins} (bin_edges)")
        self.table.load_state_dict(state["table"])
        self.log_weights = state["log_weights"].double().clone()
        self.ema = state["ema"].double().clone()
        self.updates = state["updates"].long().clone()
