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
from grpo_plugins.batch import STAGE_FIELDS
from grpo_plugins.objectives import whole_group_methods
from grpo_plugins.steps import Steps, last_turn_rows, turn_row_steps
from grpo_plugins.surrogates import weight_token_advantages

from grpo_plugins_verl.capabilities import check_run
from grpo_plugins_verl.extras import TURNS, fit_width
from grpo_plugins_verl.probe import PENDING
from grpo_plugins_verl.runtime import Runtime, get_runtime
from grpo_plugins_verl.settings import REFERENCE_HINT

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


def extra_fields(extras: dict | None, rows: torch.Tensor, response_mask: torch.Tensor) -> dict[str, Any]:
    """``GRPOBatch`` keyword fields from the trainer's per-row ``extras`` (all ``B`` rows), kept to ``rows``."""
    fields: dict[str, Any] = {}
    for name, value in (extras or {}).items():
        if name in (TURNS, PENDING):
            continue  # GRPOBatch.steps: see batch_steps; GRPOBatch.probes: set once the batch has its groups
        if isinstance(value, dict):  # old_log_probs_at: {temperature: (B, T)}
            fields[name] = {key: extra_fields({name: part}, rows, response_mask)[name] for key, part in value.items()}
            continue
        if isinstance(value, torch.Tensor) and name != "reward_weights":
            if value.shape[0] != response_mask.shape[0]:
                raise BatchError(f"the trainer's {name} has {value.shape[0]} rows but verl's batch "
                                 f"{response_mask.shape[0]}; the advantage-stage rows are misaligned")
            value = value.to(response_mask.device)
            fields[name] = (fit_width(value, response_mask.shape[1]) if value.dim() == 2 and name != "reward_components"
                            else value)[rows]
        elif isinstance(value, list):  # prompts, completions
            fields[name] = [value[i] for i in rows.tolist()]
        else:  # reward_names, reward_weights
            fields[name] = value.to(response_mask.device) if isinstance(value, torch.Tensor) else tuple(value)
    return fields


def batch_steps(turns: dict[str, Any] | None, rows: torch.Tensor, mask: torch.Tensor, prompt_ids: torch.Tensor) -> Steps | None:
    """``GRPOBatch.steps`` of the kept ``rows`` ``(N,)``: one step per row (a row is one turn of a trajectory,
    its whole response), from the trainer's :func:`~grpo_plugins_verl.extras.turn_rows` ``turns`` (all ``B``
    rows); None without them."""
    if turns is None:
        return None
    kept = {name: None if value is None else value.to(rows.device)[rows] for name, value in turns.items()}
    return turn_row_steps(mask.gt(0).sum(dim=1), kept["trajectory"], kept["turn"], prompt_ids,
                          reward=kept["reward"], key=kept["key"])


def session_turns_only(composition: Any, batch: GRPOBatch) -> None:
    """Refuse per-token or per-row loss data, and group-wise loss objectives, on a batch whose stage saw only
    each session's last turn: they could not reach (or would misgroup) the session's other turns; such
    methods need ``GRPOBatch.steps``."""
    grouped = composition.implements("loss_objectives") or whole_group_methods(composition)
    if batch.token_weights is not None or batch.row_data or grouped:
        methods = sorted(set(composition.names) - {"grpo"})
        raise CompositionError(
            f"the batch holds multi-turn rows ({{uid}}_{{session}}_{{index}}): without a method that needs "
            f"GRPOBatch.steps the advantage stage sees each session's last turn only (as verl's GRPO), so the "
            f"token weights, row data or loss objectives of {methods} cannot reach the other turns"
        )


