"""CoPG: the card's worked example by hand, the per-row form of the pairwise mean, the gradient
(analytic surrogate weights and a float64 finite-difference check), edge cases and the contrast with
GRPO (torch and the core only; real TRL runs: tests/integration/test_copg_trl.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

from grpo_plugins import Composition, CompositionError, GRPOBatch, LossInputs, LossTotals, PluginError
from grpo_plugins.testing import method_with
from grpo_plugin_copg import pairwise_losses

BETA = 0.2


def card_inputs(dtype=torch.float64):
    """R = [1, 0, .5], log pi = [-3, -4, -2], log pi_ref = [-3.5, -3, -2], split over two tokens each."""
    log_pi = torch.tensor([[-1.0, -2.0], [-4.0, 0.0], [-2.0, 0.0]], dtype=dtype)
    ref = torch.tensor([[-1.5, -2.0], [-3.0, 0.0], [-2.0, 0.0]], dtype=dtype)
    mask = torch.tensor([[1, 1], [1, 0], [1, 0]], dtype=dtype)
    return log_pi, ref, mask, torch.tensor([1.0, 0.0, 0.5], dtype=dtype)


def objective(log_pi, ref, mask, rewards, group, beta=BETA):
    composition = Composition([{"copg": {"beta": beta}}])
    batch = composition.run_advantage_stage(GRPOBatch(prompt_ids=group.clone(), rewards=rewards.float()))
    inputs = LossInputs(log_probs=log_pi, old_log_probs=log_pi.detach(), advantages=torch.zeros_like(log_pi),
                        mask=mask, ref_log_probs=ref, row_data=dict(batch.row_data), group_index=group)
    parts = composition.run_loss_stage(inputs, None)
    return parts


def step_value(parts, mask, group):
    term = parts.objectives["copg/pairwise"]
    sizes = torch.bincount(group)[group]
    return term.reduce(mask, LossTotals(tokens=float(mask.sum()), sequences=len(group), groups=len(group.unique())), sizes)


def test_card_worked_example_value_and_surrogate_weights():
    log_pi, ref, mask, rewards = card_inputs()
    x = log_pi.clone().requires_grad_(True)
    group = torch.tensor([0, 0, 0])
    parts = objective(x, ref, mask, rewards, group)
    assert torch.equal(parts.policy.detach(), torch.zeros_like(log_pi))  # the surrogate is replaced
    value = step_value(parts, mask, group)
    # a = [.5, -1, 0], R_beta = [.9, .2, .5]; pair losses .49, .16, .09 -> mean .2467
    assert value.item() == pytest.approx((0.49 + 0.16 + 0.09) / 3, abs=1e-12)
    value.backward()
    # gradient wrt each token of y_i = -w_i with w = (2 beta G / P)(R_beta_i - mean) = [.147, -.133, -.013]
    w = [0.4 * (0.9 - 1.6 / 3), 0.4 * (0.2 - 1.6 / 3), 0.4 * (0.5 - 1.6 / 3)]
    expected = torch.tensor([[-w[0], -w[0]], [-w[1], 0.0], [-w[2], 0.0]], dtype=torch.float64)
    torch.testing.assert_close(x.grad, expected)
    assert [round(v, 3) for v in w] == [0.147, -0.133, -0.013]


def test_per_row_form_equals_the_mean_over_pairs_for_every_group_size():
    gen = torch.Generator().manual_seed(3)
    for size in (2, 3, 5):
        rewards, log_ratio = torch.rand(size, generator=gen, dtype=torch.float64), torch.randn(size, generator=gen, dtype=torch.float64)
        rb = rewards - BETA * log_ratio
        pairs = [(rb[i] - rb[j]) ** 2 for i, j in itertools.combinations(range(size), 2)]
        per_row = pairwise_losses(rewards, log_ratio, torch.zeros(size, dtype=torch.long), 1, BETA)
        assert per_row.mean().item() == pytest.approx(torch.stack(pairs).mean().item(), rel=1e-12)


def test_gradient_finite_difference_two_groups_uneven():
    gen = torch.Generator().manual_seed(1)
    log_pi = -torch.rand(5, 3, generator=gen, dtype=torch.float64)
    ref = log_pi + 0.3 * torch.randn(5, 3, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0], dtype=torch.float64)
    group = torch.tensor([4, 4, 4, 9, 9])

    def f(x):
        return step_value(objective(x, ref, mask, rewards, group), mask, group)

    x = log_pi.clone().requires_grad_(True)
    f(x).backward()
    numeric = torch.zeros_like(log_pi)
    for i, j in mask.nonzero().tolist():
        e = torch.zeros_like(log_pi)
        e[i, j] = 1e-6
        numeric[i, j] = (f(log_pi + e) - f(log_pi - e)) / 2e-6
    torch.testing.assert_close(x.grad, numeric, atol=1e-8, rtol=1e-6)


def test_group_of_one_adds_nothing_and_nan_padding_is_ignored():
    log_pi, ref, mask, rewards = card_inputs()
    padded = torch.where(mask > 0, log_pi, float("nan")).requires_grad_(True)
    group = torch.tensor([0, 0, 1])  # the third completion is alone
    parts = objective(padded, ref, mask, rewards, group)
    losses = parts.objectives["copg/pairwise"].values
    assert losses[2].item() == 0.0
    # two completions: 2K/(K-1) = 4 times (R_beta_i - mean)^2, mean = (.9 + .2)/2
    assert losses[0].item() == pytest.approx(4 * 0.35**2)
    losses.sum().backward()
    assert torch.isfinite(padded.grad).all()


def test_constant_regularised_rewards_give_zero_loss_and_gradient():
    """The distinguishing property: GRPO pushes a rewarded completion up whatever pi_ref says; CoPG stops
    once log pi - log pi_ref differs by (R - R') / beta, i.e. at pi ~ pi_ref exp(R / beta)."""
    rewards = torch.tensor([1.0, 0.0], dtype=torch.float64)
    ref = torch.tensor([[-2.0], [-2.0]], dtype=torch.float64)
    log_pi = (ref + rewards[:, None] / BETA).requires_grad_(True)  # the optimum
    group = torch.tensor([0, 0])
    value = step_value(objective(log_pi, ref, torch.ones(2, 1, dtype=torch.float64), rewards, group), torch.ones(2, 1), group)
    value.backward()
    assert value.item() == pytest.approx(0.0, abs=1e-20) and log_pi.grad.abs().max().item() == pytest.approx(0.0, abs=1e-12)


def test_missing_group_index_or_reference_is_a_clear_error():
    log_pi, ref, mask, rewards = card_inputs()
    with pytest.raises(PluginError, match="group_index"):
        objective(log_pi, ref, mask, rewards, torch.tensor([0, 0, 0])).__class__  # builds fine
        composition = Composition(["copg"])
        composition.run_loss_stage(LossInputs(log_probs=log_pi, old_log_probs=log_pi, advantages=log_pi * 0, mask=mask,
                                              ref_log_probs=ref, row_data={"copg_reward": rewards}), None)
    with pytest.raises(PluginError, match="ref_log_probs"):
        Composition(["copg"]).run_loss_stage(LossInputs(log_probs=log_pi, old_log_probs=log_pi, advantages=log_pi * 0,
                                                        mask=mask, row_data={"copg_reward": rewards},
                                                        group_index=torch.zeros(3, dtype=torch.long)), None)


def test_needs_whole_groups_and_reference():
    needs = Composition(["copg"]).needs()["copg"]
    assert {"whole_groups", "loss_normalisers"} <= needs.features
    assert {"ref_log_probs", "group_index"} <= needs.loss_fields



@pytest.mark.parametrize("hook, function", [("mask_tokens", lambda batch: batch.token_mask),
                                            ("gate_loss", lambda inputs: torch.ones_like(inputs.mask)),
                                            ("adjust_advantages", lambda advantages: 2 * advantages)])
def test_methods_whose_hooks_the_objective_makes_meaningless_are_refused(hook, function):
    """Token weights and gates scale the replaced policy loss, advantage changes reach no loss: refused."""
    with pytest.raises(CompositionError, match=rf"'copg' cannot run together with method 'other', which implements "
                                               rf"hook '{hook}'"):
        Composition(["copg", method_with("other", **{hook: function})])
