"""SAPO: Soft Adaptive Policy Optimization (Gao, Zheng et al., 2025, arXiv:2511.20347).

SAPO replaces PPO's hard ratio clip with a smooth gate. Each token's surrogate is

    f(r) = (4 / tau) * sigmoid(tau * (r - 1)),        loss = -f(r) * A,

with ``r = exp(log_probs - old_log_probs)`` (log-ratio clamped to ``[-20, 20]``) and
``tau = tau_pos`` where ``A > 0``, ``tau_neg`` otherwise. The gradient is
``-w(r) * r * A * grad log pi`` with the gate weight ``w(r) = f'(r) = 4 s (1 - s)``,
``s = sigmoid(tau (r - 1))``: ``w(1) = 1`` (on-policy SAPO equals GRPO), and ``w`` decays smoothly as
the ratio drifts instead of dropping to zero outside a clip range.

Shapes: ``B`` rows of a loss micro-batch, ``T`` completion tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpo_plugins import POSITIVE, LossInputs, Method, hookimpl, option
from grpo_plugins.ops import masked_mean

LOG_RATIO_BOUND = 20.0
"""verl and the other reference implementations clamp the log-ratio to ``[-20, 20]`` before ``exp``."""


def sapo_temperatures(advantages: torch.Tensor, tau_pos: float, tau_neg: float) -> torch.Tensor:
    """``(B, T)`` temperature per token: ``tau_pos`` where ``advantages > 0``, else ``tau_neg`` (``A = 0`` too)."""
    return torch.where(advantages > 0, advantages.new_tensor(tau_pos), advantages.new_tensor(tau_neg))


def sapo_gate(ratio: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The soft gate ``f(r) = (4 / tau) * sigmoid(tau * (r - 1))``; ``ratio`` and ``tau`` ``(B, T)``. ``f(1) = 2 / tau``."""
    return torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)


def sapo_gate_weight(ratio: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The gradient weight ``w(r) = f'(r) = 4 s (1 - s)``, ``s = sigmoid(tau (r - 1))``; ``(B, T)``, ``w(1) = 1``."""
    s = torch.sigmoid(tau * (ratio - 1.0))
    return 4.0 * s * (1.0 - s)


def _sapo_parts(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    tau_pos: float,
    tau_neg: float,
    mask: torch.Tensor | None,
    log_ratio_bound: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`sapo_token_loss`'s ``(B, T)`` loss, the ``(B, T)`` sigmoid ``s`` it used and the ``(B, T)``
    bool keep-mask (None without a mask): the metrics reuse ``s`` rather than recomputing the gate."""
    log_ratio = log_probs - old_log_probs
    advantages = advantages.expand_as(log_ratio)
    keep = None
    if mask is not None:
        keep = mask > 0
        log_ratio = torch.where(keep, log_ratio, 0.0)  # a select, so padded NaN/inf cannot leak
        advantages = advantages * keep  # finite (checked upstream): 0 off the mask
    ratio = torch.exp(log_ratio.clamp(-log_ratio_bound, log_ratio_bound))
    tau = sapo_temperatures(advantages, tau_pos, tau_neg)
    s = torch.sigmoid(tau * (ratio - 1.0))
    return -(s * (4.0 / tau)) * advantages, s, keep


def sapo_token_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    mask: torch.Tensor | None = None,
    log_ratio_bound: float = LOG_RATIO_BOUND,
) -> torch.Tensor:
    """SAPO's per-token loss ``-f(r) * A`` -> ``(B, T)``.

    Args:
        log_probs: ``(B, T)`` current-policy token log-probs (with gradient).
        old_log_probs: ``(B, T)`` behaviour-policy token log-probs.
        advantages: ``(B, T)`` advantages (or ``(B, 1)``, broadcast).
        tau_pos: temperature of tokens with ``A > 0``.
        tau_neg: temperature of tokens with ``A <= 0``.
        mask: optional ``(B, T)`` loss mask; where it is 0 the loss is 0 and carries no gradient,
            whatever the padded log-probs hold.
        log_ratio_bound: the log-ratio is clamped to ``[-bound, bound]`` before ``exp``.

    The loss is not aggregated: the caller applies the trainer's aggregation (SAPO's paper uses the
    sequence mean of per-sequence token means).
    """
    return _sapo_parts(log_probs, old_log_probs, advantages, tau_pos, tau_neg, mask, log_ratio_bound)[0]


@dataclass(frozen=True)
class SAPOConfig:
    """Soft Adaptive Policy Optimization (Gao, Zheng et al., 2025, arXiv:2511.20347)."""

    tau_pos: float = option(
        1.0, "Gate temperature of tokens with positive advantage (larger = faster decay off-policy).", domain=POSITIVE
    )
    tau_neg: float = option(
        1.05, "Gate temperature of tokens with zero or negative advantage; the paper recommends tau_neg >= tau_pos.",
        domain=POSITIVE,
    )
    log_ratio_bound: float = option(
        LOG_RATIO_BOUND, "The log-ratio is clamped to [-bound, bound] before exp (as verl does), for stability.",
        domain=POSITIVE,
    )


class SAPO(Method):
    """SAPO: a smooth, sign-dependent temperature gate on the token ratio instead of hard clipping."""

    name = "sapo"
    Config = SAPOConfig
    paper = "https://arxiv.org/abs/2511.20347"

    @hookimpl
    def policy_surrogate(self, inputs: LossInputs) -> torch.Tensor:
        """``(B, T)`` per-token SAPO loss; the trainer's clip range is not used."""
        config = self.config
        loss, s, keep = _sapo_parts(
            inputs.log_probs, inputs.old_log_probs, inputs.advantages, config.tau_pos, config.tau_neg,
            inputs.mask, config.log_ratio_bound,
        )
        with torch.no_grad():
            s = s.detach()
            weight = 4.0 * s * (1.0 - s)  # sapo_gate_weight of the same ratios and temperatures
            tokens = keep.to(weight.dtype)
            self.log_metric("gate_weight_mean", masked_mean(weight, tokens))
            self.log_metric("frac_gate_weight_below_half", masked_mean((weight < 0.5).to(weight.dtype), tokens))
        return loss
