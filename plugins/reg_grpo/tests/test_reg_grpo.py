"""Reg-GRPO: the card's worked example by hand, a float64 finite-difference gradient check, edge cases and
the contrast with GRPO's clipping (torch and the core only; real TRL runs: tests/integration/test_reg_grpo_trl.py)."""

from __future__ import annotations

import pytest
import torch

from grpo_plugins import Composition, CompositionError, GRPOBatch, LossInputs, LossTotals
from grpo_plugins.testing import method_with


def run(log_pi, old, rewards, group, mask=None, config=None):
    composition = Composition([{"reg_grpo": config or {}}])
    batch = composition.run_advantage_stage(GRPOBatch(prompt_ids=group.clone(), rewards=rewards))
    mask = torch.ones_like(log_pi) if mask is None else mask
    adv = batch.advantages.to(log_pi.dtype)[:, None].expand_as(log_pi)
    inputs = LossInputs(log_probs=log_pi, old_log_probs=old, advantages=adv, mask=mask, group_index=group)
    return composition.run_loss_stage(inputs, None), batch


def step_loss(parts, mask, n):
    return parts.objectives["reg_grpo/regression"].reduce(mask, LossTotals(float(mask.sum()), float(n), 1.0))


def test_card_worked_example():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    old = torch.zeros(4, 1, dtype=torch.float64)
    z = torch.tensor([[0.02], [0.01], [-0.01], [0.0]], dtype=torch.float64)
    # the card's numbers leave eps out: eps = 1e-9 (with the default 1e-4, Ahat shrinks by std / (std + eps))
    parts, batch = run(z, old, rewards, torch.zeros(4, dtype=torch.long), config={"eps": 1e-9})
    assert batch.advantages.tolist() == pytest.approx([1, -1, -1, 1], abs=1e-6)  # population std 0.5
    losses = parts.objectives["reg_grpo/regression"].values
    # Ahat = [1.342, .447, -1.342, -.447] -> errors [.117, 2.094, .117, 2.094], mean 1.105
    assert losses.tolist() == pytest.approx([0.117, 2.094, 0.117, 2.094], abs=2e-3)
    assert step_loss(parts, torch.ones_like(z), 4).item() == pytest.approx(1.105, abs=2e-3)


def test_gradient_finite_difference():
    gen = torch.Generator().manual_seed(4)
    old = -torch.rand(5, 3, generator=gen, dtype=torch.float64)
    log_pi = old + 0.1 * torch.randn(5, 3, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    rewards, group = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0]), torch.tensor([2, 2, 2, 7, 7])

    def f(x):
        return step_loss(run(x, old, rewards, group, mask)[0], mask, 5)

    x = log_pi.clone().requires_grad_(True)
    f(x).backward()
    numeric = torch.zeros_like(log_pi)
    for i, j in mask.nonzero().tolist():
        e = torch.zeros_like(log_pi)
        e[i, j] = 1e-7
        numeric[i, j] = (f(log_pi + e) - f(log_pi - e)) / 2e-7
    torch.testing.assert_close(x.grad, numeric, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_constant_groups_zero_target_and_skipped(scale):
    rewards = torch.full((3,), 0.3 * scale)
    log_pi = torch.tensor([[0.1], [0.0], [-0.2]], dtype=torch.float64, requires_grad=True)
    parts, batch = run(log_pi, torch.zeros(3, 1, dtype=torch.float64), rewards, torch.zeros(3, dtype=torch.long))
    assert torch.equal(batch.advantages, torch.zeros(3))
    assert parts.objectives["reg_grpo/regression"].values.abs().max().item() == 0.0
    parts, _ = run(log_pi, torch.zeros(3, 1, dtype=torch.float64), rewards, torch.zeros(3, dtype=torch.long),
                   config={"constant_groups": "regress"})
    # sum of Ahat^2 = G (std / (std + eps))^2, std = 0.1247
    assert parts.objectives["reg_grpo/regression"].values.sum().item() == pytest.approx(3 * (0.12472 / 0.12482) ** 2, rel=1e-4)


def test_on_policy_first_step_is_finite_and_nan_padding_ignored():
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    log_pi = torch.tensor([[-1.0, float("nan")], [-2.0, -1.0]], dtype=torch.float64, requires_grad=True)
    parts, _ = run(log_pi, torch.nan_to_num(log_pi.detach()), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), mask)
    loss = step_loss(parts, mask, 2)
    loss.backward()
    assert loss.item() == pytest.approx((0.5 / 0.5001) ** 2, rel=1e-6)  # z equal -> Ahat 0; targets +-0.5 / (0.5 + eps)
    assert torch.isfinite(log_pi.grad).all()


def test_unlike_grpo_no_clipping_plateau():
    """The distinguishing property: a completion whose ratio is far outside PPO's clip range (GRPO gives it
    no gradient) still gets one from the regression."""
    log_pi = torch.tensor([[1.0], [0.0]], dtype=torch.float64, requires_grad=True)  # ratio e for the positive
    parts, _ = run(log_pi, torch.zeros(2, 1, dtype=torch.float64), torch.tensor([0.0, 1.0]), torch.tensor([0, 0]))
    step_loss(parts, torch.ones(2, 1), 2).backward()
    assert log_pi.grad.abs().min().item() > 0


def test_fully_masked_row_left_out_of_z_statistics():
    """A row without real tokens (e.g. a truncated completion masked out whole) has no z: the card's four
    rows keep their losses [.117, 2.094, .117, 2.094] and the masked row's loss is 0. Counted with z = 0 it
    would shift the group's mean and std of z (losses [.324, 2.523, .139, 1.938])."""
    old = torch.zeros(5, 1, dtype=torch.float64)
    z = torch.tensor([[0.02], [0.01], [-0.01], [0.0], [0.3]], dtype=torch.float64)
    mask = torch.tensor([[1.0], [1.0], [1.0], [1.0], [0.0]], dtype=torch.float64)
    targets = torch.tensor([1.0, -1.0, -1.0, 1.0, 0.0], dtype=torch.float64)[:, None]
    composition = Composition([{"reg_grpo": {"eps": 1e-9}}])
    inputs = LossInputs(log_probs=z, old_log_probs=old, advantages=targets, mask=mask,
                        group_index=torch.zeros(5, dtype=torch.long))
    losses = composition.run_loss_stage(inputs, None).objectives["reg_grpo/regression"].values
    assert losses.tolist() == pytest.approx([0.1167, 2.0944, 0.1167, 2.0944, 0.0], abs=1e-4)


def test_token_weights_on_the_replaced_policy_loss_are_refused():
    weights = method_with("token_weights", mask_tokens=lambda batch: batch.token_mask)
    with pytest.raises(CompositionError, match=r"'reg_grpo' cannot run together with method 'token_weights', which "
                                               r"implements hook 'mask_tokens'"):
        Composition(["reg_grpo", weights])
