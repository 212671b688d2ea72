"""The loss when methods implement ``policy_surrogate``, ``gate_loss`` or ``loss_terms``.

It mirrors ``GRPOTrainer._compute_loss`` (TRL 1.16) for the losses ``grpo``, ``bnpo``, ``dr_grpo``,
``dapo`` and ``sapo`` at token level: the same forward pass, TRL's surrogate (clipped, or SAPO's soft
gate) as the default ``policy_surrogate``, the methods' gates and terms, ``beta * KL``, and TRL's aggregation and
gradient-accumulation scaling for the loss type. With gates of 1 and no terms it returns TRL's loss
bit for bit (tested). It logs the metrics TRL logs, plus ``plugins/<method>/<term>``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from trl.trainer.utils import nanmax, nanmin

from grpo_plugins import LossInputs

if TYPE_CHECKING:
    from grpo_plugins_trl.trainer import PluginGRPOTrainer


def trl_clip_surrogate(trainer: "PluginGRPOTrainer", advantages: torch.Tensor, ratio: torch.Tensor):
    """TRL's per-token policy loss for its ``loss_type``, as a ``LossInputs -> (B, T)`` callable: the
    PPO-clip loss ``-min(r A, clip(r, 1-eps_low, 1+eps_high) A)`` (with TRL's optional ``delta`` cap on
    ``r``), or for ``sapo`` TRL's soft gate ``-sigmoid(tau (r - 1)) * 4 / tau * A`` (``tau`` the
    positive- or negative-advantage temperature).

    ``advantages`` is TRL's ``(B, 1)`` or ``(B, T)`` tensor and ``ratio`` the ``(B, T)`` ratio node
    the KL term shares, used as TRL uses them (so gradients accumulate in TRL's order).
    """

    def surrogate(inputs: LossInputs) -> torch.Tensor:
        if trainer.loss_type == "sapo":
            args = trainer.args
            temperatures = torch.where(advantages > 0, args.sapo_temperature_pos, args.sapo_temperature_neg)
            return -(torch.sigmoid(temperatures * (ratio - 1)) * 4 / temperatures) * advantages
        coef_1 = ratio
        coef_2 = torch.clamp(coef_1, 1 - trainer.epsilon_low, 1 + trainer.epsilon_high)
        if trainer.args.delta is not None:
            coef_1 = torch.clamp(coef_1, max=trainer.args.delta)
        return -torch.min(coef_1 * advantages, coef_2 * advantages)

    return surrogate


def aggregate(trainer: "PluginGRPOTrainer", per_token: torch.Tensor, mask: torch.Tensor, inputs: dict, mode: str) -> torch.Tensor:
    """TRL's reduction of a ``(B, T)`` per-token loss to the scalar the optimiser sees (already scaled
    for gradient accumulation, as TRL's ``loss_is_scaled_for_ga`` requires)."""
    accumulation = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0
    loss_type = trainer.loss_type
    if loss_type in ("grpo", "sapo"):  # TRL aggregates both as the mean over rows of each row's token mean
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
    if loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.size(0) * trainer.max_completion_length) / accumulation
    if loss_type == "dapo":
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * trainer.current_gradient_accumulation_steps / trainer.args.steps_per_generation
        return (per_token * mask).sum() / normalizer
    raise ValueError(f"loss_type '{loss_type}' is not supported with loss hooks")


