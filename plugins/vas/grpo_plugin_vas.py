"""VAS: MMR1's variance-aware sampling — prompts whose rewards vary and whose completions differ.

Leng et al., 2025 (arXiv:2509.21268). Every prompt ``x`` with pass rate ``p_x`` (fraction of its
completions that succeed) and completions ``y_1 .. y_n`` gets a Variance Promotion Score

    OVS = p (1 - p)                                     (Bernoulli reward variance)
    TDS = 1 - selfBLEU_123(y_1 .. y_n)                  (trajectory diversity over completion ids)
    VPS = w_ovs OVS + w_tds TDS,      W = (VPS - min VPS) / (max VPS - min VPS + 1e-8)

(min-max over the observed prompts, refreshed every ``update_every`` steps from the training
rollouts, with optional momentum ``W <- m W_old + (1 - m) W_new``). A round of ``B`` prompts mixes
``floor(B lambda)`` draws with replacement with probability ``W / sum W`` and ``B - floor(B lambda)``
prompts from a shuffled uniform pool read cyclically, interleaved.

``selfBLEU_123`` is the mean over completions of sentence BLEU (uniform 1-3-gram weights, NLTK's
smoothing method 1, brevity penalty against the closest other length) of each completion against the
others of its group, computed for the whole batch at once (sorts and segment reductions, no loop
over completions).

Shapes: ``D`` dataset prompts, ``B`` prompts in a round, ``N`` completions, ``T`` tokens, ``G`` groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from grpo_plugins import FINITE, NON_NEGATIVE, UNIT, GRPOBatch, Method, PromptRound, Range, hookimpl, option
from grpo_plugins.ops import segment_count, segment_sum
from grpo_plugins.prompt_table import PromptTable, draw_weighted, group_outcomes, unit_outcomes

BLEU_SMOOTHING_EPSILON = 0.1  # NLTK SmoothingFunction().method1

# --------------------------------------------------------------------------------------------- maths


def outcome_variance(p: torch.Tensor) -> torch.Tensor:
    """``OVS = p (1 - p)``; any shape."""
    return p * (1 - p)


def variance_promotion(
    p: torch.Tensor, tds: torch.Tensor, ovs_weight: float = 1.0, tds_weight: float = 0.0
) -> torch.Tensor:
    """``VPS = w_ovs p (1 - p) + w_tds TDS``; ``p``, ``tds``: ``(K,)``."""
    return ovs_weight * outcome_variance(p) + tds_weight * tds


def min_max_normalise(values: torch.Tensor, epsilon: float = 1e-8) -> torch.Tensor:
    """``(v - min v) / (max v - min v + epsilon)`` over ``values`` ``(K,)`` (empty stays empty)."""
    if values.numel() == 0:
        return values
    low, high = values.min(), values.max()
    return (values - low) / (high - low + epsilon)


def _compact(codes: torch.Tensor) -> torch.Tensor:
    """Replace int64 ``codes`` by dense ids ``0 .. U-1`` (same shape)."""
    return torch.unique(codes, return_inverse=True)[1]


def _ngram_clip_counts(
    grams: torch.Tensor, valid: torch.Tensor, group: torch.Tensor, num_groups: int
) -> torch.Tensor:
    """``(N,)`` clipped n-gram matches of each completion against the others of its group.

    ``grams``: ``(N, S)`` dense n-gram ids, ``valid``: ``(N, S)`` bool, ``group``: ``(N,)``. For every
    n-gram ``g`` of completion ``i`` (with count ``c_ig``) the match is ``min(c_ig, max_{j != i} c_jg)``
    over the other members ``j`` of ``i``'s group (BLEU's modified precision numerator).
    """
    n, width = grams.shape
    owner = torch.arange(n).unsqueeze(1).expand(n, width)[valid]
    gram = grams[valid]
    vocab = int(gram.max()) + 1 if gram.numel() else 1
    pairs, count = torch.unique(owner * vocab + gram, return_counts=True)  # (completion, gram) counts
    owner, gram = pairs // vocab, pairs % vocab
    key = group[owner] * vocab + gram  # (group, gram)
    by_count = torch.sort(count, descending=True, stable=True).indices
    order = by_count[torch.sort(key[by_count], stable=True).indices]  # by key, counts descending within
    key_s, count_s = key[order], count[order]
    new = torch.ones_like(key_s, dtype=torch.bool)
    new[1:] = key_s[1:] != key_s[:-1]
    start = torch.cummax(torch.where(new, torch.arange(key_s.numel()), 0), 0).values
    rank = torch.arange(key_s.numel()) - start
    first = count_s[start]  # the largest count of this (group, gram)
    after = (start + 1).clamp(max=key_s.numel() - 1)
    second = torch.where((start + 1 < key_s.numel()) & (key_s[after] == key_s), count_s[after], 0)
    others_max = torch.where(rank == 0, second, first)
    clipped = torch.minimum(count_s, others_max)
    return torch.zeros(n, dtype=torch.float64).index_add_(0, owner[order], clipped.double())


def _closest_reference_length(lengths: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``(N,)`` the length of the other group member closest to each completion's length (ties: the
    shorter), NaN for a completion alone in its group. Uses a padded ``(G, M)`` table, ``M`` the
    largest group size."""
    n = lengths.numel()
    sizes = segment_count(group, num_groups)
    width = int(sizes.max()) if n else 0
    order = torch.sort(group, stable=True).indices
    start = torch.cumsum(sizes, 0) - sizes
    slot = torch.empty(n, dtype=torch.long)
    slot[order] = torch.arange(n) - start[group[order]]
    table = torch.full((num_groups, width), float("inf"), dtype=torch.float64)
    table[group, slot] = lengths.double()
    refs = table[group]  # (N, M)
    refs[torch.arange(n), slot] = float("inf")  # not itself
    distance = (refs - lengths.double()[:, None]).abs()
    key = torch.where(torch.isfinite(refs), distance * (2 * float(lengths.max() if n else 1) + 2) + refs, float("inf"))
    best = key.argmin(dim=1)
    closest = refs[torch.arange(n), best]
    return torch.where(torch.isfinite(closest), closest, float("nan"))


