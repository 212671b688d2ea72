"""The loss stage as verl's policy loss ``grpo_plugins`` (``actor.policy_loss.loss_mode``).

verl's ``workers/utils/losses.ppo_loss`` calls the registered policy loss in every actor worker on
one padded micro-batch ``(B, T)`` with ``old_log_prob``, ``log_prob`` (with gradient),
``advantages``, ``response_mask``, ``loss_agg_mode``, the ``ActorConfig`` and
``rollout_is_weights``. This function runs ``policy_surrogate`` (default: verl's ``vanilla``
dual-clip PPO per-token loss, below), ``gate_loss``, ``loss_terms`` and ``loss_objectives``, then
aggregates the policy loss and every term with verl's ``agg_loss(..., **config.global_batch_info)``,
which carries the global token / sequence counts and the data-parallel size, so micro-batch and rank
splits leave the loss unchanged; the ``loss_objectives`` terms are reduced with their own normaliser
over the same counts (:func:`grpo_plugins_verl.objectives.objective_loss`). Entropy and KL-loss terms
stay with ``ppo_loss`` as in any verl run.
"""

from __future__ import annotations

from typing import Any

import torch
import verl.utils.torch_functional as verl_F
from verl.trainer.ppo.core_algos import agg_loss

from grpo_plugins import LossInputs, LossTerm, RunContext
from grpo_plugins.objectives import whole_group_methods
from grpo_plugins.surrogates import bounded_log_ratio, dual_clip_loss, ppo_clip_loss

from grpo_plugins_verl.extras import fit_width
from grpo_plugins_verl.objectives import GROUP_INDEX, GROUP_SIZE, check_micro_batch, objective_loss, set_up_worker
from grpo_plugins_verl.runtime import get_runtime


def clip_range(config: Any) -> tuple[float, float, float]:
    """``(clip_low, clip_high, clip_ratio_c)`` read from verl's ``ActorConfig`` as ``vanilla`` reads them."""
    clip_ratio = config.clip_ratio
    low = config.clip_ratio_low if config.clip_ratio_low is not None else clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else clip_ratio
    return low, high, config.get("clip_ratio_c", 3.0)


def vanilla_per_token_loss(inputs: LossInputs, clip_ratio_c: float = 3.0) -> tuple[torch.Tensor, dict[str, float]]:
    """verl's ``vanilla`` per-token loss ``(B, T)`` (before ``agg_loss``) and its clip fractions.

    Dual-clip PPO (:func:`grpo_plugins.surrogates.dual_clip_loss`) on the ratio ``exp(clamp(log r, -20, 20))``:
    the values and gradients of ``core_algos.compute_policy_loss_vanilla``, bit for bit (tested).
    """
    mask, advantages = inputs.mask.bool(), inputs.advantages
    ratio = torch.exp(bounded_log_ratio(inputs.log_probs, inputs.old_log_probs))
    losses = dual_clip_loss(ratio, advantages, inputs.clip_low, inputs.clip_high, clip_ratio_c)
    with torch.no_grad():
        clipped = ppo_clip_loss(ratio, advantages, inputs.clip_low, inputs.clip_high)
        lower = -advantages * clip_ratio_c
        hit = -advantages * torch.clamp(ratio, 1 - inputs.clip_low, 1 + inputs.clip_high) > -advantages * ratio
        hit_lower = (clipped > lower).float() * (advantages < 0).float()
        metrics = {"actor/pg_clipfrac": verl_F.masked_mean(hit.float(), mask).item(),
                   "actor/pg_clipfrac_lower": verl_F.masked_mean(hit_lower, mask).item()}
    return losses, metrics


ROW_PREFIX = "grpo_plugins_row__"
"""TransferQueue field prefix of the ``row_data`` the trainer carries to the loss (one field per key)."""
TOKEN_WEIGHTS = "grpo_plugins_token_weights"
"""TransferQueue field of the ``mask_tokens`` weights the trainer carries to the loss."""
STEP = "grpo_plugins_step"
"""Non-tensor entry of the actor batch holding the optimiser steps taken so far."""
CARRIED = (TOKEN_WEIGHTS, GROUP_INDEX, GROUP_SIZE)
"""TransferQueue fields (besides ``row_data``) the trainer carries to the loss with the rows."""


