"""Old-policy log-probs at other temperatures for the advantage stage: ``GRPOBatch.old_log_probs_at`` on verl.

A method lists temperatures in ``Needs.temperatures``; it gets, for each ``tau``, the behaviour policy's
log-probs of the sampled tokens under ``softmax(logits / tau)``, computed exactly as verl computes its old
log-probs: the actor workers' ``compute_log_prob`` (verl's engine, micro-batching, dynamic batch sizes and
fused kernels, ``temperature`` in the batch's meta info), once per temperature, without entropies.

- The rollout temperature itself (``actor_rollout_ref.rollout.temperature``) costs nothing: it is verl's own
  ``old_log_probs``.
- Every other temperature: one more no-grad forward of the actor over the step's batch, run just before
  verl's own old-log-prob pass (so verl's pass is the last to write ``log_probs`` to TransferQueue, and the
  batch's meta info is restored afterwards). The ``(B, T)`` results come back to the driver and stay there
  (nothing is written to TransferQueue, so the actor update fetches nothing more) until the advantage stage
  puts them in the batch.

With no method reading ``old_log_probs_at`` nothing here runs. Shapes: ``B`` rows of verl's batch, ``T``
response tokens (padding positions hold 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from grpo_plugins import CompositionError

FIELD = "old_log_probs_at"
"""The ``GRPOBatch`` field (``{temperature: (N, T)}``) and its key in the trainer's extras."""
PASS_INFO = {"calculate_entropy": False, "compute_loss": False}
"""Meta info of each extra pass besides its ``temperature`` (no entropy, no loss: log-probs only)."""


@dataclass
class TemperaturePasses:
    """The extra passes' results for one step: ``values[tau]`` ``(B, T)`` for the rows ``keys``, in order."""

    keys: list[str]
    values: dict[float, torch.Tensor]

    def aligned(self, keys: Sequence[str]) -> dict[float, torch.Tensor]:
        """``values`` for the rows ``keys`` (the advantage stage's order; the same rows, maybe reordered).

        Raises:
            ValueError: a row of ``keys`` the passes did not cover.
        """
        keys = [str(key) for key in keys]
        if keys == self.keys:
            return dict(self.values)
        position = {key: row for row, key in enumerate(self.keys)}
        missing = [key for key in keys if key not in position]
        if missing:
            raise ValueError(f"{FIELD}: rows {missing[:3]} of the advantage stage were not in the old-log-prob pass")
        index = torch.tensor([position[key] for key in keys], dtype=torch.long)
        return {tau: value[index] for tau, value in self.values.items()}


def temperature_passes(worker_group: Any, batch: Any, temperatures: Sequence[float]) -> TemperaturePasses:
    """Run the actor's ``compute_log_prob`` once per temperature over verl's step ``batch`` (a
    ``KVBatchMeta``) and fetch each pass's log-probs of the response tokens, ``{tau: (B, T)}``.

    ``batch.extra_info`` is as it was on return (verl's old-log-prob pass sets its own entries next).
    """
    import transfer_queue as tq
    from verl.workers.utils.padding import response_from_nested

    saved = dict(batch.extra_info)
    values: dict[float, torch.Tensor] = {}
    try:
        for tau in temperatures:
            batch.extra_info.update(PASS_INFO, temperature=float(tau))
            output = worker_group.compute_log_prob(batch)
            if len(output) != len(batch):
                raise RuntimeError(f"{FIELD}: the actor's log-prob pass at temperature {tau} returned {len(output)} "
                                   f"rows for {len(batch)}")
            data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                                   select_fields=["log_probs", "response_mask"])
            values[float(tau)] = response_from_nested(data["log_probs"], data["response_mask"]).to_padded_tensor(0.0)
    finally:
        batch.extra_info.clear()
        batch.extra_info.update(saved)
    return TemperaturePasses([str(key) for key in batch.keys], values)


def run_passes(trainer: Any, batch: Any) -> TemperaturePasses | None:
    """Before verl's old-log-prob pass of ``trainer`` (the ``grpo_plugins`` trainer): the passes at the
    requested temperatures other than the rollout temperature; None when there are none (nothing runs)."""
    temperatures = trainer.grpo_plugins.composition.temperatures()
    if not temperatures:
        return None
    sampling = float(trainer.config.actor_rollout_ref.rollout.temperature)
    extra = [tau for tau in temperatures if tau != sampling]
    if not extra:
        return None
    return temperature_passes(trainer.actor_rollout_wg, batch, extra)


def add_field(trainer: Any, keys: Sequence[str]) -> None:
    """At the advantage stage of ``trainer`` (the ``grpo_plugins`` trainer), when a method reads it: put
    ``old_log_probs_at`` ``{tau: (B, T)}`` for the rows ``keys`` into the fetched extras
    (``trainer.grpo_plugins.extras``): the rollout temperature from verl's ``old_log_probs`` (already there),
    the others from the step's :func:`run_passes` (``trainer.temperature_passes``, then dropped).

    Raises:
        CompositionError: a requested temperature has no values (its pass did not run for this batch).
    """
    passes, trainer.temperature_passes = getattr(trainer, "temperature_passes", None), None
    composition, extras = trainer.grpo_plugins.composition, trainer.grpo_plugins.extras
    temperatures = composition.temperatures()
    if not temperatures:
        return
    sampling = float(trainer.config.actor_rollout_ref.rollout.temperature)
    at = passes.aligned(keys) if passes is not None else {}
    if sampling in temperatures:
        at[sampling] = extras["old_log_probs"]
    missing = [tau for tau in temperatures if tau not in at]
    if missing:
        raise CompositionError(f"{FIELD} at temperature(s) {missing}, read by {composition.requirers(FIELD)}, were not "
                               "computed: the actor's log-prob passes run in the grpo_plugins trainer's old-log-prob step")
    extras[FIELD] = {tau: at[tau] for tau in temperatures}
