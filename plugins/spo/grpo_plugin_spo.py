"""SPO, Single-stream Policy Optimization: a persistent per-prompt value tracker replaces the group baseline.

Xu & Ding, 2025 (arXiv:2509.13232). Each prompt ``x`` carries a Beta tracker ``(alpha_x, beta_x)`` with
value ``v(x) = alpha_x / (alpha_x + beta_x)``. A completion's advantage is ``a = r - v(x)`` (the value
read before this step's update), normalised once over the whole batch:

    A = (a - mean_B(a)) / (std_B(a) + 1e-8)            (unbiased std; A = 0 when every a of the batch is equal)

After the step each visited prompt's tracker is discounted and updated,

    rho = clip(2^(-D / D_half), rho_min, rho_max),   alpha <- rho alpha + s,   beta <- rho beta + (n - s)

(``s`` successes among the prompt's ``n`` completions, ``D`` the policy distance since its last visit),
and the next prompts are drawn with probability proportional to ``sqrt(v (1 - v)) + eps``.

Shapes: ``N`` completions, ``G`` groups (prompts of the batch), ``T`` tokens, ``D`` tracked prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from grpo_plugins import FINITE, NON_NEGATIVE, POSITIVE, GRPOBatch, Method, PromptRound, Range, hookimpl, option
from grpo_plugins import Example
from grpo_plugins.ops import global_all_equal, global_mean_std, segment_sum
from grpo_plugins.parallel import ParallelContext
from grpo_plugins.prompt_table import PromptTable, draw_weighted

# --------------------------------------------------------------------------------------------- maths


def tracker_value(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``v = alpha / (alpha + beta)``, any shape."""
    return alpha / (alpha + beta)


def spo_advantages(
    rewards: torch.Tensor, values: torch.Tensor, parallel: ParallelContext | None = None, epsilon: float = 1e-8
) -> torch.Tensor:
    """``(N,)`` advantages ``(a - mean(a)) / (std(a) + epsilon)`` with ``a = rewards - values``.

    ``rewards``, ``values``: ``(N,)`` (``values`` = tracker value of each completion's prompt). The mean
    and unbiased std run over the global batch (all ranks). A global batch whose ``a`` are all equal
    (a batch of one included) gets exactly 0, decided from the global max and min of ``a``.
    """
    raw = rewards - values
    parallel = parallel or ParallelContext()
    mean, std = global_mean_std(raw, parallel)
    return ((raw - mean) / (std + epsilon)).masked_fill(global_all_equal(raw, parallel), 0.0)


def forgetting_factor(
    distance: torch.Tensor, half_life: float = 0.06, rho_min: float = 0.875, rho_max: float = 0.96
) -> torch.Tensor:
    """``rho = clip(2^(-distance / half_life), rho_min, rho_max)``, any shape."""
    return torch.pow(2.0, -distance / half_life).clamp(rho_min, rho_max)


def discounted_beta_update(
    alpha: torch.Tensor, beta: torch.Tensor, rho: torch.Tensor, successes: torch.Tensor, trials: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rho alpha + s, rho beta + (n - s))``, all ``(G,)``: one discount per visit, then the visit's evidence."""
    return rho * alpha + successes, rho * beta + (trials - successes)


def sampling_weights(alpha: torch.Tensor, beta: torch.Tensor, epsilon: float = 0.05) -> torch.Tensor:
    """``sqrt(v (1 - v)) + epsilon`` per prompt ``(D,)``: prompts near v = 0.5 carry the most signal."""
    value = tracker_value(alpha, beta)
    return torch.sqrt((value * (1 - value)).clamp(min=0)) + epsilon


