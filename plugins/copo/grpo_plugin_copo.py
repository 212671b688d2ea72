"""COPO: Consistency-Aware Policy Optimization (arXiv:2508.04138).

When every completion of a prompt gets the same reward, GRPO's group advantage is 0 and the prompt
teaches nothing. COPO adds a *global* advantage that compares prompts with each other, and blends
it with the local (group) one according to how consistent the group's final answers are:

    local      A_loc_i = (r_i - mean_g r) / (std_g r + eps)          unbiased std; 0 for a constant group
    global     c_g = mean_g r                                         the prompt's consistency reward
               A_glob_g = (c_g - mean_G c) / (std_G c + eps)          over the batch's prompts, unbiased std
    entropy    H_g = - sum_a p_a log p_a                               over the distinct final answers a of g
    blend      w_g = sigmoid(k (H_g - b))
               A_i = w_i A_loc_i + (1 - w_i) A_glob_g(i)
               w_i = w_g ('soft'), or w_g [r_i != 0] ('soft_with_zero': a completion with reward 0
               learns from the global advantage only)

Diverse groups (high answer entropy) learn mostly from the local signal; consistent groups (all
right or all wrong) mostly from the global one, so uniform groups keep a non-zero advantage.

The answers come from a per-completion key: the reward value (the binary fallback), the completion
text, or a user function ``module:function`` mapping a completion's text to its final answer.

Shapes: ``N`` completions, ``G`` groups. Advantages are ``(N,)``. The batch statistics of ``c``
are global across data-parallel ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from grpo_plugins import NON_NEGATIVE, POSITIVE, GRPOBatch, Method, ParallelContext, hookimpl, option
from grpo_plugins import Example
from grpo_plugins.completion_keys import completion_classes, extractor_for
from grpo_plugins.ops import (
    global_all_equal, global_mean_std, group_normalize, segment_count, segment_max, segment_mean, segment_min, segment_sum,
)


def local_advantages(rewards: torch.Tensor, index: torch.Tensor, num_groups: int, epsilon: float = 1e-6) -> torch.Tensor:
    """GRPO's ``(r - mean_g) / (std_g + epsilon)`` -> ``(N,)``; exactly 0 in a constant group (a group of one included)."""
    normalized = group_normalize(rewards, index, num_groups, epsilon=epsilon)
    constant = segment_max(rewards, index, num_groups) == segment_min(rewards, index, num_groups)
    return torch.where(constant.index_select(0, index), torch.zeros_like(normalized), normalized)


def global_advantages(
    consistency: torch.Tensor, parallel: ParallelContext | None = None, epsilon: float = 1e-6
) -> torch.Tensor:
    """``(c_g - mean c) / (std c + epsilon)`` over the batch's prompts -> ``(G,)``; 0 when every ``c_g`` is equal.

    ``consistency``: ``(G,)`` one value per prompt (each prompt counts once, whatever its group size).
    """
    parallel = parallel or ParallelContext()
    mean, std = global_mean_std(consistency, parallel)
    normalized = (consistency - mean) / (std + epsilon)
    return torch.where(global_all_equal(consistency, parallel), torch.zeros_like(normalized), normalized)


def answer_entropy(answer_ids: torch.Tensor, index: torch.Tensor, num_groups: int, base: float = 2.0) -> torch.Tensor:
    """Entropy of the distinct answers within each group -> ``(G,)``, in units of ``log(base)``.

    ``answer_ids``: ``(N,)`` int64 answer class of each completion (equal ids = equal answers);
    ``index``: ``(N,)`` group of each completion. ``H_g = -sum_a p_a log p_a`` with ``p_a`` the
    share of the group's completions giving answer ``a``; a group with one answer has ``H = 0``.
    """
    width = int(answer_ids.max()) + 1 if answer_ids.numel() else 1
    pairs, counts = torch.unique(index * width + answer_ids, return_counts=True)
    pair_group = pairs // width
    share = counts.double() / segment_count(index, num_groups).double().index_select(0, pair_group)
    return segment_sum(-share * torch.log(share), pair_group, num_groups) / math.log(base)


def blend_weights(entropy: torch.Tensor, sharpness: float, threshold: float) -> torch.Tensor:
    """``w_g = sigmoid(k (H_g - b))`` -> ``(G,)``: the weight of the local advantage."""
    return torch.sigmoid(sharpness * (entropy - threshold))