def loss_stage(inputs: LossInputs, clip_ratio_c: float
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, LossTerm], dict[str, float]]:
    """The methods' loss stage on one micro-batch: ``(policy (B, T), {term: (B, T)}, {objective: LossTerm},
    clip metrics)``.

    The default surrogate is verl's ``vanilla``; a micro-batch without a response token gets it alone
    (the methods skip it, as they skip a batch whose completions are all masked). ``actor/ppo_kl`` is
    always logged; the clip fractions are ``vanilla``'s, or 0 when a method replaces the surrogate (as
    verl's ``sapo`` logs).
    """
    if not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1.0 for dual-clip PPO, got {clip_ratio_c}")
    metrics: dict[str, float] = {"actor/pg_clipfrac": 0.0, "actor/pg_clipfrac_lower": 0.0}

    def trainer_surrogate(surrogate_inputs: LossInputs) -> torch.Tensor:
        pg_losses, clip_metrics = vanilla_per_token_loss(surrogate_inputs, clip_ratio_c)
        metrics.update(clip_metrics)
        return pg_losses

    if not bool(inputs.mask.any()):  # no response token: nothing to learn from, the methods skip it
        policy, terms, objectives = trainer_surrogate(inputs), {}, {}
    else:
        parts = get_runtime().composition.run_loss_stage(inputs, trainer_surrogate)
        policy, terms, objectives = parts.policy, parts.terms, parts.objectives
    with torch.no_grad():
        log_ratio = bounded_log_ratio(inputs.log_probs, inputs.old_log_probs)
        metrics["actor/ppo_kl"] = verl_F.masked_mean(-log_ratio, inputs.mask.bool()).item()
    return policy, terms, objectives, metrics


def compute_grpo_plugins_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl policy loss (``loss_mode=grpo_plugins``) running the methods' loss stage -> ``(loss, metrics)``.

    The path without the ``grpo_plugins`` trainer: verl's ``ppo_loss`` calls it with only these
    inputs (no ``row_data``, entropies, reference log-probs, step or groups; ``loss_objectives`` groups
    are taken to have ``rollout_n`` rows). A term's logged value is its micro-batch mean, so verl's
    mean over micro-batches reports the term's size.

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
    clip_low, clip_high, clip_ratio_c = clip_range(config)
    inputs = LossInputs(log_probs=log_prob, old_log_probs=old_log_prob, advantages=advantages,
                        mask=response_mask.to(log_prob.dtype), clip_low=clip_low, clip_high=clip_high)
    policy, terms, objectives, metrics = loss_stage(inputs, clip_ratio_c)
    if rollout_is_weights is not None:
        policy = policy * rollout_is_weights
    batch_info = dict(config.global_batch_info)
    loss = agg_loss(loss_mat=policy, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **batch_info)
    for name, term in terms.items():
        loss = loss + agg_loss(loss_mat=term, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **batch_info)
        local = agg_loss(loss_mat=term.detach(), loss_mask=response_mask, loss_agg_mode=loss_agg_mode)
        metrics[f"plugins/{name}"] = local.item()
    if objectives:
        total, _ = objective_loss(objectives, inputs.mask, batch_info, None, int(config.rollout_n))
        loss = loss + total
        _, local = objective_loss(objectives, inputs.mask, {}, None, int(config.rollout_n))
        metrics.update({f"plugins/{name}": float(value.detach()) for name, value in local.items()})
    metrics.update(get_runtime().composition.pop_metrics())
    return loss, metrics


