"""Rank-GRPO: rank-level advantages and item-level ratios for list outputs (arXiv:2510.20150,
"Rank-GRPO: Training LLM-based Conversational Recommender Systems with Reinforcement Learning";
code: yaochenzhu/Rank-GRPO, a TRL-based ``rank_grpo_trainer.py``).

A completion is a ranked list of ``K`` items, one per line. Each rank is its own decision::

    rel[i, k]  in {0, 1}: item k of completion i is in the prompt's ground truth
    r[i, k]    = rel[i, k]                                   ('exp_inf', default)
               = sum_{j >= k} rel[i, j] / log2(j + 2)        ('log_decay', tail DCG, ranks from 0)
    A[i, k]    = (r[i, k] - mean_g r[., k]) / (std_g r[., k] + 1e-4)   per rank, unbiased std (or centred only)
    w[i, k]    = exp(mean_{t in item k} (log pi - log pi_old))         item-level ratio
    loss_t     = -min(w A, clip(w, 1 - eps_low, 1 + eps_high) A)       A, w of the token's item

A separator token ends an item only when item text came after the previous separator (an empty
line ends nothing, as in the parsing of the items). Tokens after item ``K`` (overflow) share one
extra bin with advantage ``-length_penalty``; the last token gets ``+length_penalty`` when the list
has exactly ``K`` items and ``-length_penalty`` when it has fewer (the paper's length shaping); it is
not an overflow token unless the list has more than ``K`` items. The paper adds TRL's ``beta = 1e-3``
k3 KL and aggregates per sequence (``loss_type='grpo'``). With a single item the ratio is GSPO's
sequence ratio.

Shapes: ``N`` completions, ``K`` ranks, ``B`` rows of a loss micro-batch, ``T`` tokens, ``V`` vocabulary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

from grpo_plugins import NON_NEGATIVE, Example, GRPOBatch, LossInputs, Method, Needs, Range, RunContext, hookimpl, option
from grpo_plugins.ops import constant_groups, segment_mean, segment_sum
from grpo_plugins.surrogates import ppo_clip_loss

NUMBERING = re.compile(r"^\s*(?:\d+[.)]|[-*])\s*")


def parse_items(text: str, separator: str) -> list[str]:
    """The list items of a completion: lines (``separator``) without their numbering, lower-cased, empty ones dropped."""
    return [NUMBERING.sub("", line).strip().lower() for line in text.split(separator) if NUMBERING.sub("", line).strip()]


def relevance(completions: Sequence[Any], targets: Sequence[Any], separator: str,
              num_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, K)`` float 0/1: item ``k`` of completion ``i`` is one of its prompt's ``targets`` (a list of
    items, or a string of ``separator``-separated items); and ``(N,)`` the number of items listed."""
    rel = torch.zeros(len(completions), num_items)
    counts = torch.zeros(len(completions), dtype=torch.long)
    for i, (text, target) in enumerate(zip(completions, targets)):  # text parsing: one completion at a time
        wanted = set(parse_items(target, separator) if isinstance(target, str) else (str(t).strip().lower() for t in target))
        items = parse_items(text if isinstance(text, str) else text[-1]["content"], separator)
        counts[i] = len(items)
        rel[i, : min(len(items), num_items)] = torch.tensor([float(x in wanted) for x in items[:num_items]])
    return rel, counts


def rank_rewards(rel: torch.Tensor, kind: str) -> torch.Tensor:
    """``(N, K)`` per-rank rewards: ``rel`` ('exp_inf') or the tail DCG ``sum_{j>=k} rel_j / log2(j + 2)``."""
    if kind == "exp_inf":
        return rel
    discount = 1.0 / torch.log2(torch.arange(rel.shape[1], dtype=rel.dtype) + 2)
    return torch.flip(torch.cumsum(torch.flip(rel * discount, [1]), 1), [1])


