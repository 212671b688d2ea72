"""The loss when methods implement ``policy_surrogate``, ``gate_loss`` or ``loss_terms``.

It mirrors ``GRPOTrainer._compute_loss`` (TRL 1.16) for every ``loss_type`` (grpo, bnpo, dr_grpo,
dapo, luspo, cispo, sapo, vespo) at either ``importance_sampling_level``: the same forward pass, the
same ratio (per token, or GSPO's ``(B, 1)`` sequence ratio), TRL's objective for the loss type (from
:mod:`grpo_plugins.surrogates`, VESPO's weights from TRL) as the default ``policy_surrogate``, the
methods' gates and the ``mask_tokens`` weights, then TRL's off-policy sequence mask, top-entropy
mask, vLLM importance ratio and ``beta * KL``, the methods' terms, TRL's aggregation and
gradient-accumulation scaling, the entropy bonus (static or adaptive) and the MoE auxiliary loss.
The token weights multiply the policy loss only; the normaliser is TRL's completion mask. With gates
of 1 and no terms it returns TRL's loss and gradients bit for bit (tested for every combination).
It logs the metrics TRL logs, plus ``plugins/<method>/<term>``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from trl.trainer.utils import nanmax, nanmin

from grpo_plugins import LossInputs
from grpo_plugins.aggregation import aggregate_policy_loss
from grpo_plugins.surrogates import cispo_loss, k3_kl, ppo_clip_loss, sapo_loss, sequence_log_ratio
from grpo_plugins_trl.output_rows import loss_mask

if TYPE_CHECKING:
    from grpo_plugins_trl.trainer import PluginGRPOTrainer

CLIPPED_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # TRL's PPO-clip objective


def trl_surrogate(trainer: "PluginGRPOTrainer", advantages: torch.Tensor, ratio: torch.Tensor,
                  log_probs: torch.Tensor, phi: torch.Tensor | None):
    """TRL's per-token objective for its ``loss_type`` as a ``LossInputs -> (B, T)`` callable (``(B, 1)``
    for a clipped or soft-gated loss at sequence level): PPO-clip with TRL's optional ``delta`` cap,
    SAPO's soft gate, CISPO's clipped-weight REINFORCE, or VESPO's ``-phi A log p``.

    ``advantages`` is TRL's ``(B, 1)`` or ``(B, T)`` tensor, ``ratio`` the ratio node the KL term shares,
    ``log_probs`` the ``(B, T)`` current log-probs and ``phi`` VESPO's ``(B, 1)`` weights, used as TRL
    uses them (so gradients accumulate in TRL's order).
    """
    args, loss_type = trainer.args, trainer.loss_type
    if loss_type == "sapo":
        return lambda inputs: sapo_loss(ratio, advantages, args.sapo_temperature_pos, args.sapo_temperature_neg)
    if loss_type == "cispo":
        return lambda inputs: cispo_loss(ratio, advantages, log_probs, trainer.epsilon_high)
    if loss_type == "vespo":
        return lambda inputs: -phi * advantages * log_probs
    return lambda inputs: ppo_clip_loss(ratio, advantages, trainer.epsilon_low, trainer.epsilon_high, args.delta)


AGGREGATION = {"grpo": "sequence_mean", "sapo": "sequence_mean", "bnpo": "token_mean", "dr_grpo": "max_length",
               "luspo": "sequence_sum", "dapo": "global_tokens", "cispo": "global_tokens", "vespo": "global_tokens"}
"""TRL's ``loss_type`` -> the rule of :func:`grpo_plugins.aggregation.aggregate_policy_loss` it uses."""


def aggregate(trainer: "PluginGRPOTrainer", per_token: torch.Tensor, mask: torch.Tensor, inputs: dict, mode: str):
    """TRL's reduction of a per-token loss: ``(value, divisor)``, the loss the optimiser sees being
    ``value / divisor`` (scaled for gradient accumulation, as TRL's ``loss_is_scaled_for_ga`` requires)
    and ``value`` what TRL logs as ``policy_loss``."""
    if trainer.loss_type not in AGGREGATION:
        raise ValueError(f"loss_type '{trainer.loss_type}' is unknown to the adapter's loss")
    rule = AGGREGATION[trainer.loss_type]
    accumulation = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0
    if rule != "global_tokens":
        return aggregate_policy_loss(per_token, mask, rule, max_length=trainer.max_completion_length), accumulation
    # over the generation batch's tokens, rescaled to one accumulation window
    normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
    if mode == "train":
        normalizer = normalizer * trainer.current_gradient_accumulation_steps / trainer.args.steps_per_generation
    return aggregate_policy_loss(per_token, mask, rule, num_tokens=normalizer), 1.0


def per_token_losses(trainer: "PluginGRPOTrainer", model: Any, inputs: dict):
    """One micro-batch through the methods' loss hooks: ``(per_token_loss, mask, parts, extras)``, where
    ``per_token_loss`` ``(B, T)`` is the policy loss x gates x token weights (x TRL's masks and factors,
    + ``beta * KL`` and the methods' terms), ``mask`` ``(B, T)`` TRL's loss mask (the normaliser),
    ``parts`` the composition's output and ``extras`` what the metrics and the entropy bonus need."""
    from grpo_plugins_trl.trainer import FORWARD_KEYS, ROW_DATA_PREFIX, TOKEN_WEIGHTS_KEY

    args, loss_type = trainer.args, trainer.loss_type
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
    mask = loss_mask(inputs)
    per_token_logps, entropies, aux_loss = trainer._get_per_token_logps_and_entropies(
        model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
        compute_aux_loss=trainer.aux_loss_enabled, **{key: inputs.get(key) for key in FORWARD_KEYS},
    )
    entropy_mask = (
        trainer.get_high_entropy_mask(entropies, mask, 1 - trainer.top_entropy_quantile)
        if trainer.top_entropy_quantile < 1.0
        else None
    )
    advantages = inputs["advantages"]
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old_per_token_logps = inputs.get("old_per_token_logps")
    old_per_token_logps = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
    ref_per_token_logps = inputs.get("ref_per_token_logps")
    off_policy_mask = None
    if trainer.off_policy_mask_threshold is not None:  # DeepSeek-V3.2's off-policy sequence mask, as TRL
        off_policy_mask = trainer.get_off_policy_mask(
            advantages=advantages, per_token_logps=per_token_logps,
            sampling_per_token_logps=inputs.get("sampling_per_token_logps", old_per_token_logps),
            mask=mask, off_policy_threshold=trainer.off_policy_mask_threshold,
        )

    loss_inputs = LossInputs(
        log_probs=per_token_logps,
        old_log_probs=old_per_token_logps,
        advantages=advantages.expand_as(per_token_logps),
        mask=mask.to(per_token_logps.dtype),
        ref_log_probs=ref_per_token_logps,
        entropies=entropies,
        row_data={k[len(ROW_DATA_PREFIX):]: v for k, v in inputs.items() if k.startswith(ROW_DATA_PREFIX)},
        clip_low=trainer.epsilon_low,
        clip_high=trainer.epsilon_high,
        step=trainer.state.global_step,
        group_index=inputs.get("grpo_plugins.group_index"),  # grpo_plugins_trl.objectives
    )
    # Autograd sums the gradients of a shared node in creation order, so build the ratio, the KL and
    # the surrogate in TRL's order: the adapter's loss then matches TRL's gradients bit for bit.
    log_ratio = per_token_logps - old_per_token_logps
    log_weights = log_ratio
    if trainer.importance_sampling_level == "sequence":  # GSPO: the length-normalised sequence ratio, (B, 1)
        log_weights = sequence_log_ratio(log_ratio, mask)
    coef_1 = torch.exp(log_weights)
    per_token_kl = None
    if trainer.beta != 0.0:
        per_token_kl = k3_kl(ref_per_token_logps, per_token_logps)
        if args.use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1
    phi = None
    if loss_type == "vespo":
        phi = trainer.get_gamma_weights(
            advantages=advantages, log_ratio_per_token=log_ratio, mask=mask,
            importance_sampling_ratio=inputs.get("importance_sampling_ratio"), k_pos=args.vespo_k_pos,
            lambda_pos=args.vespo_lambda_pos, k_neg=args.vespo_k_neg, lambda_neg=args.vespo_lambda_neg,
        )
    surrogate = trl_surrogate(trainer, advantages, coef_1, per_token_logps, phi)
    parts = trainer.composition.run_loss_stage(loss_inputs, surrogate)
    per_token_loss = parts.policy
    if TOKEN_WEIGHTS_KEY in inputs:  # mask_tokens weights: they scale the policy loss, never the normaliser
        per_token_loss = per_token_loss * inputs[TOKEN_WEIGHTS_KEY]
    if off_policy_mask is not None:  # trainer-side factors TRL applies whatever the objective is
        per_token_loss = per_token_loss * off_policy_mask
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    if trainer.use_vllm and trainer.vllm_importance_sampling_correction and loss_type != "vespo":
        per_token_loss = per_token_loss * inputs["importance_sampling_ratio"]
    if per_token_kl is not None:
        per_token_loss = per_token_loss + trainer.beta * per_token_kl
    for term in parts.terms.values():
        per_token_loss = per_token_loss + term
    if args.delta is not None and loss_type in CLIPPED_LOSSES:  # TRL's clip metrics see the capped ratio
        coef_1 = torch.clamp(coef_1, max=args.delta)
    return per_token_loss, mask, parts, (entropies, entropy_mask, coef_1, advantages, per_token_kl, phi, aux_loss)


def plugin_loss(trainer: "PluginGRPOTrainer", model: Any, inputs: dict) -> torch.Tensor:
    """The scalar loss of one micro-batch with the methods' loss hooks applied."""
    mode = "train" if trainer.model.training else "eval"
    per_token_loss, mask, parts, extras = per_token_losses(trainer, model, inputs)
    entropies, entropy_mask, coef_1, advantages, per_token_kl, phi, aux_loss = extras
    value, divisor = aggregate(trainer, per_token_loss, mask, inputs, mode)
    loss = value / divisor
    if parts.objectives:  # loss_objectives: each term with its own normaliser
        from grpo_plugins_trl.objectives import objective_loss

        loss = loss + objective_loss(trainer, parts, mask, inputs, mode)
    accumulation = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0
    if trainer._entropy_bonus_enabled:
        loss = _entropy_bonus(trainer, loss, value.detach(), entropies, mask, entropy_mask, mode)
    if trainer.aux_loss_enabled:
        loss = loss + trainer.router_aux_loss_coef * aux_loss / accumulation
        trainer._metrics[mode]["aux_loss"].append(trainer.accelerator.gather_for_metrics(aux_loss).mean().item())
    _log_metrics(trainer, mode, mask, entropies, coef_1, advantages, per_token_kl, phi)
    for name in sorted(parts.terms):  # same order on every rank
        term_value, term_divisor = aggregate(trainer, parts.terms[name].detach(), mask, inputs, mode)
        value_before_accumulation = term_value / term_divisor * accumulation
        method, term = name.split("/", 1)
        logged = trainer.accelerator.gather(value_before_accumulation).mean().item()
        trainer._metrics[mode][f"plugins/{method}/{term}"].append(logged)
    trainer._pop_plugin_metrics(mode)
    return loss


def _entropy_bonus(trainer, loss, policy_loss, entropies, mask, entropy_mask, mode) -> torch.Tensor:
    """TRL's entropy bonus ``loss - coef * H`` (H the mean entropy of the tokens the policy loss acts
    on, scaled for gradient accumulation) and, with ``use_adaptive_entropy``, its coefficient's
    controller (Skywork-OR1), operation by operation as ``GRPOTrainer._compute_loss`` runs them."""
    args, metrics = trainer.args, trainer._metrics[mode]
    effective_mask = mask if entropy_mask is None else mask * entropy_mask
    accumulation_factor = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0
    entropy_loss = (entropies * effective_mask).sum() / effective_mask.sum().clamp(min=1.0) / accumulation_factor
    coef = trainer.entropy_coef
    if trainer.use_adaptive_entropy and not trainer._last_world_entropy <= args.entropy_target:
        coef = 0.0
    loss = loss - coef * entropy_loss
    metrics["policy_loss"].append(trainer.accelerator.gather(policy_loss).nanmean().item())
    if trainer.use_adaptive_entropy and mode == "train":
        stats = torch.stack([(entropies * effective_mask).sum(), effective_mask.sum()]).detach()
        window = trainer._entropy_window_stats
        trainer._entropy_window_stats = stats if window is None else window + stats
        if trainer.accelerator.sync_gradients:
            totals = trainer.accelerator.reduce(trainer._entropy_window_stats, reduction="sum")
            world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
            if world_entropy <= args.entropy_target:
                trainer.entropy_coef = min(trainer.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
            else:
                trainer.entropy_coef = max(trainer.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
            trainer._last_world_entropy = world_entropy
            trainer._entropy_window_stats = None
    if mode == "train" and trainer.accelerator.sync_gradients:
        metrics["entropy_coef"].append(trainer.entropy_coef)
    return loss


def _log_metrics(trainer, mode, mask, entropies, coef_1, advantages, per_token_kl, phi) -> None:
    """TRL's loss metrics: ``kl``, ``entropy`` and the objective's own (``clip_ratio/*``,
    ``cispo_clip_ratio``, ``vespo/phi_seq_mean``); ``(B, 1)`` sequence-level values count once per row."""
    accelerator, metrics = trainer.accelerator, trainer._metrics[mode]

    def masked_seq_mean(x):
        return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

    def global_masked_mean(x):
        if x.shape[1] == 1:
            local = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device)])
        else:
            local = torch.stack([(x * mask).sum(), mask.sum().float()])
        totals = accelerator.reduce(local, reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    if per_token_kl is not None:
        metrics["kl"].append(global_masked_mean(per_token_kl))
    metrics["entropy"].append(global_masked_mean(entropies))
    if trainer.loss_type in CLIPPED_LOSSES:
        is_low = (coef_1 < 1 - trainer.epsilon_low) & (advantages < 0)
        is_high = (coef_1 > 1 + trainer.epsilon_high) & (advantages > 0)
        metrics["clip_ratio/low_mean"].append(global_masked_mean(is_low.float()))
        metrics["clip_ratio/high_mean"].append(global_masked_mean(is_high.float()))
        metrics["clip_ratio/region_mean"].append(global_masked_mean((is_low | is_high).float()))
        metrics["clip_ratio/low_min"].append(nanmin(accelerator.gather(masked_seq_mean(is_low.float()))).item())
        metrics["clip_ratio/high_max"].append(nanmax(accelerator.gather(masked_seq_mean(is_high.float()))).item())
    elif trainer.loss_type == "cispo":
        is_clipped = (coef_1 > trainer.epsilon_high) & (advantages > 0)
        metrics["cispo_clip_ratio"].append(global_masked_mean(is_clipped.float()))
    elif trainer.loss_type == "vespo":
        metrics["vespo/phi_seq_mean"].append(global_masked_mean(phi))


def surrogate_problems(args: Any, composition: Any) -> list[str]:
    """The TRL settings under which a ``policy_surrogate`` method would silently drop the objective the
    user chose: the method's surrogate is written per token on ``LossInputs``, so it cannot honour
    GSPO's sequence ratio, and it would replace CISPO's and VESPO's importance-weighted REINFORCE."""
    providers = [name for name in composition.providers("policy_surrogate") if name != "grpo"]
    if not providers:
        return []
    problems = []
    if args.importance_sampling_level != "token":
        problems.append(f"importance_sampling_level='{args.importance_sampling_level}' (a policy_surrogate sees "
                        "per-token ratios; the sequence-level ratio would be dropped)")
    if args.loss_type in ("cispo", "vespo"):
        problems.append(f"loss_type='{args.loss_type}' (its objective is an importance-weighted log-likelihood, not "
                        "a ratio surrogate; the method would replace it)")
    return [f"method '{name}' implements policy_surrogate, which cannot run with {problem}; use "
            "importance_sampling_level='token' and a ratio loss_type (grpo, bnpo, dr_grpo, dapo, luspo, sapo)"
            for name in providers for problem in problems]
