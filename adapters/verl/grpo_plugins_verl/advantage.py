"""The advantage stage as verl's advantage estimator ``grpo_plugins``.

verl (``ray_trainer.compute_advantage``) calls a registered estimator on the driver with the whole
training batch, so every statistic a method takes here is batch-global by construction
(``ParallelContext(gathered=True)``). Shapes: ``B`` rows (completions plus verl's padding rows),
``T`` response tokens.

Mapping: ``token_level_rewards`` summed over tokens -> ``GRPOBatch.rewards`` ``(N,)``;
``response_mask`` -> ``completion_mask``; ``index`` (verl's per-prompt ``uid``) -> ``prompt_ids``
(dataset indices when the ``grpo_plugins`` trainer submitted the prompts, dense ids otherwise).
The stage's advantages are broadcast to tokens and multiplied by the response mask (as verl's
``grpo`` does) and by the ``mask_tokens`` weights, so a token weight scales that token's loss
exactly under verl's clipped loss. Rows verl adds to even out the batch (uid ``pad...``, no
response token) are left out of the batch and get advantage 0.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from grpo_plugins import BatchError, CompositionError, GRPOBatch, ParallelContext

from grpo_plugins_verl.runtime import Runtime, get_runtime
from grpo_plugins_verl.settings import REFERENCE_HINT, TRAINER_HOOKS

logger = logging.getLogger("grpo_plugins_verl")
_WARNED: set[tuple[str, ...]] = set()

PAD_UID_PREFIX = "pad"
"""verl's ``upsample_batch_to_divisible_size`` gives its synthetic rows the uid ``pad<hex>``."""


def padding_rows(index: np.ndarray, response_mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: verl's synthetic padding rows (uid ``pad...`` and no response token)."""
    uids = np.asarray(index).astype(str)
    named = torch.as_tensor(np.char.startswith(uids, PAD_UID_PREFIX), dtype=torch.bool)
    return named & ~response_mask.bool().any(dim=-1).cpu()


def warn_row_data_once(keys: list[str]) -> None:
    """Say (once per set of keys) that ``row_data`` stays on the driver: a loss hook reading it fails there."""
    if tuple(keys) not in _WARNED:
        _WARNED.add(tuple(keys))
        logger.warning(
            "methods attached row_data %s, but verl hands a policy loss only advantages, log-probs and the response "
            "mask: LossInputs.row_data is empty in the loss, and a loss hook that needs these entries will raise",
            keys,
        )


def fit_width(value: torch.Tensor, width: int) -> torch.Tensor:
    """``(B, T')`` right-padded response tensor cut or zero-padded to ``(B, width)`` (only padding changes)."""
    if value.shape[1] >= width:
        return value[:, :width]
    return torch.nn.functional.pad(value, (0, width - value.shape[1]))


def extra_fields(extras: dict | None, rows: torch.Tensor, response_mask: torch.Tensor) -> dict[str, Any]:
    """``GRPOBatch`` keyword fields from the trainer's per-row ``extras`` (all ``B`` rows), kept to ``rows``."""
    if not extras:
        return {}
    fields: dict[str, Any] = {}
    for name in ("completion_ids", "old_log_probs", "ref_log_probs"):
        if name in extras:
            value = extras[name]
            if value.shape[0] != response_mask.shape[0]:
                raise BatchError(
                    f"the trainer's {name} has {value.shape[0]} rows but verl's batch {response_mask.shape[0]}; "
                    "the advantage-stage rows are misaligned"
                )
            fields[name] = fit_width(value.to(response_mask.device), response_mask.shape[1])[rows]
    if "reward_components" in extras:
        components = extras["reward_components"]
        if components.shape[0] != response_mask.shape[0]:
            raise BatchError(
                f"the trainer's reward components have {components.shape[0]} rows, verl's batch {response_mask.shape[0]}"
            )
        fields["reward_components"] = components.to(response_mask.device)[rows]
        fields["reward_names"] = tuple(extras["reward_names"])
        if "reward_weights" in extras:
            fields["reward_weights"] = extras["reward_weights"].to(response_mask.device)
    for name in ("prompts", "completions"):
        if name in extras:
            fields[name] = [extras[name][i] for i in rows.tolist()]
    return fields


def check_required(runtime: Runtime, batch: GRPOBatch) -> None:
    """Fill ``rows`` if a method requires them, and fail clearly if a required field is missing."""
    composition = runtime.composition
    required = composition.required_fields()
    if "rows" in required and batch.rows is None and runtime.rows_for is not None:
        batch.rows = runtime.rows_for(batch.prompt_ids.tolist())
    missing = sorted(name for name in required if getattr(batch, name) is None)
    if not missing:
        return
    details = []
    for name in missing:
        if name == "ref_log_probs":
            how = REFERENCE_HINT + ", and trainer.v1.trainer_mode=grpo_plugins"
        else:
            how = "the grpo_plugins trainer provides it: trainer.v1.trainer_mode=grpo_plugins"
        details.append(f"{name} (required by {composition.requirers(name)}; {how})")
    raise CompositionError("the verl batch lacks " + "; ".join(details))


def compute_grpo_plugins_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray | None = None,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl advantage estimator running the enabled methods' advantage stage.

    Args:
        token_level_rewards: ``(B, T)`` rewards (verl puts the score on the last response token).
        response_mask: ``(B, T)`` 1 on response tokens.
        index: ``(B,)`` verl ``uid`` of each row's prompt group (np object array).
        config: ``config.algorithm`` (a ``DictConfig``); may hold ``grpo_plugins`` and
            ``norm_adv_by_std_in_grpo``.

    Returns:
        ``(advantages, returns)``, both the same ``(B, T)`` tensor, as verl's outcome estimators return.
    """
    if index is None:
        raise BatchError("the grpo_plugins estimator needs verl's 'uid' column to form prompt groups")
    runtime = get_runtime(config)
    composition = runtime.composition
    unserved = [hook for hook in TRAINER_HOOKS if composition.implements(hook)]
    if unserved and not runtime.trainer_attached:
        methods = sorted({m for hook in unserved for m in composition.providers(hook)})
        raise CompositionError(
            f"methods {methods} implement {unserved}, which only the grpo_plugins trainer runs: set "
            "trainer.v1.trainer_mode=grpo_plugins (python -m grpo_plugins_verl.main does)"
        )
    with torch.no_grad():
        index = np.asarray(index, dtype=object)
        real = ~padding_rows(index, response_mask)
        rows = real.nonzero().flatten().to(token_level_rewards.device)
        mask = response_mask[rows]
        batch = GRPOBatch(
            prompt_ids=runtime.ids_for(index[real.numpy()]),
            rewards=token_level_rewards.sum(dim=-1)[rows],
            completion_mask=mask.to(token_level_rewards.dtype),
            step=runtime.step,
            total_steps=runtime.total_steps,
            parallel=ParallelContext(gathered=True),
            **extra_fields(runtime.extras, rows, response_mask),
        )
        check_required(runtime, batch)
        composition.run_advantage_stage(batch)
        if batch.row_data and composition.has_loss_hooks:
            warn_row_data_once(sorted(batch.row_data))
        advantages = batch.advantages
        per_token = advantages.unsqueeze(-1) * mask if advantages.dim() == 1 else advantages * mask
        if batch.token_weights is not None:
            per_token = per_token * batch.token_weights
        out = per_token.new_zeros((response_mask.shape[0], response_mask.shape[1]))
        out[rows] = per_token
    runtime.last_batch = batch
    return out, out
