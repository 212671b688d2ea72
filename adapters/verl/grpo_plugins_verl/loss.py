"""The loss stage as verl's policy loss ``grpo_plugins`` (``actor.policy_loss.loss_mode``).

verl's ``workers/utils/losses.ppo_loss`` calls the registered policy loss in every actor worker on
one padded micro-batch ``(B, T)`` with ``old_log_prob``, ``log_prob`` (with gradient),
``advantages``, ``response_mask``, ``loss_agg_mode``, the ``ActorConfig`` and
``rollout_is_weights``. This function runs ``policy_surrogate`` (default: verl's ``vanilla``
dual-clip PPO per-token loss, below), ``gate_loss`` and ``loss_terms``, then aggregates the policy
loss and every term with verl's ``agg_loss(..., **config.global_batch_info)``, which carries the
global token / sequence counts and the data-parallel size, so micro-batch and rank splits leave
the loss unchanged. Entropy and KL-loss terms stay with ``ppo_loss`` as in any verl run.
"""

from __future__ import annotations

from typing import Any

import torch
import verl.utils.torch_functional as verl_F
from verl.trainer.ppo.core_algos import agg_loss

from grpo_plugins import LossInputs

from grpo_plugins_verl.runtime import get_runtime


def clip_range(config: Any) -> tuple[float, float, float]:
    """``(clip_low, clip_high, clip_ratio_c)`` read from verl's ``ActorConfig`` as ``vanilla`` reads them."""
    clip_ratio = config.clip_ratio
    low = config.clip_ratio_low if config.clip_ratio_low is not None else clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else clip_ratio
    return low, high, config.get("clip_ratio_c", 3.0)


def vanilla_per_token_loss(inputs: LossInputs, clip_ratio_c: float = 3.0) -> tuple[torch.Tensor, dict[str, float]]:
    """verl's ``vanilla`` per-token loss ``(B, T)`` (before ``agg_loss``) and its clip metrics.

    The same operations in the same order as ``core_algos.compute_policy_loss_vanilla``: clamp the
    log-ratio to [-20, 20], ``max(-A r, -A clip(r))``, and for ``A < 0`` the dual clip at
    ``-A * clip_ratio_c``.
    """
    mask = inputs.mask.bool()
    advantages = inputs.advantages
    negative_approx_kl = torch.clamp(inputs.log_probs - inputs.old_log_probs, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = verl_F.masked_mean(-negative_approx_kl, mask)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - inputs.clip_low, 1 + inputs.clip_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = verl_F.masked_mean(torch.gt(pg_losses2, pg_losses1).float(), mask)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = verl_F.masked_mean(torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float(), mask)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    metrics = {
        "actor/pg_clipfrac": pg_clipfrac.detach().item(),
        "actor/ppo_kl": ppo_kl.detach().item(),
        "actor/pg_clipfrac_lower": pg_clipfrac_lower.detach().item(),
    }
    return pg_losses, metrics


def compute_grpo_plugins_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl policy loss running the enabled methods' loss stage; returns ``(scalar loss, metrics)``.

    Args:
        old_log_prob, log_prob, advantages: ``(B, T)``; ``log_prob`` carries the gradient.
        response_mask: ``(B, T)`` bool.
        loss_agg_mode: verl's aggregation (token-mean, token-sum, seq-mean-token-sum,
            seq-mean-token-mean, seq-mean-token-sum-norm).
        config: verl's ``ActorConfig`` (clip range, ``global_batch_info``).
        rollout_is_weights: ``(B, T)`` rollout-correction weights, multiplied into the policy loss
            as ``vanilla`` does.
    """
    if config is None:
        raise ValueError("the grpo_plugins policy loss needs verl's ActorConfig")
    composition = get_runtime().composition
    clip_low, clip_high, clip_ratio_c = clip_range(config)
    if not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1.0 for dual-clip PPO, got {clip_ratio_c}")
    inputs = LossInputs(
        log_probs=log_prob,
        old_log_probs=old_log_prob,
        advantages=advantages,
        mask=response_mask.to(log_prob.dtype),
        clip_low=clip_low,
        clip_high=clip_high,
    )
    metrics: dict[str, Any] = {}

    def trainer_surrogate(surrogate_inputs: LossInputs) -> torch.Tensor:
        pg_losses, clip_metrics = vanilla_per_token_loss(surrogate_inputs, clip_ratio_c)
        metrics.update(clip_metrics)
        return pg_losses

    parts = composition.run_loss_stage(inputs, trainer_surrogate)
    policy = parts.policy
    if rollout_is_weights is not None:
        policy = policy * rollout_is_weights
    batch_info = dict(config.global_batch_info)
    loss = agg_loss(loss_mat=policy, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **batch_info)
    for name, term in parts.terms.items():
        value = agg_loss(loss_mat=term, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **batch_info)
        loss = loss + value
        metrics[f"plugins/{name}"] = value.detach().item()
    metrics.update(composition.pop_metrics())
    return loss, metrics
