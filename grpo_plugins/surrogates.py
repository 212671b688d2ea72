"""Per-token policy objectives shared by the adapters and the methods: one implementation each.

Shapes: ``B`` rows of a loss micro-batch, ``T`` completion tokens. ``ratio`` is the importance ratio
``pi / pi_old`` ``(B, T)`` (or ``(B, 1)`` at sequence level); ``advantages`` broadcast against it. The
arithmetic follows TRL 1.16's ``GRPOTrainer._compute_loss`` operation by operation, so an adapter that
uses these functions reproduces TRL's loss and gradients bit for bit.
"""

from __future__ import annotations

import torch


def sequence_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's length-normalised sequence log-ratio ``(B, 1)``: ``sum_t m_t log r_t / max(sum_t m_t, 1)``
    from the per-token log-ratios ``(B, T)`` and the loss mask ``(B, T)`` (TRL's
    ``importance_sampling_level="sequence"``)."""
    return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)


def bounded_log_ratio(log_probs: torch.Tensor, old_log_probs: torch.Tensor, bound: float = 20.0) -> torch.Tensor:
    """``clamp(log pi - log pi_old, -bound, bound)`` ``(B, T)``: verl's log-ratio, bounded so that its
    exponential stays finite."""
    return torch.clamp(log_probs - old_log_probs, min=-bound, max=bound)


def k3_kl(ref_log_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Schulman's ``k3`` estimate of ``KL(pi || pi_ref)`` per token ``(B, T)``:
    ``exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1`` (>= 0; TRL's ``beta`` term)."""
    return torch.exp(ref_log_probs - log_probs) - (ref_log_probs - log_probs) - 1


def ppo_clip_loss(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
    ratio_cap: float | None = None,
) -> torch.Tensor:
    """PPO's clipped per-token loss ``-min(r A, clip(r, 1 - clip_low, 1 + clip_high) A)``.

    ``ratio_cap`` (TRL's ``delta``, two-sided clipping) caps the unclipped ratio: ``r <- min(r, cap)``.
    Returns the broadcast shape of ``ratio`` and ``advantages``.
    """
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    if ratio_cap is not None:
        ratio = torch.clamp(ratio, max=ratio_cap)
    return -torch.min(ratio * advantages, clipped * advantages)


def dual_clip_loss(
    ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float, dual_clip: float
) -> torch.Tensor:
    """Dual-clip PPO (Ye et al., 2019; verl's ``vanilla`` loss with ``clip_ratio_c``): PPO's clipped loss
    ``l`` (:func:`ppo_clip_loss`), and ``min(l, -dual_clip * A)`` where ``A < 0``, which bounds the loss of a
    negative-advantage token whose ratio has grown large."""
    loss = ppo_clip_loss(ratio, advantages, clip_low, clip_high)
    return torch.where(advantages < 0, torch.minimum(loss, -advantages * dual_clip), loss)


def sapo_soft_coefficient(ratio: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """SAPO's soft gate ``f(r) = sigmoid(tau (r - 1)) * 4 / tau`` (``f(1) = 2 / tau``, ``f'(1) = 1``)."""
    return torch.sigmoid(temperature * (ratio - 1)) * 4 / temperature


def sapo_loss(
    ratio: torch.Tensor, advantages: torch.Tensor, temperature_pos: float, temperature_neg: float
) -> torch.Tensor:
    """SAPO's per-token loss ``-f(r) A`` with ``tau = temperature_pos`` where ``A > 0``, else ``temperature_neg``."""
    temperature = torch.where(advantages > 0, temperature_pos, temperature_neg)
    return -sapo_soft_coefficient(ratio, temperature) * advantages


def cispo_loss(
    ratio: torch.Tensor, advantages: torch.Tensor, log_probs: torch.Tensor, ratio_max: float
) -> torch.Tensor:
    """CISPO's per-token loss (MiniMax-M1) ``-sg(min(r, ratio_max)) A log pi``: REINFORCE weighted by the
    clipped, detached importance ratio, so every token keeps a gradient (TRL uses ``epsilon_high`` as
    ``ratio_max``). ``log_probs`` ``(B, T)`` carries the gradient."""
    clamped = torch.clamp(ratio, max=ratio_max).detach()
    return -clamped * advantages * log_probs


REPLACED_POLICY_LOSS = ("its objective replaces the policy loss and the advantages, so the other method's token "
                        "weights, gates or advantage changes would have no effect")
"""The reason a method whose ``loss_objectives`` replace the policy loss gives for ``Needs(excludes_hooks=...)``."""


def replaced_policy_loss(inputs) -> torch.Tensor:
    """``(B, T)`` zeros on the graph of ``inputs.log_probs``: the ``policy_surrogate`` of a method whose
    ``loss_objectives`` replace the policy loss (the trainer's surrogate must not run, and the loss must
    keep a gradient path through every parameter even where the objective's is zero)."""
    return 0.0 * torch.where(inputs.mask > 0, inputs.log_probs, 0.0)


def weight_token_advantages(advantages: torch.Tensor, token_weights: torch.Tensor | None) -> torch.Tensor:
    """Advantages ``(N,)`` or ``(N, T)`` times ``mask_tokens`` weights ``(N, T)`` -> ``(N, T)``.

    A token weight multiplies the token's policy-loss term and never its normaliser. Every built-in
    per-token objective (PPO-clip, SAPO, CISPO, ...) is positively homogeneous in ``A`` once the sign
    of ``A`` is fixed (``loss(w A) = w loss(A)`` for ``w >= 0``), so the weights can travel inside the
    advantages whenever the trainer's own loss runs. Without weights the advantages are returned as
    they are.
    """
    if token_weights is None:
        return advantages
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    return advantages * token_weights.to(advantages.dtype)
