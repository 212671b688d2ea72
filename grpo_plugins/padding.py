"""Padding never reaches a method: padded token positions are zeroed before the hooks see them.

Trainers pad completions to a common length ``T`` and may leave anything in the padded positions
(NaN log-probs of a masked forward, stale values). A method multiplying by the mask (``x * mask``)
would turn a NaN there into NaN everywhere (NaN x 0 = NaN). So the core hands every hook inputs whose
padded positions hold 0, and keeps only the unpadded positions of what a loss hook returns.
Gradients flow through ``torch.where`` to unpadded positions only.
"""

from __future__ import annotations

import dataclasses

import torch

BATCH_TOKEN_FIELDS = ("old_log_probs", "ref_log_probs", "old_entropies")
LOSS_TOKEN_FIELDS = ("log_probs", "old_log_probs", "advantages", "ref_log_probs", "entropies")


def zero_padding(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``values`` ``(N, T)`` with 0 wherever ``keep`` ``(N, T)`` (bool) is False; gradient-safe."""
    return torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))


def clean_batch_padding(batch) -> None:
    """Zero the padded positions of a ``GRPOBatch``'s float token tensors in place (by replacement)."""
    if batch.completion_mask is None:
        return
    keep = batch.completion_mask > 0
    for name in BATCH_TOKEN_FIELDS:
        value = getattr(batch, name)
        if isinstance(value, torch.Tensor) and value.dtype.is_floating_point and value.shape == keep.shape:
            setattr(batch, name, zero_padding(value, keep))
    if batch.old_log_probs_at:  # {temperature: (N, T)}
        batch.old_log_probs_at = {t: zero_padding(v, keep) for t, v in batch.old_log_probs_at.items()}


def clean_loss_padding(inputs):
    """A copy of ``LossInputs`` whose token tensors hold 0 wherever ``inputs.mask`` is 0."""
    keep = inputs.mask > 0
    changes = {
        name: zero_padding(value, keep)
        for name in LOSS_TOKEN_FIELDS
        if isinstance(value := getattr(inputs, name), torch.Tensor) and value.shape == keep.shape
    }
    return dataclasses.replace(inputs, **changes)