def rank_advantages(rewards: torch.Tensor, index: torch.Tensor, num_groups: int, eps: float = 1e-4,
                    scale: bool = True) -> torch.Tensor:
    """``(N, K)`` per-rank group z-scores (unbiased std; ``scale=False``: centred only); a rank whose
    rewards are equal in a group gets 0."""
    counts = segment_sum(torch.ones_like(rewards[:, 0]), index, num_groups)
    centred = rewards - segment_mean(rewards, index, num_groups).index_select(0, index)
    variance = segment_sum(centred.square(), index, num_groups) / (counts - 1).clamp(min=1)[:, None]
    advantages = centred / (variance.sqrt().index_select(0, index) + eps) if scale else centred
    same = torch.stack([constant_groups(rewards[:, k], index, num_groups) for k in range(rewards.shape[1])], 1)
    return torch.where(same.index_select(0, index), 0.0, advantages)


def item_index(separator_tokens: torch.Tensor, content_tokens: torch.Tensor, mask: torch.Tensor,
               num_items: int) -> torch.Tensor:
    """``(N, T)`` int64 item of each token: the items ended before it, capped at ``K`` (overflow).

    ``separator_tokens``, ``content_tokens``: ``(N, T)`` bool, the token's text holds the separator / item
    text. A separator ends an item only when item text came after the previous separator (itself
    included, e.g. a token ``")\\n"``), so an empty line ends nothing, as in ``parse_items``; the tokens
    of an empty line belong to the next item.
    """
    real = mask > 0
    separators = separator_tokens & real
    text_so_far = torch.cumsum((content_tokens & real).long(), 1)  # (N, T) non-decreasing
    at_separators = torch.where(separators, text_so_far, 0).cummax(1).values
    at_previous = torch.cat([torch.zeros_like(at_separators[:, :1]), at_separators[:, :-1]], 1)
    ends = (separators & (text_so_far > at_previous)).long()
    return (torch.cumsum(ends, 1) - ends).clamp(max=num_items)


def item_ratios(log_ratio: torch.Tensor, items: torch.Tensor, mask: torch.Tensor, num_items: int) -> torch.Tensor:
    """``(B, T)`` ``exp`` of the mean log-ratio over each token's item (``K + 1`` bins per row)."""
    keep = mask > 0
    bins = (torch.arange(items.shape[0], device=items.device)[:, None] * (num_items + 1) + items).view(-1)
    size = items.shape[0] * (num_items + 1)
    values = torch.where(keep, log_ratio, 0.0).reshape(-1)
    sums = values.new_zeros(size).index_add(0, bins, values)
    counts = values.new_zeros(size).index_add(0, bins, keep.reshape(-1).to(values.dtype))
    return torch.exp((sums / counts.clamp(min=1)).index_select(0, bins).view_as(log_ratio))


@dataclass(frozen=True)
class RankGRPOConfig:
    """Rank-GRPO (https://arxiv.org/abs/2510.20150)."""

    num_items: int = option(20, "K, the items of the list (ranks).", paper=20, domain=Range(1, 10_000))
    target_column: str = option("groundtruth", "Dataset column with the relevant items (a list, or a string "
                                "of separated items).", paper="groundtruth")
    separator: str = option("\n", "Text that ends an item (one item per line).", paper="\n")
    separator_token_id: int | None = option(None, "The token id that ends an item; None: every token whose text "
                                            "holds `separator` (found with the tokenizer at setup).", paper=None,
                                            domain=Range(0, 10**9))
    reward: Literal["exp_inf", "log_decay"] = option("exp_inf", "Per-rank reward (module docstring).", paper="exp_inf")
    epsilon_low: float = option(0.06, "Lower clip range of the item ratio.", paper=0.06, domain=Range(0.0, 1.0))
    epsilon_high: float = option(0.08, "Upper clip range of the item ratio.", paper=0.08, domain=NON_NEGATIVE)
    length_penalty: float = option(0.1, "Length shaping: overflow tokens -p; last token +p with exactly K items, "
                                   "-p with fewer (0: off).", paper=0.1, domain=NON_NEGATIVE)
    scale_rewards: bool = option(True, "Divide each rank's centred rewards by their group std + 1e-4 (False: "
                                 "centre only).", paper=True)