def self_bleu(
    completion_ids: torch.Tensor, completion_mask: torch.Tensor, group_index: torch.Tensor, num_groups: int,
    max_order: int = 3,
) -> torch.Tensor:
    """``(G,)`` self-BLEU of each group: the mean over members of BLEU(member vs the other members).

    ``completion_ids`` / ``completion_mask``: ``(N, T)`` right-padded; only masked-in tokens count.
    Sentence BLEU as NLTK computes it with weights ``1/max_order`` each and smoothing method 1:
    ``BP exp(sum_n w_n log p_n)``, ``p_n`` the clipped n-gram precision (``0.1 / den`` when no n-gram
    matches), ``BP = exp(1 - r / c)`` for a completion of length ``c`` shorter than the closest
    reference length ``r``, and BLEU 0 without any unigram match. Groups of one get 0.
    """
    ids = completion_ids.detach().long().cpu()
    keep = completion_mask.detach().cpu() > 0
    group = group_index.detach().cpu()
    n, width = ids.shape
    lengths = keep.sum(1)
    log_precision = torch.zeros(n, dtype=torch.float64)
    no_unigram_match = torch.zeros(n, dtype=torch.bool)
    unigrams = _compact(torch.where(keep, ids, -1))
    grams = unigrams
    for order in range(1, max_order + 1):
        span = width - order + 1
        matches = torch.zeros(n, dtype=torch.float64)
        if span > 0:
            if order > 1:  # n-gram ids: the (n-1)-gram at t combined with the token at t + n - 1
                grams = _compact(grams[:, :-1] * (int(grams.max()) + 1) + unigrams[:, order - 1 :])
            valid = keep[:, :span].clone()
            for k in range(1, order):  # every token of the n-gram is a real token
                valid &= keep[:, k : k + span]
            if bool(valid.any()):
                matches = _ngram_clip_counts(grams, valid, group, num_groups)
        total = (lengths - order + 1).clamp(min=1).double()
        precision = torch.where(matches > 0, matches, BLEU_SMOOTHING_EPSILON) / total
        log_precision += torch.log(precision) / max_order
        if order == 1:
            no_unigram_match = matches == 0
    reference = _closest_reference_length(lengths, group, num_groups)
    c = lengths.double()
    brevity = torch.where(c > reference, 1.0, torch.exp(1 - reference / c.clamp(min=1)))
    brevity = torch.where(c == 0, 0.0, brevity)
    score = torch.where(no_unigram_match | torch.isnan(reference), 0.0, brevity * torch.exp(log_precision))
    sizes = segment_count(group, num_groups)
    mean = segment_sum(score, group, num_groups) / sizes.clamp(min=1).double()
    return torch.where(sizes >= 2, mean, 0.0)


