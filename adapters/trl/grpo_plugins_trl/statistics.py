"""Old-policy statistics at the advantage stage for :class:`~grpo_plugins_trl.PluginGRPOTrainer`: the batch
fields ``old_entropies`` and ``old_log_probs_at`` (``docs/design.md``, section 4).

What runs depends only on what the enabled methods declare; with none of them, nothing here runs (no
extra forward, TRL's code path unchanged):

- **Entropies only, and TRL computes old log-probs itself** (``gradient_accumulation_steps`` not a
  multiple of ``steps_per_generation * num_iterations``, or vLLM's importance-sampling correction): TRL's
  own old-log-prob pass is asked for the entropies it computes anyway (its fused LM head returns them;
  TRL drops them unless asked). No extra forward.
- **Entropies only, fully on-policy run**: one extra no-grad forward per generation batch, exactly TRL's
  old-log-prob pass (``_get_per_token_logps_and_entropies`` with ``compute_entropy=True``, same
  micro-batch size and temperature ``args.temperature``).
- **Log-probs at other temperatures** (``Needs.temperatures``): one extra no-grad forward through the
  model's own (unfused) head, in chunks of ``per_device_train_batch_size`` rows, keeping the logits of
  the completion positions only (``(rows, T, V)`` float32 per chunk); each temperature ``tau`` gives
  ``log_softmax(logits / tau)`` at the sampled token. When entropies are also needed and TRL does not run
  its old pass, they come from the same logits at ``args.temperature`` (one forward for both).

Every field is gathered over the ranks to the global ``(N, T)`` batch, like the other token fields.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any, Iterator

import torch

from grpo_plugins import CompositionError, TrainerCapabilities
from grpo_plugins.ops import token_log_probs

if TYPE_CHECKING:
    from grpo_plugins import Composition
    from grpo_plugins_trl.trainer import PluginGRPOTrainer

FIELDS = ("old_entropies", "old_log_probs_at")


def with_statistics(caps: TrainerCapabilities, args: Any) -> TrainerCapabilities:
    """``caps`` plus the batch fields this module fills (every TRL setting can provide them)."""
    return dataclasses.replace(caps, batch_fields=caps.batch_fields | set(FIELDS))


def requested(composition: "Composition") -> tuple[bool, tuple[float, ...]]:
    """Whether a method reads ``old_entropies``, and the temperatures of ``old_log_probs_at`` the methods
    read (sorted; empty when none reads the field)."""
    return bool(composition.requirers("old_entropies")), composition.temperatures()


def trl_runs_old_pass(trainer: "PluginGRPOTrainer") -> bool:
    """Whether TRL computes old log-probs in ``_generate_and_score_completions`` (its own condition)."""
    generate_every = trainer.args.steps_per_generation * trainer.num_iterations
    return trainer.args.gradient_accumulation_steps % generate_every != 0 or (
        trainer.use_vllm and trainer.vllm_importance_sampling_correction
    )


@contextlib.contextmanager
def capture_old_pass(trainer: "PluginGRPOTrainer") -> Iterator[None]:
    """Around ``GRPOTrainer._generate_and_score_completions``: when a method needs old entropies and TRL
    runs its old-log-prob pass, that pass (the first no-grad forward of the policy) also returns its
    entropies, kept in ``trainer._plugin_old_entropies``. Otherwise does nothing."""
    trainer._plugin_old_entropies = None
    entropies, _ = requested(trainer.composition)
    if not entropies or not trl_runs_old_pass(trainer):
        yield
        return
    original = type(trainer)._get_per_token_logps_and_entropies

    def with_entropies(model, *args: Any, compute_entropy: bool = False, **kwargs: Any):
        first_old_pass = model is trainer.model and not torch.is_grad_enabled() and trainer._plugin_old_entropies is None
        out = original(trainer, model, *args, compute_entropy=compute_entropy or first_old_pass, **kwargs)
        if first_old_pass:
            trainer._plugin_old_entropies = out[1]
            if not compute_entropy:
                out = (out[0], None, out[2])
        return out

    trainer._get_per_token_logps_and_entropies = with_entropies  # an instance attribute, removed below
    try:
        yield
    finally:
        del trainer._get_per_token_logps_and_entropies


def batch_fields(trainer: "PluginGRPOTrainer", out: dict) -> dict[str, Any]:
    """The global ``old_entropies`` ``(N, T)`` and ``old_log_probs_at`` ``{tau: (N, T)}`` the methods read
    (an empty dict when none does), for the ``GRPOBatch`` of the advantage stage."""
    entropies_needed, temperatures = requested(trainer.composition)
    if not entropies_needed and not temperatures:
        return {}
    entropies = getattr(trainer, "_plugin_old_entropies", None) if entropies_needed else None
    at: dict[float, torch.Tensor] = {}
    if temperatures:
        want_entropy = entropies_needed and entropies is None
        at, logits_entropies = temperature_pass(trainer, out, temperatures, want_entropy)
        entropies = logits_entropies if want_entropy else entropies
    elif entropies_needed and entropies is None:
        entropies = entropy_pass(trainer, out)
    fields: dict[str, Any] = {}
    if entropies_needed:
        fields["old_entropies"] = trainer._gather_rows(entropies.float())
    if temperatures:
        fields["old_log_probs_at"] = {tau: trainer._gather_rows(values) for tau, values in at.items()}
    return fields


def _inputs(trainer: "PluginGRPOTrainer", out: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    from grpo_plugins_trl.trainer import FORWARD_KEYS

    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    attention = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
    return ids, attention, {key: out[key] for key in FORWARD_KEYS if key in out}


def entropy_pass(trainer: "PluginGRPOTrainer", out: dict) -> torch.Tensor:
    """``(n, T)`` token entropies of this rank's rows at ``args.temperature``: TRL's old-log-prob pass with
    ``compute_entropy=True`` (same forward, micro-batch size and temperature), no gradient."""
    from trl.models.utils import disable_gradient_checkpointing

    ids, attention, forward_kwargs = _inputs(trainer, out)
    with torch.no_grad(), disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs):
        _, entropies, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, attention, out["completion_ids"].size(1),
            batch_size=trainer.args.per_device_train_batch_size, compute_entropy=True, **forward_kwargs,
        )
    return entropies


def temperature_pass(
    trainer: "PluginGRPOTrainer", out: dict, temperatures: tuple[float, ...], want_entropy: bool
) -> tuple[dict[float, torch.Tensor], torch.Tensor | None]:
    """``{tau: (n, T)}`` log-probs of this rank's completion tokens at each temperature (and ``(n, T)``
    entropies at ``args.temperature`` when ``want_entropy``), from one no-grad forward through the model's
    own head in chunks of ``per_device_train_batch_size`` rows, the logits in float32
    (:func:`grpo_plugins.ops.token_log_probs`). Padding positions hold 0."""
    from trl.models.utils import disable_gradient_checkpointing

    ids, attention, forward_kwargs = _inputs(trainer, out)
    if any(value is not None for value in forward_kwargs.values()):
        raise CompositionError(
            f"method(s) {trainer.composition.requirers('old_log_probs_at')} read old log-probs at other temperatures, "
            "which the TRL adapter computes for text-only models; this batch carries image inputs"
        )
    completion, mask = out["completion_ids"], out["completion_mask"].bool()
    width, size = completion.size(1), trainer.args.per_device_train_batch_size
    chunks_at: list[dict[float, torch.Tensor]] = []
    chunks_entropy: list[torch.Tensor] = []
    with torch.no_grad(), disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs):
        for start in range(0, ids.size(0), size):
            rows = slice(start, start + size)
            with trainer.accelerator.autocast():
                logits = trainer.model(input_ids=ids[rows], attention_mask=attention[rows], logits_to_keep=width + 1,
                                       use_cache=False).logits[:, :-1].float()
            tokens, keep = completion[rows], mask[rows]
            chunks_at.append({tau: torch.where(keep, token_log_probs(logits, tokens, tau)[0], 0.0) for tau in temperatures})
            if want_entropy:
                entropy = token_log_probs(logits, tokens, trainer.args.temperature, entropy=True)[1]
                chunks_entropy.append(torch.where(keep, entropy, 0.0))
    merged = {tau: torch.cat([chunk[tau] for chunk in chunks_at]) for tau in temperatures}
    return merged, torch.cat(chunks_entropy) if want_entropy else None