def grpo_plugins_ppo_loss(config: Any, model_output: dict, data: Any, dp_group: Any = None,
                          context: RunContext | None = None):
    """verl's actor loss (``workers/utils/losses.ppo_loss``) with the methods' loss stage, installed on
    every actor worker by the ``grpo_plugins`` trainer (``actor_rollout_wg.set_loss_fn``).

    Everything ``ppo_loss`` does (global batch normalisation, rollout-correction weights, entropy
    bonus, KL loss, metrics), plus what the loss hooks get on TRL: ``row_data`` (carried through
    TransferQueue with the rows, so it follows verl's shuffling and micro-batching), reference
    log-probs, token entropies and the step. ``mask_tokens`` weights multiply the per-token policy
    loss; the normaliser stays verl's response mask. Loss terms are logged like ``actor/pg_loss``
    (summed over micro-batches of globally normalised values: the step's value). ``loss_objectives``
    terms get each row's group from the trainer (:mod:`grpo_plugins_verl.objectives`), and ``context``
    (the driver's ``setup`` context) runs ``setup`` in this worker at its first call.
    """
    from verl.utils import tensordict_utils as tu
    from verl.utils.metric import AggregationType, Metric
    from verl.workers.utils.losses import kl_penalty
    from verl.workers.utils.padding import no_padding_2_padding

    log_prob = no_padding_2_padding(model_output["log_probs"], data)
    entropy = model_output.get("entropy", None)
    entropy = None if entropy is None else no_padding_2_padding(entropy, data)
    info = config.global_batch_info
    info["dp_size"], info["batch_num_tokens"] = data["dp_size"], data["batch_num_tokens"]
    info["global_batch_size"], info["loss_scale_factor"] = data["global_batch_size"], config.loss_scale_factor
    summed = data["dp_size"] > 1 or any(info[k] is not None for k in ("batch_num_tokens", "global_batch_size", "loss_scale_factor"))
    aggregation = AggregationType.SUM if summed else AggregationType.MEAN
    runtime = get_runtime()
    set_up_worker(runtime, context, data["dp_size"], dp_group)
    step = int(tu.get_non_tensor_data(data, STEP, default=0) or 0)
    keys = [k for k in data.keys() if isinstance(k, str) and (k.startswith(ROW_PREFIX) or k in CARRIED)]
    fields = ["response_mask", "old_log_probs", "advantages"]
    fields += [k for k in ("rollout_is_weights", "ref_log_prob") if k in data.keys()]
    tensors = data.select(*fields).to_padded_tensor()
    width = log_prob.shape[1]
    mask = tensors["response_mask"].to(bool)
    extra = {k: fit_width(data[k], width).to(log_prob.device) for k in keys}
    ref = tensors.get("ref_log_prob", None)
    clip_low, clip_high, clip_ratio_c = clip_range(config)
    group_index, group_size = extra.get(GROUP_INDEX), extra.get(GROUP_SIZE)
    whole = whole_group_methods(runtime.composition)
    if whole and group_index is not None:
        check_micro_batch(group_index, group_size, whole)
    inputs = LossInputs(
        log_probs=log_prob, old_log_probs=tensors["old_log_probs"], advantages=tensors["advantages"],
        mask=mask.to(log_prob.dtype), ref_log_probs=ref, entropies=None if entropy is None else entropy.detach(),
        row_data={k[len(ROW_PREFIX):]: v for k, v in extra.items() if k.startswith(ROW_PREFIX)},
        clip_low=clip_low, clip_high=clip_high, step=step, group_index=group_index,
    )
    policy, terms, objectives, clip_metrics = loss_stage(inputs, clip_ratio_c)
    if TOKEN_WEIGHTS in extra:
        policy = policy * extra[TOKEN_WEIGHTS]
    if "rollout_is_weights" in tensors.keys():
        policy = policy * tensors["rollout_is_weights"]
    mode = config.loss_agg_mode
    pg_loss = agg_loss(loss_mat=policy, loss_mask=mask, loss_agg_mode=mode, **info)
    metrics: dict[str, Any] = Metric.from_dict(clip_metrics, aggregation=AggregationType.MEAN)
    metrics["actor/pg_loss"] = Metric(value=pg_loss, aggregation=aggregation)
    loss = pg_loss
    for name, term in terms.items():
        value = agg_loss(loss_mat=term, loss_mask=mask, loss_agg_mode=mode, **info)
        loss = loss + value
        metrics[f"plugins/{name}"] = Metric(value=value, aggregation=aggregation)
    total, shares = objective_loss(objectives, inputs.mask, info, group_size, int(config.rollout_n))
    if shares:
        loss = loss + total
    for name, share in shares.items():  # "<method>/<term>"
        metrics[f"plugins/{name}"] = Metric(value=share.detach(), aggregation=aggregation)
    if entropy is not None:
        entropy_loss = agg_loss(loss_mat=entropy, loss_mask=mask, loss_agg_mode=mode, **info)
        loss = loss - config.entropy_coeff * entropy_loss
        metrics["actor/entropy_loss"] = Metric(value=entropy_loss, aggregation=aggregation)
    if config.use_kl_loss:
        kl = agg_loss(loss_mat=kl_penalty(logprob=log_prob, ref_logprob=ref, kl_penalty=config.kl_loss_type),
                      loss_mask=mask, loss_agg_mode=mode, **info)
        loss = loss + kl * config.kl_loss_coef
        metrics["kl_loss"] = Metric(value=kl, aggregation=aggregation)
        metrics["kl_coef"] = Metric(value=config.kl_loss_coef, aggregation=AggregationType.MEAN)
    metrics.update(Metric.from_dict(runtime.composition.pop_metrics(), aggregation=AggregationType.MEAN))
    return loss, metrics