def plugin_loss(trainer: "PluginGRPOTrainer", model: Any, inputs: dict) -> torch.Tensor:
    """The scalar loss of one micro-batch with the methods' loss hooks applied."""
    from grpo_plugins_trl.trainer import ROW_DATA_PREFIX, TOKEN_WEIGHTS_KEY

    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    per_token_logps, entropies, aux_loss = trainer._get_per_token_logps_and_entropies(
        model,
        input_ids,
        attention_mask,
        completion_ids.size(1),
        compute_entropy=True,
        compute_aux_loss=trainer.aux_loss_enabled,
        pixel_values=inputs.get("pixel_values"),
        image_grid_thw=inputs.get("image_grid_thw"),
        num_images=inputs.get("num_images"),
        pixel_attention_mask=inputs.get("pixel_attention_mask"),
        spatial_shapes=inputs.get("spatial_shapes"),
        num_tiles=inputs.get("num_tiles"),
        image_sizes=inputs.get("image_sizes"),
        token_type_ids=inputs.get("token_type_ids"),
        mm_token_type_ids=inputs.get("mm_token_type_ids"),
        image_position_ids=inputs.get("image_position_ids"),
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
    mode = "train" if trainer.model.training else "eval"

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
    )
    # Autograd sums the gradients of a shared node in creation order, so build the ratio, the KL and
    # the surrogate in TRL's order: the adapter's loss then matches TRL's gradients bit for bit.
    coef_1 = torch.exp(per_token_logps - old_per_token_logps)
    per_token_kl = None
    if trainer.beta != 0.0:
        per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
        if trainer.args.use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1
    parts = trainer.composition.run_loss_stage(loss_inputs, trl_clip_surrogate(trainer, advantages, coef_1))
    # Trainer-side factors TRL applies to its per-token loss whatever the surrogate is.
    per_token_loss = parts.policy
    if TOKEN_WEIGHTS_KEY in inputs:  # non-binary mask_tokens weights
        per_token_loss = per_token_loss * inputs[TOKEN_WEIGHTS_KEY]
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    if trainer.use_vllm and trainer.vllm_importance_sampling_correction:
        per_token_loss = per_token_loss * inputs["importance_sampling_ratio"]
    if per_token_kl is not None:
        per_token_loss = per_token_loss + trainer.beta * per_token_kl
    for term in parts.terms.values():
        per_token_loss = per_token_loss + term
    loss = aggregate(trainer, per_token_loss, mask, inputs, mode)

    if trainer.aux_loss_enabled:
        normalizer = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0
        loss = loss + trainer.router_aux_loss_coef * aux_loss / normalizer
        trainer._metrics[mode]["aux_loss"].append(trainer.accelerator.gather_for_metrics(aux_loss).mean().item())

    if trainer.args.delta is not None:  # TRL's clip metrics see the capped ratio
        coef_1 = torch.clamp(coef_1, max=trainer.args.delta)
    _log_metrics(trainer, mode, mask, entropies, coef_1, advantages, per_token_kl)
    accumulation = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0
    for name in sorted(parts.terms):  # same order on every rank
        value = aggregate(trainer, parts.terms[name].detach(), mask, inputs, mode) * accumulation
        method, term = name.split("/", 1)
        trainer._metrics[mode][f"plugins/{method}/{term}"].append(trainer.accelerator.gather(value).mean().item())
    trainer._pop_plugin_metrics(mode)
    return loss


def _log_metrics(trainer, mode, mask, entropies, coef_1, advantages, per_token_kl) -> None:
    """TRL's loss metrics: ``kl``, ``entropy`` and (clipped losses) the ``clip_ratio/*`` family."""
    accelerator, metrics = trainer.accelerator, trainer._metrics[mode]

    def masked_seq_mean(x):
        return (x * mask).sum(-1) / mask.sum(-1)

    def global_masked_mean(x):
        totals = accelerator.reduce(torch.stack([(x * mask).sum(), mask.sum().float()]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    if per_token_kl is not None:
        metrics["kl"].append(global_masked_mean(per_token_kl))
    metrics["entropy"].append(global_masked_mean(entropies))
    if trainer.loss_type == "sapo":  # TRL logs no clip ratios for its soft gate
        return
    is_low = (coef_1 < 1 - trainer.epsilon_low) & (advantages < 0)
    is_high = (coef_1 > 1 + trainer.epsilon_high) & (advantages > 0)
    metrics["clip_ratio/low_mean"].append(global_masked_mean(is_low.float()))
    metrics["clip_ratio/high_mean"].append(global_masked_mean(is_high.float()))
    metrics["clip_ratio/region_mean"].append(global_masked_mean((is_low | is_high).float()))
    metrics["clip_ratio/low_min"].append(nanmin(accelerator.gather(masked_seq_mean(is_low.float()))).item())
    metrics["clip_ratio/high_max"].append(nanmax(accelerator.gather(masked_seq_mean(is_high.float()))).item())
