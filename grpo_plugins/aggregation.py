"""Policy-loss aggregations: how a per-token loss ``(B, T)`` becomes one micro-batch's scalar.

The trainers differ in how they normalise the policy loss; an adapter that computes the loss itself
(because methods gate it or add terms) names the rule its trainer uses and passes the trainer's counts,
so the numbers stay the trainer's, operation for operation. ``mask`` ``(B, T)`` is 1 on real completion
tokens; padded positions hold zeros (the core zeroes them before any hook sees them).

=====================  ===============================================  ==========================
rule                   value                                            TRL ``loss_type``
=====================  ===============================================  ==========================
``sequence_mean``      mean over rows of each row's token mean          grpo, sapo
``token_mean``         sum over tokens / this micro-batch's tokens      bnpo
``max_length``         sum over tokens / (B * max_completion_length)    dr_grpo
``sequence_sum``       mean over rows of each row's token sum           luspo
``global_tokens``      sum over tokens / ``num_tokens`` (given)         dapo, cispo, vespo
=====================  ===============================================  ==========================
"""

from __future__ import annotations

from typing import Literal

import torch

Rule = Literal["sequence_mean", "token_mean", "max_length", "sequence_sum", "global_tokens"]


def aggregate_policy_loss(
    per_token: torch.Tensor, mask: torch.Tensor, rule: Rule, *, num_tokens: torch.Tensor | float | None = None,
    max_length: int | None = None,
) -> torch.Tensor:
    """``per_token`` ``(B, T)`` reduced by ``rule`` (see the module table) -> scalar.

    ``num_tokens``: the ``global_tokens`` divisor (the trainer's token count for this micro-batch's share
    of the step); ``max_length``: the ``max_length`` rule's ``T_max``.
    """
    masked = per_token * mask
    if rule == "sequence_mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if rule == "token_mean":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if rule == "max_length":
        return masked.sum() / (per_token.size(0) * max_length)
    if rule == "sequence_sum":
        return masked.sum(-1).mean()
    if rule == "global_tokens":
        return masked.sum() / num_tokens
    raise ValueError(f"unknown loss aggregation rule {rule!r}")