class RankGRPO(Method):
    """Rank-GRPO: per-rank rewards and advantages and item-level clipped ratios for ranked lists."""

    name = "rank_grpo"
    Config = RankGRPOConfig
    paper = "https://arxiv.org/abs/2510.20150"
    plugin_api = ">=1.1,<2"

    @classmethod
    def example(cls) -> Example:
        items = ["alien", "heat", "up", "jaws"]
        return Example(config={"num_items": 2, "target_column": "groundtruth", "separator": " ", "separator_token_id": 3},
                       columns={"groundtruth": lambda pid: items[pid % 4: pid % 4 + 2]},
                       completions=("alien heat", "up jaws", "jaws alien heat", "heat"), min_group_size=1,
                       nonzero_constant_groups="its advantages come from each rank's relevance to the ground truth, "
                       "not from the trainer's scalar rewards (and length shaping adds +-length_penalty)")

    def needs(self) -> Needs:
        return Needs(batch_fields={"completions", "rows", "completion_ids"}, loss_fields={"row_data"},
                     columns={self.config.target_column},
                     features={"method_setup"} if self.config.separator_token_id is None else set(),
                     why={"method_setup": "the tokenizer, to find the tokens that end an item"})

    @hookimpl
    def setup(self, context: RunContext) -> None:
        """Finds the vocabulary's tokens whose text holds the separator and those whose text holds item
        text (not only separators, white space or list numbering); ``(V,)`` bool each."""
        tokenizer = context.tokenizer
        if tokenizer is None or self.config.separator_token_id is not None:
            self.separator_ids = self.content_ids = None
            return
        separator = self.config.separator
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        self.separator_ids = torch.tensor([separator in t for t in texts])
        self.content_ids = torch.tensor([bool(NUMBERING.sub("", t.replace(separator, " ")).strip()) for t in texts])

    def _token_kinds(self, completion_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, T)`` bool twice: the token's text holds the separator; it holds item text."""
        if self.config.separator_token_id is not None:
            separators = completion_ids == self.config.separator_token_id
            return separators, ~separators
        table = getattr(self, "separator_ids", None)
        if table is None:
            raise ValueError("rank_grpo: no tokenizer was given at setup, so item boundaries are unknown")
        ids = completion_ids.clamp(0, table.numel() - 1)
        return table.to(completion_ids.device)[ids], self.content_ids.to(completion_ids.device)[ids]

    @hookimpl
    def compute_advantages(self, batch: GRPOBatch) -> torch.Tensor:
        """``(N, T)`` per-token advantages: the rank advantage of the token's item (plus length shaping)."""
        cfg, mask = self.config, batch.token_mask
        targets = [row[cfg.target_column] for row in batch.rows]
        rel, counts = relevance(batch.completions, targets, cfg.separator, cfg.num_items)
        adv = rank_advantages(rank_rewards(rel.to(mask.device), cfg.reward), batch.group_index, batch.num_groups,
                              scale=cfg.scale_rewards)
        items = item_index(*self._token_kinds(batch.completion_ids), mask, cfg.num_items)
        padded = torch.cat([adv, torch.full_like(adv[:, :1], -cfg.length_penalty)], 1)  # the overflow bin
        token_adv = torch.gather(padded, 1, items)
        last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & (mask > 0)
        counts = counts.to(mask.device)
        # the end of a list of at most K items (e.g. EOS after the K-th item's separator) is no overflow
        token_adv = torch.where(last & (items == cfg.num_items) & (counts <= cfg.num_items)[:, None], 0.0, token_adv)
        bonus = torch.where(counts == cfg.num_items, cfg.length_penalty, torch.where(counts < cfg.num_items, -cfg.length_penalty, 0.0))
        batch.row_data["rank_grpo_item"] = items
        self.log_metric("hit_rate", rel.mean())
        return torch.where(mask > 0, token_adv + torch.where(last, bonus[:, None], 0.0), 0.0)

    @hookimpl
    def policy_surrogate(self, inputs: LossInputs) -> torch.Tensor:
        """``(B, T)`` clipped loss with the item-level ratio of each token's item."""
        cfg = self.config
        items = inputs.row_data["rank_grpo_item"].long()
        ratio = item_ratios(inputs.log_ratio, items, inputs.mask, cfg.num_items)
        outside = (ratio < 1 - cfg.epsilon_low) | (ratio > 1 + cfg.epsilon_high)
        real = inputs.mask > 0
        self.log_metric("item_clip_frac", (outside & real).sum() / real.sum().clamp(min=1))
        return ppo_clip_loss(ratio, inputs.advantages, cfg.epsilon_low, cfg.epsilon_high)