def copo_advantages(
    rewards: torch.Tensor,
    answer_ids: torch.Tensor,
    index: torch.Tensor,
    num_groups: int,
    parallel: ParallelContext | None = None,
    sharpness: float = 5.0,
    threshold: float = 1.0,
    entropy_base: float = 2.0,
    blend: str = "soft_with_zero",
    epsilon: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """COPO advantages -> ``((N,) advantages, (N,) local weights w_i)``.

    ``rewards``: ``(N,)`` finite; ``answer_ids``: ``(N,)`` int64 answer classes; ``index``: ``(N,)``
    group ids in ``[0, G)``. See the module docstring for the formula.
    """
    local = local_advantages(rewards, index, num_groups, epsilon)
    # float64: a sum of float32 rewards of similar magnitude is then exact in any order, so groups with the
    # same rewards in another order get the very same c_g (a float32 residue would be divided by std c + eps)
    consistency = segment_mean(rewards.double(), index, num_groups)
    glob = global_advantages(consistency, parallel, epsilon).to(rewards.dtype).index_select(0, index)
    weights = blend_weights(answer_entropy(answer_ids, index, num_groups, entropy_base), sharpness, threshold)
    weights = weights.to(rewards.dtype).index_select(0, index)
    if blend == "soft_with_zero":
        weights = torch.where(rewards != 0, weights, torch.zeros_like(weights))
    return weights * local + (1 - weights) * glob, weights


# ----------------------------------------------------------------- answers of the completions


def answer_classes(batch: GRPOBatch, source: str, extractor: Callable[[str], Any] | None = None) -> torch.Tensor:
    """``(N,)`` int64 answer class of each completion (equal answers share a class); see
    :func:`grpo_plugins.completion_keys.completion_classes` (``source``: ``"reward"``, ``"completion"`` or
    ``"module:function"``)."""
    return completion_classes(batch, source, extractor, setting="answers")


@dataclass(frozen=True)
class COPOConfig:
    """COPO (arXiv:2508.04138): entropy-driven blend of the local (group) and global (prompt) advantages."""

    sharpness: float = option(5.0, "k in w = sigmoid(k (H - b)) (the code's actor.k; the released run uses 5).",
                              paper=5.0, domain=POSITIVE)
    threshold: float = option(1.0, "b in w = sigmoid(k (H - b)), in entropy_unit (the released run: 1 bit).",
                              paper=1.0, domain=NON_NEGATIVE)
    entropy_unit: Literal["bits", "nats"] = option("bits", "Unit of the answer entropy H (the code uses log2).",
                                                   paper="bits")
    blend: Literal["soft_with_zero", "soft"] = option(
        "soft_with_zero", "'soft_with_zero' (the released run's global_flg): completions with reward 0 use only "
        "the global advantage, the others w A_loc + (1 - w) A_glob; 'soft': every completion blends.",
        paper="soft_with_zero",
    )
    answers: str = option(
        "reward", "Where a completion's final answer comes from: 'reward' (its reward value; the binary "
        "fallback), 'completion' (its text), or 'module:function' (a function of the text, e.g. a boxed-answer "
        "extractor). The paper compares extracted final answers: 'completion' is that when a completion is only its "
        "answer, 'module:function' otherwise.", paper="completion",
    )
    epsilon: float = option(1e-6, "Added to the group std and to the batch std of c.", paper=1e-6, domain=NON_NEGATIVE)

    def __post_init__(self):
        if self.answers not in ("reward", "completion") and ":" not in self.answers:
            raise ValueError(f"answers must be 'reward', 'completion' or 'module:function', got {self.answers!r}")


class COPO(Method):
    """COPO: blend local and global advantages by answer entropy, so uniform groups still learn."""

    name = "copo"
    Config = COPOConfig
    paper = "https://arxiv.org/abs/2508.04138"
    plugin_api = ">=1.3,<2"  # grpo_plugins.ops.global_all_equal

    @classmethod
    def example(cls) -> Example:
        """The conformance suite's example run (see grpo_plugins.example)."""
        return Example(
            min_group_size=1,
            nonzero_constant_groups="the global advantage compares a uniform group's mean reward with the other "
            "prompts' (the point of COPO)",
        )

    def __init__(self, config: Any = None):
        super().__init__(config)
        self._extractor = extractor_for(self.config.answers)

    def requires(self) -> set[str]:
        return set() if self.config.answers == "reward" else {"completions"}

    @hookimpl
    def compute_advantages(self, batch: GRPOBatch) -> torch.Tensor:
        """``(N,)`` COPO advantages from ``batch.rewards`` and the completions' answers."""
        cfg = self.config
        answers = answer_classes(batch, cfg.answers, self._extractor)
        # at least float32, float64 kept: a float32 copy would merge rewards that differ below its precision
        rewards = batch.rewards.to(torch.promote_types(batch.rewards.dtype, torch.float32))
        advantages, weights = copo_advantages(
            rewards, answers, batch.group_index, batch.num_groups, batch.parallel,
            cfg.sharpness, cfg.threshold, 2.0 if cfg.entropy_unit == "bits" else math.e, cfg.blend, cfg.epsilon,
        )
        self.log_metric("mean_local_weight", weights.mean())
        self.log_metric("frac_zero_advantage", (advantages == 0).float().mean())
        return advantages
