"""DaGRPO: Distinctiveness-aware GRPO (arXiv:2512.06337, Xie et al.).

GRPO's centred reward is a pair average, ``r_i - mean_g(r) = 1/G sum_j (r_i - r_j)``. DaGRPO drops the
pairs a fine-grained score ``s`` cannot tell apart (their gradients conflict on near-identical
responses)::

    m_ij = 1[|s_i - s_j| >= tau],  m_ii = 0
    A_i  = [sum_j m_ij (r_i - r_j) / max(1, sum_j m_ij)] / (std_g(r) + eps)

``std_g`` is the group's population std (``std="unbiased"``: the sample std, as TRL's GRPO); a group
of one is not normalised (its advantage is 0: it has no pair). A response whose every partner is
indistinguishable gets 0. With ``tau = 0`` every pair counts: ``A_i = G/(G-1) (r_i - mean) / (std + eps)``,
GRPO up to the factor ``G/(G-1)`` (the cross-check against GRPO).

Anchors: in a group with no positive response (every reward <= ``failure_reward``) the method injects
the reference solution (``anchor_column``) as one more row of kind ``"anchor"`` with reward
``anchor_reward``, so the group regains a non-zero advantage. An anchor has no fine-grained score
(its reward is given, its reward components are NaN): its pairs always count. A row whose score is NaN
(the score function did not apply) is likewise distinguishable from every other row.

The pairs are formed per group on a ``(G, M, M)`` grid (``M`` the largest group): memory ``N * M``.

Shapes: ``N`` rows, ``G`` groups, ``M`` largest group size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from grpo_plugins import FINITE, NON_NEGATIVE, POSITIVE, Example, GRPOBatch, Method, Needs, hookimpl, option
from grpo_plugins.ops import group_ranks, segment_count, segment_max, segment_std

ANCHOR = "anchor"


def pair_masked_advantages(rewards: torch.Tensor, scores: torch.Tensor, group_index: torch.Tensor, num_groups: int,
                           tau: float, eps: float, unbiased: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``((N,) advantages, (G,) masked pairs per group)`` of DaGRPO (module docstring).

    Args:
        rewards: ``(N,)`` rewards ``r``; scores: ``(N,)`` fine-grained scores ``s`` (NaN: no score, every
        pair kept); group_index: ``(N,)`` in ``[0, G)``; tau: the distinctiveness threshold; eps: added to
        the std; unbiased: sample std instead of the population std.

    A group whose rewards are all equal gets exactly 0 (every ``r_i - r_j`` is 0).
    """
    n = rewards.numel()
    sizes = segment_count(group_index, num_groups)
    width = int(sizes.max()) if n else 0
    position = group_ranks(group_index, num_groups)  # (N,) place of each row in its group
    grid_r = rewards.new_zeros(num_groups, width)
    grid_s = scores.new_full((num_groups, width), float("nan"))
    valid = torch.zeros(num_groups, width, dtype=torch.bool, device=rewards.device)
    grid_r[group_index, position] = rewards
    grid_s[group_index, position] = scores
    valid[group_index, position] = True
    gap = (grid_s.unsqueeze(2) - grid_s.unsqueeze(1)).abs()  # (G, M, M)
    unscored = torch.isnan(grid_s)
    distinct = (gap >= tau) | unscored.unsqueeze(2) | unscored.unsqueeze(1)
    pairs = valid.unsqueeze(2) & valid.unsqueeze(1) & ~torch.eye(width, dtype=torch.bool, device=rewards.device)
    kept = distinct & pairs
    difference = grid_r.unsqueeze(2) - grid_r.unsqueeze(1)  # r_i - r_j
    centred = torch.where(kept, difference, 0.0).sum(-1) / kept.sum(-1).clamp(min=1).to(rewards.dtype)
    std = segment_std(rewards, group_index, num_groups, unbiased=unbiased)
    scale = torch.where(sizes > 1, std + eps, torch.ones_like(std))  # a group of one is not normalised
    advantages = (centred / scale.unsqueeze(1))[group_index, position]
    masked = (pairs & ~distinct).sum(dim=(1, 2)) // 2
    return advantages, masked


def failed_groups(rewards: torch.Tensor, group_index: torch.Tensor, num_groups: int, failure: float) -> torch.Tensor:
    """``(G,)`` bool: groups whose every reward is ``<= failure`` (no positive response)."""
    return segment_max(rewards, group_index, num_groups) <= failure


