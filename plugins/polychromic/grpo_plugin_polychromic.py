"""Polychromic objectives for RL (Hamid, Orney, Xu, Finn, Sadigh; arXiv:2509.25424).

GRPO scores every completion alone, so a policy that keeps producing the same correct answer loses
nothing. The polychromic objective scores *sets* of ``n`` completions by success times diversity,
and gives each completion the marginal advantage of the sets it belongs to:

    set score    f(S) = (1/n sum_{i in S} r_i) * d(S),   d(S) = (#distinct keys in S) / n,   r_i >= 0
    baseline     b_g = mean of f(S) over the sets S drawn from group g
    advantage    A_i = mean_{S contains i} f(S) - b_g(i)          (0 for a completion in no set)
                 optionally divided by the group's std of A (exactly 0 for a constant group)

Sets come from each group (the G completions of a prompt play the paper's vine): every subset of
size ``n`` when there are at most ``max(num_subsets, G)`` of them (exact; always the case for
``n = 1`` and ``n = G - 1``), otherwise ``num_subsets`` uniform random subsets. With ``n = 1`` the
advantage is ``r_i - mean_g r``: GRPO without the std, exactly.

The random subsets come from ``torch.Generator().manual_seed(seed * 1_000_003 + batch.step)``: the
same on every data-parallel rank (each sees the same gathered batch) and the same again when a
run resumes from a checkpoint at that step.

Keys (the diversity classes) come from the completion text, the reward value, or a user function
``module:function`` of the text (a final answer, a strategy label, a hashed plan).

Shapes: ``N`` completions, ``G`` groups, ``n`` set size, ``S`` sets per group. Advantages are ``(N,)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from grpo_plugins import NON_NEGATIVE, GRPOBatch, Method, Range, hookimpl, option
from grpo_plugins import Example
from grpo_plugins.completion_keys import completion_classes, extractor_for
from grpo_plugins.ops import segment_count, segment_max, segment_min, segment_std, segment_sum


def set_scores(rewards: torch.Tensor, keys: torch.Tensor, sets: torch.Tensor) -> torch.Tensor:
    """``f(S) = mean reward of S * (#distinct keys in S) / n`` for ``sets`` ``(..., n)`` of completion indices -> ``(...)``.

    ``rewards``: ``(N,)``; ``keys``: ``(N,)`` int64 diversity classes.
    """
    n = sets.shape[-1]
    members = keys[sets].sort(dim=-1).values
    distinct = 1 + (members.diff(dim=-1) != 0).sum(dim=-1)
    return rewards[sets].mean(dim=-1) * distinct.to(rewards.dtype) / n


def group_subsets(members: torch.Tensor, set_size: int, num_subsets: int, generator: torch.Generator) -> torch.Tensor:
    """Subsets of each row of ``members`` ``(R, s)`` (completion indices of ``R`` groups of size ``s``) -> ``(R, S, n)``.

    Every ``C(s, n)`` subset when ``C(s, n) <= max(num_subsets, s)``; otherwise ``num_subsets``
    uniform random subsets per group (each drawn without repetition, from ``generator``).
    """
    rows, size = members.shape
    if math.comb(size, set_size) <= max(num_subsets, size):
        positions = torch.combinations(torch.arange(size), r=set_size).to(members.device)  # (C, n)
        return members[:, positions]
    draws = torch.rand(rows, num_subsets, size, generator=generator).to(members.device)
    positions = draws.argsort(dim=-1)[..., :set_size]  # (R, S, n): a uniform n-subset per draw
    return members.gather(1, positions.reshape(rows, -1)).reshape(rows, num_subsets, set_size)


def polychromic_advantages(
    rewards: torch.Tensor,
    keys: torch.Tensor,
    index: torch.Tensor,
    num_groups: int,
    set_size: int = 4,
    num_subsets: int = 128,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Marginal set advantages -> ``((N,) advantages, (G,) baselines b_g)``.

    Args:
        rewards: ``(N,)`` finite rewards.
        keys: ``(N,)`` int64 diversity classes (equal key = same strategy / answer).
        index: ``(N,)`` group of each completion in ``[0, G)``; every group needs ``>= set_size`` members.
        num_groups: ``G``.
        set_size: ``n``.
        num_subsets: random subsets per group when enumerating them all would take more.
        generator: the source of the random subsets.

    The groups are visited once per distinct group size (a handful); within a size every group is
    handled at once. ``b_g = sum_i sum_{S contains i} f(S) / sum_i #{S contains i}`` (each set counted
    ``n`` times above and below), so with ``n = 1`` every sum is the one GRPO's centring computes.
    The sums run in float64; a group whose sets all score the same (e.g. equal rewards) gets exactly 0.
    With ``set_size > 1`` the rewards must be ``>= 0`` (``ValueError`` otherwise): ``f(S)`` multiplies the
    mean reward by the diversity, which rewards diversity only when the mean is non-negative (with
    negative rewards duplicates would be pushed up). ``set_size = 1`` (``d = 1``) takes any reward.
    """
    if set_size > 1 and bool((rewards < 0).any()):
        raise ValueError(
            f"polychromic with set_size={set_size} needs rewards >= 0 (got a minimum of {float(rewards.min()):g}): "
            "f(S) = mean reward x diversity rewards diversity only for non-negative rewards; map the rewards "
            "to [0, 1] (e.g. success 1, failure 0)"
        )
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    dtype, rewards = rewards.dtype, rewards.double()
    sizes = segment_count(index, num_groups)
    order = torch.argsort(index, stable=True)
    starts = torch.cumsum(sizes, 0) - sizes
    score_sum = torch.zeros_like(rewards)
    hits = torch.zeros_like(rewards)
    flat_group = torch.zeros(num_groups, dtype=torch.bool, device=index.device)
    for size in torch.unique(sizes).tolist():
        groups = torch.nonzero(sizes == size).flatten()
        members = order[starts[groups, None] + torch.arange(size, device=index.device)]  # (R, size)
        sets = group_subsets(members, set_size, num_subsets, generator)  # (R, S, n)
        scores = set_scores(rewards, keys, sets)
        flat_group[groups] = scores.amax(dim=-1) == scores.amin(dim=-1)
        flat = sets.reshape(-1)
        score_sum.index_add_(0, flat, scores.unsqueeze(-1).expand_as(sets).reshape(-1))
        hits.index_add_(0, flat, torch.ones_like(flat, dtype=rewards.dtype))
    baseline = segment_sum(score_sum, index, num_groups) / segment_sum(hits, index, num_groups).clamp(min=1)
    marginal = score_sum / hits.clamp(min=1) - baseline.index_select(0, index)
    zero = (hits == 0) | flat_group.index_select(0, index)
    return torch.where(zero, torch.zeros_like(marginal), marginal).to(dtype), baseline.to(dtype)


def scale_by_group_std(advantages: torch.Tensor, index: torch.Tensor, num_groups: int, epsilon: float) -> torch.Tensor:
    """``A / (std_g(A) + epsilon)`` (unbiased std) -> ``(N,)``; exactly 0 where a group's advantages are all equal."""
    std = segment_std(advantages, index, num_groups).index_select(0, index)
    constant = (segment_max(advantages, index, num_groups) == segment_min(advantages, index, num_groups))
    scaled = advantages / (std + epsilon)
    return torch.where(constant.index_select(0, index), torch.zeros_like(scaled), scaled)


# ----------------------------------------------------------------- keys of the completions


def diversity_keys(batch: GRPOBatch, source: str, extractor: Callable[[str], Any] | None = None) -> torch.Tensor:
    """``(N,)`` int64 diversity class of each completion; see
    :func:`grpo_plugins.completion_keys.completion_classes` (``source``: ``"reward"``, ``"completion"`` or
    ``"module:function"``)."""
    return completion_classes(batch, source, extractor, setting="diversity_key")


@dataclass(frozen=True)
class PolychromicConfig:
    """Polychromic objective (arXiv:2509.25424): marginal advantages of success x diversity over sets of completions."""

    set_size: int = option(4, "n, completions per set (the paper: small, e.g. 4); every group needs >= n.",
                           paper=4, domain=Range(1, None))
    num_subsets: int = option(
        128, "Random sets per group when the C(G, n) subsets are more than max(num_subsets, G); otherwise all "
        "are used (exact).", paper=128, domain=Range(1, None),
    )
    diversity_key: str = option(
        "completion", "What makes two completions the same strategy: 'completion' (equal text), 'reward' (equal "
        "reward) or 'module:function' (a function of the text, e.g. a final-answer extractor).", paper="completion",
    )
    scale_by_std: bool = option(False, "Divide by the group's std of A (the paper does not; inferred option).",
                                paper=False)
    epsilon: float = option(1e-6, "Added to the std when scale_by_std is on.", paper=1e-6, domain=NON_NEGATIVE)
    seed: int = option(0, "Seed of the per-step subset generator: seed * 1_000_003 + step.", paper=0,
                       domain=Range(0, None))

    def __post_init__(self):
        if self.diversity_key not in ("reward", "completion") and ":" not in self.diversity_key:
            raise ValueError(
                f"diversity_key must be 'completion', 'reward' or 'module:function', got {self.diversity_key!r}"
            )


class Polychromic(Method):
    """Polychromic objective: each completion's advantage is the mean success x diversity of the sets it is in."""

    name = "polychromic"
    Config = PolychromicConfig
    paper = "https://arxiv.org/abs/2509.25424"

    @classmethod
    def example(cls) -> Example:
        """The conformance suite's example run (see grpo_plugins.example)."""
        return Example(
            min_group_size=4,
            nonzero_constant_groups="a set's reward is its mean reward times its diversity, so completions of a group "
            "with equal rewards still differ by the diversity of the sets they belong to",
        )

    def __init__(self, config: Any = None):
        super().__init__(config)
        self._extractor = extractor_for(self.config.diversity_key)

    def requires(self) -> set[str]:
        return set() if self.config.diversity_key == "reward" else {"completions"}

    def generator(self, step: int) -> torch.Generator:
        """The subset generator of ``step``: identical on every rank and on resume."""
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)

    @hookimpl
    def compute_advantages(self, batch: GRPOBatch) -> torch.Tensor:
        """``(N,)`` marginal set advantages from ``batch.rewards`` and the completions' diversity keys."""
        cfg = self.config
        batch.require_group_size(cfg.set_size, f"polychromic with set_size={cfg.set_size} (sets are drawn within a group)")
        keys = diversity_keys(batch, cfg.diversity_key, self._extractor)
        advantages, baseline = polychromic_advantages(
            batch.rewards.float(), keys, batch.group_index, batch.num_groups, cfg.set_size, cfg.num_subsets,
            self.generator(batch.step),
        )
        if cfg.scale_by_std:
            advantages = scale_by_group_std(advantages, batch.group_index, batch.num_groups, cfg.epsilon)
        distinct = torch.unique(batch.group_index * (int(keys.max()) + 1) + keys).numel() / batch.num_groups
        self.log_metric("mean_set_score", baseline.mean())
        self.log_metric("distinct_keys_per_group", distinct)
        self.log_metric("frac_zero_advantage", (advantages == 0).float().mean())
        return advantages
