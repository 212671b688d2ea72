"""The shared per-token objectives (:mod:`grpo_plugins.surrogates`) on hand-computed cases.

The adapters' bit-exactness tests hold them to TRL's and verl's own losses; these pin their values."""

import math

import pytest
import torch

from grpo_plugins.surrogates import (
    bounded_log_ratio, cispo_loss, dual_clip_loss, k3_kl, ppo_clip_loss, sapo_loss, sapo_soft_coefficient,
    sequence_log_ratio, weight_token_advantages,
)


def test_ppo_clip_takes_the_pessimistic_side_and_the_cap_bounds_the_unclipped_ratio():
    ratio = torch.tensor([[0.5, 1.5], [0.5, 1.5]])
    advantages = torch.tensor([[1.0], [-1.0]])
    # A = 1: -min(r, clip(r)) = -0.5, -1.2; A = -1: -min(-r, -clip(r)) = 0.8, 1.5
    torch.testing.assert_close(ppo_clip_loss(ratio, advantages, 0.2, 0.2), torch.tensor([[-0.5, -1.2], [0.8, 1.5]]))
    # the cap (TRL's delta) turns r = 1.5 into 1.3 before the min: -min(-1.3, -1.2) = 1.3
    assert ppo_clip_loss(ratio, advantages, 0.2, 0.2, ratio_cap=1.3)[1, 1].item() == pytest.approx(1.3)


def test_dual_clip_bounds_a_negative_advantage_token_with_a_large_ratio():
    ratio, advantages = torch.tensor([5.0, 5.0, 0.5]), torch.tensor([-1.0, 1.0, -1.0])
    # A = -1, r = 5: PPO gives 5, dual clip min(5, 3 * 1) = 3; A > 0 untouched (-1.2); r = 0.5: min(0.8, 3) = 0.8
    assert dual_clip_loss(ratio, advantages, 0.2, 0.2, 3.0).tolist() == pytest.approx([3.0, -1.2, 0.8])


def test_sapo_gate_is_two_over_tau_at_ratio_one_with_unit_slope():
    ratio = torch.tensor([1.0], requires_grad=True)
    value = sapo_soft_coefficient(ratio, 4.0)
    value.backward()
    assert value.item() == pytest.approx(0.5) and ratio.grad.item() == pytest.approx(1.0)
    # the temperature follows the advantage's sign: tau = 2 where A > 0, 8 where A < 0
    loss = sapo_loss(torch.tensor([1.0, 1.0]), torch.tensor([1.0, -1.0]), 2.0, 8.0)
    assert loss.tolist() == pytest.approx([-1.0, 0.25])


def test_cispo_weights_log_probs_by_the_clipped_detached_ratio():
    log_probs = torch.tensor([math.log(0.5), math.log(0.5)], requires_grad=True)
    loss = cispo_loss(torch.tensor([0.5, 3.0]), torch.tensor([1.0, 1.0]), log_probs, ratio_max=2.0)
    assert loss.tolist() == pytest.approx([-0.5 * math.log(0.5), -2.0 * math.log(0.5)])
    loss.sum().backward()
    assert log_probs.grad.tolist() == pytest.approx([-0.5, -2.0])


def test_k3_kl_matches_the_formula_and_is_zero_on_the_reference():
    log_probs = torch.log(torch.tensor([0.25, 0.5]))
    reference = torch.log(torch.tensor([0.5, 0.5]))
    # exp(log 2) - log 2 - 1 = 1 - log 2; equal policies: 0
    assert k3_kl(reference, log_probs).tolist() == pytest.approx([1 - math.log(2), 0.0])


def test_sequence_log_ratio_is_the_masked_token_mean_and_zero_for_an_empty_row():
    log_ratio = torch.tensor([[0.2, 0.4, 9.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(sequence_log_ratio(log_ratio, mask), torch.tensor([[0.3], [0.0]]))


def test_bounded_log_ratio_clamps_at_the_bound():
    log_probs, old = torch.tensor([0.0, -30.0, -1.0]), torch.tensor([-30.0, 0.0, -1.5])
    assert bounded_log_ratio(log_probs, old).tolist() == [20.0, -20.0, 0.5]
    assert bounded_log_ratio(log_probs, old, bound=5.0).tolist() == [5.0, -5.0, 0.5]


def test_token_weights_travel_inside_the_advantages():
    advantages, weights = torch.tensor([2.0, -1.0]), torch.tensor([[1.0, 0.0], [0.5, 1.0]])
    assert weight_token_advantages(advantages, weights).tolist() == [[2.0, 0.0], [-0.5, -1.0]]
    assert weight_token_advantages(advantages, None) is advantages