def offline_prior(
    successes: torch.Tensor, num_samples: int, rho_min: float = 0.875
) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial ``(alpha, beta)`` from ``s`` successes in ``n`` offline samples per prompt.

    ``N0 = 1 / (1 - rho_min)``; ``alpha = N0 (s + 0.5) / (n + 1)``, ``beta = N0 (n - s + 0.5) / (n + 1)``.
    """
    n0 = 1.0 / (1.0 - rho_min)
    s = successes.double()
    return n0 * (s + 0.5) / (num_samples + 1), n0 * (num_samples - s + 0.5) / (num_samples + 1)


def draw_prompts(weights: torch.Tensor, num_prompts: int, generator: torch.Generator) -> torch.Tensor:
    """``(P,)`` indices drawn with probability ``weights / sum(weights)`` (uniform if the sum is 0).

    Without replacement while there are enough prompts with positive weight, with replacement otherwise
    (the core's :func:`grpo_plugins.prompt_table.draw_weighted`).
    """
    return draw_weighted(weights, num_prompts, generator)


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SPOConfig:
    """SPO (Xu & Ding, 2025, arXiv:2509.13232); defaults of the authors' verl recipe."""

    use_sampler: bool = option(
        True, "Draw prompts from the tracker (sample_prompts); False leaves prompt choice to the trainer or another method."
    )
    use_advantage: bool = option(
        True, "Provide compute_advantages (A = r - v, batch-normalised); False keeps only the tracker and sampler."
    )
    single_rollout: bool = option(
        False,
        "One completion per prompt: the sampler draws round.budget prompts and allocate_rollouts gives each 1 "
        "(without the sampler, the round's budget must equal its prompt count).",
        paper=True,
    )
    rho_mode: Literal["logprob_shift", "constant"] = option(
        "logprob_shift",
        "How the forgetting factor is set: 'logprob_shift' uses D = |mean behaviour log-prob of this visit's "
        "completions - that of the last visit's| (a proxy for the paper's recomputed log-probs, see the docs); "
        "'constant' uses rho_constant (the recipe's rho.type=constant).",
        paper="kl",
    )
    rho_constant: float = option(
        0.875, "Forgetting factor of rho_mode='constant' (recipe rho.value).", domain=Range(0, 1, low_open=True)
    )
    half_life: float = option(
        0.06, "D_half: the policy distance at which evidence loses half its weight.", domain=POSITIVE
    )
    rho_min: float = option(
        0.875, "Lower clip of rho (recipe rho.clip_lower); also sets the offline prior's N0.",
        domain=Range(0, 1, low_open=True),
    )
    rho_max: float = option(
        0.96, "Upper clip of rho (caps a tracker's effective sample size at 1/(1-rho_max)).",
        domain=Range(0, 1, low_open=True),
    )
    sampling_epsilon: float = option(0.05, "eps added to sqrt(v(1-v)) in the sampling weights.", domain=NON_NEGATIVE)
    norm_epsilon: float = option(1e-8, "Added to the batch std before dividing.", domain=POSITIVE)
    prior_alpha: float = option(0.5, "alpha of a prompt never seen (without offline initialisation).", domain=POSITIVE)
    prior_beta: float = option(0.5, "beta of a prompt never seen.", domain=POSITIVE)
    reward_range: tuple[float, float] = option(
        (0.0, 1.0), "Rewards are mapped from this range onto [0, 1]; the tracker counts the clipped value as success.",
        domain=FINITE,
    )

    def __post_init__(self):
        if not 0 < self.rho_min <= self.rho_max <= 1:
            raise ValueError(f"need 0 < rho_min <= rho_max <= 1, got {self.rho_min}, {self.rho_max}")
        if not 0 < self.rho_constant <= 1 or self.half_life <= 0:
            raise ValueError("rho_constant must be in (0, 1] and half_life > 0")
        if self.prior_alpha <= 0 or self.prior_beta <= 0:
            raise ValueError("prior_alpha and prior_beta must be > 0")
        if not self.reward_range[1] > self.reward_range[0]:
            raise ValueError(f"reward_range must be (low, high) with high > low, got {self.reward_range}")


# --------------------------------------------------------------------------------------------- method


class SPO(Method):
    """SPO: per-prompt Beta value tracker, batch-normalised r - v advantages, tracker-weighted prompt sampling."""

    name = "spo"
    Config = SPOConfig
    paper = "https://arxiv.org/abs/2509.13232"
    plugin_api = ">=1.3,<2"  # grpo_plugins.ops.global_all_equal

    @classmethod
    def example(cls) -> Example:
        """The conformance suite's example run (see grpo_plugins.example)."""
        return Example(
            min_group_size=1,
            nonzero_constant_groups="the baseline is the prompt's value tracker, not the group's mean (single-stream)",
        )

    def __init__(self, config=None):
        super().__init__(config)
        c = self.config
        self.table = PromptTable(
            alpha=(c.prior_alpha, torch.float64, ()),
            beta=(c.prior_beta, torch.float64, ()),
            visits=(0, torch.int64, ()),
            last_log_prob=(float("nan"), torch.float64, ()),  # mean behaviour log-prob at the last visit
        )

    def requires(self) -> set[str]:
        """The behaviour log-probs, for the forgetting factor of ``rho_mode='logprob_shift'``."""
        return {"old_log_probs"} if self.config.rho_mode == "logprob_shift" else set()

    def disabled_hooks(self) -> set[str]:
        off = set()
        if not self.config.use_sampler:
            off.add("sample_prompts")
        if not self.config.use_advantage:
            off.add("compute_advantages")
        if not self.config.single_rollout:
            off.add("allocate_rollouts")
        return off

    # ----------------------------------------------------------------- tracker
    def tracker(self, prompt_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha, beta)`` ``(P,)`` of ``prompt_ids`` (the prior for prompts never seen)."""
        return self.table.get("alpha", prompt_ids), self.table.get("beta", prompt_ids)

    def values(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Tracker values ``v`` ``(P,)`` of ``prompt_ids``."""
        return tracker_value(*self.tracker(prompt_ids))

    def set_tracker(self, prompt_ids: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> None:
        """Overwrite the trackers of the distinct ``prompt_ids`` ``(P,)``."""
        rows = self.table.rows(prompt_ids)
        self.table.columns["alpha"][rows] = torch.as_tensor(alpha, dtype=torch.float64)
        self.table.columns["beta"][rows] = torch.as_tensor(beta, dtype=torch.float64)

    def initialize(self, prompt_ids: torch.Tensor, successes: torch.Tensor, num_samples: int) -> None:
        """Set trackers from offline pass counts (``successes`` ``(P,)`` out of ``num_samples`` each)."""
        self.set_tracker(prompt_ids, *offline_prior(successes, num_samples, self.config.rho_min))

    def _unit_rewards(self, rewards: torch.Tensor) -> torch.Tensor:
        low, high = self.config.reward_range
        return (rewards.double() - low) / (high - low)

    # ----------------------------------------------------------------- hooks
    @hookimpl
    def sample_prompts(self, round: PromptRound, generator: torch.Generator) -> torch.Tensor:
        """``(P,)`` dataset indices drawn with probability proportional to ``sqrt(v(1-v)) + eps``.

        ``P`` is ``round.num_prompts``, or ``round.budget`` with ``single_rollout`` (one completion each).
        """
        alpha, beta = self.tracker(torch.arange(round.dataset_size))
        count = round.budget if self.config.single_rollout else round.num_prompts
        chosen = draw_prompts(sampling_weights(alpha, beta, self.config.sampling_epsilon), count, generator)
        value = tracker_value(alpha[chosen], beta[chosen])
        self.log_metric("sampled_value_variance", (value * (1 - value)).mean())
        return chosen

    @hookimpl
    def allocate_rollouts(self, round: PromptRound, prompt_ids: torch.Tensor) -> torch.Tensor:
        """One completion per prompt ``(P,)`` (``single_rollout``); the budget must equal ``P``."""
        if round.budget != prompt_ids.numel():
            raise ValueError(
                f"single_rollout gives each of the {prompt_ids.numel()} prompts one completion, but the round's budget "
                f"is {round.budget}; configure the trainer for one generation per prompt or set single_rollout=False"
            )
        return torch.ones_like(prompt_ids, dtype=torch.int64)

    @hookimpl
    def compute_advantages(self, batch: GRPOBatch) -> torch.Tensor:
        """``(N,)`` batch-normalised ``r - v(x)`` with the tracker read before this step's update."""
        values = self.values(batch.group_prompt_ids)[batch.group_index]  # one lookup per prompt
        rewards = self._unit_rewards(batch.rewards)
        advantages = spo_advantages(rewards, values, batch.parallel, self.config.norm_epsilon)
        self.log_metric("mean_value", values.mean())
        self.log_metric("frac_zero_advantage", (advantages == 0).double().mean())
        return advantages.to(batch.rewards.dtype)

    @hookimpl
    def observe(self, batch: GRPOBatch) -> None:
        """Discount and update the tracker of every prompt of the batch."""
        rewards = self._unit_rewards(batch.rewards)
        if not bool(torch.isfinite(rewards).all()):
            raise ValueError("rewards contain NaN/inf; the tracker cannot be updated")
        index, groups = batch.group_index, batch.num_groups
        rows = self.table.rows(batch.group_prompt_ids)
        col = self.table.columns
        trials = batch.group_sizes.double()
        successes = segment_sum(rewards.clamp(0, 1), index, groups)
        rho, distance = self._forgetting(batch, index, groups, rows)
        alpha, beta = discounted_beta_update(col["alpha"][rows], col["beta"][rows], rho, successes, trials)
        col["alpha"][rows], col["beta"][rows] = alpha, beta
        col["visits"][rows] += 1
        self.log_metric("rho", rho.mean())
        self.log_metric("policy_distance", distance.mean())
        self.log_metric("tracker_effective_samples", (col["alpha"][rows] + col["beta"][rows]).mean())

    def _forgetting(
        self, batch: GRPOBatch, index: torch.Tensor, groups: int, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rho, D)`` ``(G,)`` of the visited prompts; records this visit's mean behaviour log-prob."""
        c = self.config
        if c.rho_mode == "constant" or batch.old_log_probs is None or batch.completion_mask is None:
            return torch.full((groups,), c.rho_constant, dtype=torch.float64), torch.zeros(groups, dtype=torch.float64)
        keep = batch.completion_mask > 0
        tokens = keep.sum(-1, dtype=torch.float64)
        per_completion = torch.where(keep, batch.old_log_probs, 0.0).sum(-1, dtype=torch.float64) / tokens.clamp(min=1)
        has_tokens = tokens.gt(0).double()
        visit = segment_sum(per_completion * has_tokens, index, groups) / segment_sum(has_tokens, index, groups)
        previous = self.table.columns["last_log_prob"][rows]
        known = ~torch.isnan(previous) & ~torch.isnan(visit)
        distance = torch.where(known, (visit - previous).abs(), torch.zeros_like(visit))
        self.table.columns["last_log_prob"][rows] = torch.where(torch.isnan(visit), previous, visit)
        return forgetting_factor(distance, c.half_life, c.rho_min, c.rho_max), distance

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return self.table.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.table.load_state_dict(state)
