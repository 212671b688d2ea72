"""Padding never matters: every installed method gives the same outputs, loss and gradient when every
padded token position of every input holds NaN as when it holds 0.

Each method runs alone (with the built-in ``grpo``) on a synthetic batch with uneven groups and
variable completion lengths, through the core's advantage stage, the loss stage and ``observe``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from grpo_plugins import Composition, LossInputs
from grpo_plugins.registry import discover
from grpo_plugins.testing import make_batch

INSTALLED = sorted(discover()[0])
NAN = float("nan")


def _fill_padding(tensor: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    return torch.where(mask.bool(), tensor, torch.full_like(tensor, value))


def _batch(padding: float):
    batch = make_batch(group_sizes=(3, 2, 4, 2, 3), num_tokens=7, num_components=2, seed=3, total_steps=10)
    batch.completions = [" ".join(map(str, row[row > 0].tolist())) for row in batch.completion_ids]
    mask = batch.completion_mask
    batch.old_log_probs = _fill_padding(batch.old_log_probs, mask, padding)
    batch.ref_log_probs = _fill_padding(batch.ref_log_probs, mask, padding)
    return batch


def _clipped_surrogate(inputs: LossInputs) -> torch.Tensor:
    """The trainer's PPO-clip loss as an adapter computes it, with padded positions zeroed first."""
    keep = inputs.mask > 0
    ratio = torch.exp(torch.where(keep, inputs.log_probs - inputs.old_log_probs, 0.0))
    advantages = torch.where(keep, inputs.advantages, 0.0)
    clipped = ratio.clamp(1 - inputs.clip_low, 1 + inputs.clip_high)
    return -torch.minimum(ratio * advantages, clipped * advantages)


def _run(name: str, padding: float):
    composition = Composition([name])
    batch = composition.run_advantage_stage(_batch(padding))
    mask = batch.completion_mask
    advantages = batch.advantages if batch.advantages.dim() == 2 else batch.advantages[:, None].expand_as(mask)
    weights = torch.ones_like(mask) if batch.token_weights is None else batch.token_weights
    gen = torch.Generator().manual_seed(7)
    log_probs = _fill_padding(batch.old_log_probs + 0.1 * torch.randn(mask.shape, generator=gen), mask, padding)
    log_probs.requires_grad_(True)
    inputs = LossInputs(
        log_probs=log_probs,
        old_log_probs=batch.old_log_probs,
        advantages=_fill_padding(advantages, mask, padding),
        mask=mask * (weights > 0),
        ref_log_probs=batch.ref_log_probs,
        entropies=_fill_padding(torch.rand(mask.shape, generator=gen), mask, padding),
        row_data={k: v for k, v in batch.row_data.items()},
        step=1,
    )
    parts = composition.run_loss_stage(inputs, _clipped_surrogate)
    per_token = parts.policy * weights + sum(parts.terms.values(), torch.zeros_like(parts.policy))
    loss = torch.where(mask.bool(), per_token, 0.0).sum() / mask.sum()
    loss.backward()
    composition.run_observe(copy.copy(batch), step=1)
    valid = mask.bool()
    return {
        "rewards": batch.rewards,
        "advantages": advantages[valid],
        "weights": weights[valid],
        "loss": loss.detach(),
        "grad": log_probs.grad,
        "state": composition.state_dict(),
    }


@pytest.mark.parametrize("name", INSTALLED)
def test_nan_in_padded_positions_changes_nothing(name):
    try:
        clean = _run(name, 0.0)
    except Exception as error:  # noqa: BLE001 - a method that needs more than the generic batch
        pytest.skip(f"'{name}' does not run on the generic batch: {type(error).__name__}: {error}")
    padded = _run(name, NAN)
    for key in ("rewards", "advantages", "weights", "loss"):
        assert torch.isfinite(padded[key]).all(), f"{name}: NaN padding leaked into {key}"
        assert torch.allclose(padded[key], clean[key], atol=1e-6, equal_nan=False), f"{name}: {key} changed"
    assert torch.isfinite(padded["grad"]).all(), f"{name}: NaN padding leaked into the gradient"
    assert torch.allclose(padded["grad"], clean["grad"], atol=1e-7), f"{name}: the gradient changed"
    assert _same_state(padded["state"], clean["state"]), f"{name}: state after observe changed"


def _same_state(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.allclose(a.double(), b.double(), equal_nan=True)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    return a == b


def test_the_generic_batch_runs_round_one_methods():
    """The skip above is for methods that need extra data; the round-1 methods must all run here."""
    for name in ("grpo", "spo", "vade", "knapsack_rl", "gdpo", "ngrpo", "gtpo", "llds", "sapo", "unlikeliness"):
        if name in INSTALLED:
            _run(name, 0.0)