@dataclass(frozen=True)
class DaGRPOConfig:
    """DaGRPO (https://arxiv.org/abs/2512.06337)."""

    tau: float = option(0.1, "tau: two responses whose fine-grained scores differ by less than this are "
                        "indistinguishable and their pair is dropped (0: every pair counts, GRPO up to G/(G-1)).",
                        paper=0.1, domain=NON_NEGATIVE)
    score: str = option("", "Reward component (a reward function's name) holding the fine-grained score s in [0, 1] "
                        "(give it weight 0 in the trainer's reward weights if it must not enter the reward); '' uses "
                        "the reward itself.")
    eps: float = option(1e-6, "Added to the group's std before dividing.", paper=1e-6, domain=POSITIVE)
    std: Literal["population", "unbiased"] = option(
        "population", "The group std: 'population' (the card's formalisation) or 'unbiased' (the sample std of "
        "TRL's GRPO).", paper="population")
    anchor_column: str = option("solution", "Dataset column holding each prompt's reference solution, injected as an "
                                "anchor into groups without a positive response; '' disables anchors.")
    anchor_reward: float = option(1.0, "The reward an anchor row gets (the card's r = 1).", paper=1.0, domain=FINITE)
    failure_reward: float = option(0.0, "A group whose every reward is at most this has no positive response and gets "
                                   "an anchor (the card's max_i r_i = 0).", paper=0.0, domain=FINITE)

    def __post_init__(self):
        if self.anchor_column and self.anchor_reward <= self.failure_reward:
            raise ValueError(f"anchor_reward={self.anchor_reward} must exceed failure_reward={self.failure_reward}: an "
                             "anchor is the positive response the failed group lacks")


class DaGRPO(Method):
    """DaGRPO: group advantages from the pairs a fine-grained score can tell apart, plus anchors."""

    name = "dagrpo"
    Config = DaGRPOConfig
    paper = "https://arxiv.org/abs/2512.06337"
    plugin_api = ">=1.1,<2"

    @classmethod
    def example(cls) -> Example:
        return Example(config={"score": "reward_1", "tau": 0.3},
                       columns={"solution": lambda pid: f"reference solution {pid}"}, min_group_size=1)

    def disabled_hooks(self) -> set[str]:
        """``inject_rows`` is off without an anchor column (the estimator alone then runs on every trainer)."""
        return set() if self.config.anchor_column else {"inject_rows"}

    def needs(self) -> Needs:
        column = self.config.anchor_column
        if not column:
            return Needs()
        return Needs(columns={column}, batch_fields={"rows"}, why={column: "the reference solution injected as an anchor"})

    @hookimpl
    def inject_rows(self, batch: GRPOBatch) -> list[dict]:
        """The reference solution of every group without a positive response (kind ``"anchor"``)."""
        column = self.config.anchor_column
        if not column:
            return []
        failed = failed_groups(batch.rewards, batch.group_index, batch.num_groups, self.config.failure_reward)
        if not bool(failed.any()):
            return []
        first = torch.full((batch.num_groups,), batch.num_completions, dtype=torch.long, device=batch.group_index.device)
        first = first.scatter_reduce(0, batch.group_index, torch.arange(batch.num_completions, device=first.device),
                                     reduce="amin")
        rows = []
        for group in failed.nonzero().flatten().tolist():
            row = (batch.rows or [{}] * batch.num_completions)[int(first[group])]
            text = row.get(column)
            if not isinstance(text, str) or not text:
                raise ValueError(f"dagrpo: prompt id {int(batch.group_prompt_ids[group])} has no positive response and "
                                 f"its dataset row has no reference solution in column '{column}' (got {text!r:.60})")
            rows.append({"prompt_id": int(batch.group_prompt_ids[group]), "completion": text, "kind": ANCHOR,
                         "reward": self.config.anchor_reward})
        return rows

    def _scores(self, batch: GRPOBatch) -> torch.Tensor:
        if not self.config.score:
            return batch.rewards
        if self.config.score not in batch.reward_names or batch.reward_components is None:
            raise ValueError(f"dagrpo: score={self.config.score!r} is not a reward component of the run "
                             f"(reward functions: {list(batch.reward_names)})")
        return batch.reward_components[:, batch.reward_names.index(self.config.score)].to(batch.rewards.dtype)

    @hookimpl
    def compute_advantages(self, batch: GRPOBatch) -> torch.Tensor:
        advantages, masked = pair_masked_advantages(
            batch.rewards, self._scores(batch), batch.group_index, batch.num_groups, self.config.tau, self.config.eps,
            unbiased=self.config.std == "unbiased")
        sizes = batch.group_sizes
        total = (sizes * (sizes - 1) // 2).sum()
        self.log_metric("masked_pair_fraction", float(masked.sum()) / max(int(total), 1))
        self.log_metric("zero_advantage_fraction", float((advantages == 0).float().mean()))
        return advantages