def check_required(runtime: Runtime, batch: GRPOBatch, uids: np.ndarray) -> None:
    """Fill ``rows`` if a method requires them, and fail clearly if a required field is missing (the
    capability check refuses such runs at start-up; this guards the trainer's fetch)."""
    composition = runtime.composition
    required = composition.required_fields()
    if "rows" in required and batch.rows is None and runtime.rows_for is not None:
        batch.rows = runtime.rows_for(runtime.dataset_indices(uids))
    missing = sorted(name for name in required - STAGE_FIELDS if getattr(batch, name) is None
                     or getattr(batch, name) == {})
    if missing:
        how = {"ref_log_probs": REFERENCE_HINT + ", and trainer.v1.trainer_mode=grpo_plugins"}
        raise CompositionError("the verl batch lacks " + "; ".join(
            f"{name} (required by {composition.requirers(name)}; "
            f"{how.get(name, 'the grpo_plugins trainer provides it: trainer.v1.trainer_mode=grpo_plugins')})"
            for name in missing
        ))


def skip_batch(runtime: Runtime, token_level_rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch without a response token: as verl's ``grpo`` gives it, zero advantages; the methods skip it
    (no advantage stage, no ``observe``), and the trainer logs ``plugins/skipped_empty_batches``."""
    logger.warning("every completion of the batch is masked: the grpo_plugins methods skip it (zero advantages)")
    runtime.skipped += 1
    runtime.last_batch = runtime.last_rows = None
    zeros = torch.zeros_like(token_level_rewards)
    return zeros, zeros


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
    if not runtime.trainer_attached and not runtime.checked:
        check_run(composition)  # verl's own trainer: what the methods need must not depend on the trainer
        runtime.checked = True
    with torch.no_grad():
        index = np.asarray(index, dtype=object)
        real = ~padding_rows(index, response_mask)
        rows = real.nonzero().flatten().to(token_level_rewards.device)
        mask = response_mask[rows]
        if not bool(mask.any()):  # every completion masked (e.g. verl's rollout rejection sampling)
            return skip_batch(runtime, token_level_rewards)
        turns = (runtime.extras or {}).get(TURNS)
        wants_steps = "steps" in composition.required_fields()
        all_rows, sessions = rows, None
        if turns is not None and not wants_steps and bool((turns["turn"].to(rows.device)[rows] > 0).any()):
            # turn rows and no method reading steps: as verl's multi-trajectory GRPO, the stage scores each
            # session's last turn and every turn of the session gets its advantage
            last, sessions = last_turn_rows(turns["trajectory"].to(rows.device)[rows], turns["turn"].to(rows.device)[rows])
            rows = rows[last]  # sessions in order of first appearance, as verl stacks them
            mask = response_mask[rows]
        uids = index[rows.cpu().numpy()]
        prompt_ids = runtime.ids_for(uids)
        batch = GRPOBatch(
            prompt_ids=prompt_ids,
            rewards=token_level_rewards.sum(dim=-1)[rows],
            completion_mask=mask.to(token_level_rewards.dtype),
            step=runtime.step,
            total_steps=runtime.total_steps,
            parallel=ParallelContext(gathered=True),
            steps=batch_steps((runtime.extras or {}).get(TURNS), rows, mask, prompt_ids) if wants_steps else None,
            **extra_fields(runtime.extras, rows, response_mask),
        )
        pending = (runtime.extras or {}).get(PENDING)
        if pending is not None:  # the old-policy probes over the stage's rows (grpo_plugins_verl.probe)
            batch.probes = pending.for_batch(batch, rows)
        check_required(runtime, batch, uids)
        composition.run_advantage_stage(batch)
        if batch.row_data and composition.has_loss_hooks and not runtime.loss_installed:
            warn_row_data_once(sorted(batch.row_data))
        # Without the installed loss the mask_tokens weights travel inside the advantages (exact for verl's loss).
        per_token = weight_token_advantages(batch.advantages, None if runtime.loss_installed else batch.token_weights)
        per_token = (per_token.unsqueeze(-1) if per_token.dim() == 1 else per_token) * mask
        out = per_token.new_zeros((response_mask.shape[0], response_mask.shape[1]))
        if sessions is None:
            out[rows] = per_token
        else:
            session_turns_only(composition, batch)
            first = per_token[torch.arange(len(rows), device=rows.device), mask.argmax(dim=1)]  # verl's rule
            out[all_rows] = first[sessions].unsqueeze(-1) * response_mask[all_rows]
    runtime.last_batch, runtime.last_rows = batch, rows
    return out, out