def trajectory_diversity(
    completion_ids: torch.Tensor, completion_mask: torch.Tensor, group_index: torch.Tensor, num_groups: int,
    direction: Literal["diversity", "self_bleu"] = "diversity", max_order: int = 3,
) -> torch.Tensor:
    """``(G,)`` TDS: ``1 - selfBLEU`` (``"diversity"``) or ``selfBLEU`` (``"self_bleu"``, the released
    code's combination); 0 for a group of one (no diversity can be measured)."""
    score = self_bleu(completion_ids, completion_mask, group_index, num_groups, max_order)
    sizes = segment_count(group_index.cpu(), num_groups)
    value = 1 - score if direction == "diversity" else score
    return torch.where(sizes >= 2, value, 0.0)


def interleave(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``[f0, s0, f1, s1, ...]`` then the rest of the longer one; 1-D tensors."""
    k = min(first.numel(), second.numel())
    head = torch.stack([first[:k], second[:k]], 1).reshape(-1)
    return torch.cat([head, first[k:], second[k:]])


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class VASConfig:
    """VAS (Leng et al., 2025, arXiv:2509.21268); defaults of the released MMR1 config (examples/mmr1.yaml)."""

    ovs_weight: float = option(1.0, "w_ovs: weight of the outcome variance p(1-p) in the VPS.", domain=NON_NEGATIVE)
    tds_weight: float = option(
        0.0, "w_tds: weight of the trajectory diversity (self-BLEU over completion ids) in the VPS; the paper's "
        "example uses 0.2 with w_ovs = 0.8.", domain=NON_NEGATIVE,
    )
    tds_direction: Literal["diversity", "self_bleu"] = option(
        "diversity",
        "TDS = 1 - selfBLEU ('diversity', the paper's description) or selfBLEU itself ('self_bleu', how the released "
        "code combines its metric).",
    )
    bleu_max_order: int = option(3, "Largest n-gram order of self-BLEU (3 = selfBLEU-123).", domain=Range(1, 4))
    mixture_ratio: float = option(0.5, "lambda: share of each round drawn by VPS weight (the rest uniform).", domain=UNIT)
    update_every: int = option(
        4, "Refresh the weights every this many optimiser steps (curriculum_update_freq); 0 = once per pass over the "
        "dataset.", domain=NON_NEGATIVE,
    )
    momentum: float = option(0.0, "m in W <- m W_old + (1 - m) W_new.", domain=Range(0, 1, high_open=True))
    unseen_weight: float = option(
        1.0, "Weight of a prompt never observed (the paper probes every prompt first; 1 = as promising as the best).",
        domain=UNIT,
    )
    reward_range: tuple[float, float] = option(
        (0.0, 1.0), "Rewards are mapped from this range onto [0, 1] (and clipped) to count successes.", domain=FINITE
    )

    def __post_init__(self):
        if not self.reward_range[1] > self.reward_range[0]:
            raise ValueError(f"reward_range must be (low, high) with high > low, got {self.reward_range}")
        if self.ovs_weight + self.tds_weight <= 0:
            raise ValueError("at least one of ovs_weight and tds_weight must be > 0")


# --------------------------------------------------------------------------------------------- method


class VAS(Method):
    """VAS: mix VPS-weighted and uniform prompt draws; VPS from reward variance and completion diversity."""

    name = "vas"
    Config = VASConfig
    paper = "https://arxiv.org/abs/2509.21268"

    def __init__(self, config=None):
        super().__init__(config)
        self.table = PromptTable(
            pass_rate=(0.0, torch.float64, ()),  # latest visit
            diversity=(0.0, torch.float64, ()),  # TDS of the latest visit
            weight=(self.config.unseen_weight, torch.float64, ()),  # W, as of the last refresh
        )
        self.pool = torch.zeros(0, dtype=torch.long)  # (D,) shuffled uniform pool
        self.pool_position = 0
        self.steps_per_pass = 1  # rounds in one pass over the dataset (update_every=0)
        self.last_refresh = 0

    def requires(self) -> set[str]:
        """Completion tokens, for the trajectory diversity (only when it has weight)."""
        return {"completion_ids", "completion_mask"} if self.config.tds_weight > 0 else set()

    def weights(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Sampling weights ``W`` ``(P,)`` of ``prompt_ids`` as of the last refresh."""
        return self.table.get("weight", prompt_ids)

    def _uniform(self, num: int, size: int, generator: torch.Generator) -> torch.Tensor:
        """``(num,)`` next prompts of the shuffled pool, wrapping to its start without reshuffling."""
        if self.pool.numel() != size:
            self.pool, self.pool_position = torch.randperm(size, generator=generator), 0
        if self.pool_position + num > size:
            self.pool_position = 0
        chosen = self.pool[(self.pool_position + torch.arange(num)) % size]
        self.pool_position += num
        return chosen

    @hookimpl
    def sample_prompts(self, round: PromptRound, generator: torch.Generator) -> torch.Tensor:
        """``(B,)`` dataset indices: ``floor(B lambda)`` weighted draws interleaved with uniform-pool prompts."""
        size, num = round.dataset_size, round.num_prompts
        self.steps_per_pass = max(size // num, 1)
        num_weighted = math.floor(num * self.config.mixture_ratio)
        weights = self.weights(torch.arange(size))
        weighted = draw_weighted(weights, num_weighted, generator, replacement=True) if num_weighted else weights.new_zeros(0).long()
        uniform = self._uniform(num - num_weighted, size, generator)
        if num_weighted:
            self.log_metric("weighted_mean_weight", weights[weighted].mean())
        return interleave(weighted, uniform)

    @hookimpl
    def observe(self, batch: GRPOBatch, step: int) -> None:
        """Record each visited prompt's pass rate and diversity; refresh ``W`` every ``update_every`` steps."""
        c = self.config
        ids, successes, trials = group_outcomes(batch, unit_outcomes(batch.rewards, c.reward_range))
        rate = successes / trials
        self.table.set("pass_rate", ids, rate.cpu())
        if c.tds_weight > 0:
            if batch.completion_ids is None or batch.completion_mask is None:
                raise ValueError("tds_weight > 0 needs the completion token ids; set tds_weight=0 or use an adapter that gives them")
            tds = trajectory_diversity(
                batch.completion_ids, batch.completion_mask, batch.group_index, batch.num_groups,
                c.tds_direction, c.bleu_max_order,
            )
            self.table.set("diversity", ids, tds)
            self.log_metric("trajectory_diversity", tds.mean())
        self.log_metric("outcome_variance", outcome_variance(rate).mean())
        every = c.update_every or self.steps_per_pass
        if step - self.last_refresh >= every:
            self.refresh()
            self.last_refresh = step

    def refresh(self) -> None:
        """``W <- m W + (1 - m) minmax(VPS)`` over every observed prompt."""
        c, col = self.config, self.table.columns
        vps = variance_promotion(col["pass_rate"], col["diversity"], c.ovs_weight, c.tds_weight)
        col["weight"] = c.momentum * col["weight"] + (1 - c.momentum) * min_max_normalise(vps)
        self.log_metric("zero_weight_fraction", (col["weight"] == 0).double().mean())

    def state_dict(self) -> dict:
        return {
            "table": self.table.state_dict(), "pool": self.pool.clone(), "pool_position": self.pool_position,
            "steps_per_pass": self.steps_per_pass, "last_refresh": self.last_refresh,
        }

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.table.load_state_dict(state["table"])
            self.pool = state["pool"].long().clone()
            self.pool_position = int(state["pool_position"])
            self.steps_per_pass = int(state["steps_per_pass"])
            self.last_refresh = int(state["last_refresh"])
