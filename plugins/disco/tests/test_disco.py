"""DisCO: the card's worked example by hand (DisCO-b, DisCO, the constraint), a float64 finite-difference
gradient check, edge cases and the contrast with GRPO's difficulty bias (torch and the core only; real
TRL runs: tests/integration/test_disco_trl.py)."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_plugins import Composition, CompositionError, GRPOBatch, LossInputs, LossTotals
from grpo_plugins.testing import method_with
from grpo_plugin_disco import disco_objective


def scores_case():
    """s = [-1, -2, -0.5, -3], r = [1, 0, 1, 0]: one token per completion, so s = log pi."""
    return torch.tensor([[-1.0], [-2.0], [-0.5], [-3.0]], dtype=torch.float64), torch.tensor([1.0, 0.0, 1.0, 0.0])


def run(config, log_pi, old, rewards, group, mask=None):
    composition = Composition([{"disco": config}])
    batch = composition.run_advantage_stage(GRPOBatch(prompt_ids=group.clone(), rewards=rewards))
    mask = torch.ones_like(log_pi) if mask is None else mask
    inputs = LossInputs(log_probs=log_pi, old_log_probs=old, advantages=torch.zeros_like(log_pi), mask=mask,
                        row_data=dict(batch.row_data), group_index=group)
    return composition.run_loss_stage(inputs, None), batch


def step_loss(parts, mask, group):
    sizes = torch.bincount(group)[group]
    totals = LossTotals(tokens=float(mask.sum()), sequences=len(group), groups=len(group.unique()))
    return sum(term.reduce(mask, totals, sizes) for term in parts.objectives.values())


def test_card_worked_example_objectives():
    s, r = scores_case()
    group = torch.zeros(4, dtype=torch.long)
    # DisCO-b: J = mean(-1, -.5) - mean(-2, -3) = -.75 + 2.5 = 1.75
    parts, batch = run({"objective": "basic"}, s, s, r, group)
    assert torch.equal(batch.advantages, torch.zeros(4))  # the recipe's dummy advantages
    assert step_loss(parts, torch.ones_like(s), group).item() == pytest.approx(-1.75)
    # DisCO, tau = 10: 10 ln((e^-.2 + e^-.3) / 2) = -2.4875 -> J = -.75 + 2.4875 = 1.7375
    parts, _ = run({}, s, s, r, group)
    neg = 10 * math.log((math.exp(-0.2) + math.exp(-0.3)) / 2)
    assert neg == pytest.approx(-2.4875, abs=1e-4)
    assert step_loss(parts, torch.ones_like(s), group).item() == pytest.approx(-(-0.75 - neg))


def test_card_constraint_coefficient():
    # KL = .01 (every token's log pi_old - log pi = .01) -> c = 1e3 (.01 - 1e-4) = 9.9; term = c KL = .099
    s, r = scores_case()
    old = s + 0.01
    parts, _ = run({}, s, old, r, torch.zeros(4, dtype=torch.long))
    constraint = parts.objectives["disco/constraint"]
    assert constraint.normaliser == "token"
    value = constraint.reduce(torch.ones_like(s), LossTotals(tokens=4.0, sequences=4, groups=1))
    assert value.item() == pytest.approx(9.9 * 0.01, rel=1e-9)
    # inside the trust region the constraint is off
    parts, _ = run({}, s, s + 1e-5, r, torch.zeros(4, dtype=torch.long))
    assert parts.objectives["disco/constraint"].values.abs().max().item() == 0.0


@pytest.mark.parametrize("config", [{}, {"objective": "basic"}, {"score": "Lratio", "tau": 1.0}, {"kl": "low_var_kl"}])
def test_gradient_finite_difference(config):
    gen = torch.Generator().manual_seed(2)
    old = -torch.rand(6, 3, generator=gen, dtype=torch.float64) - 0.5
    log_pi = old + 0.2 * torch.randn(6, 3, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    group = torch.tensor([3, 3, 3, 8, 8, 8])

    def f(x):
        parts, _ = run(config, x, old, rewards, group, mask)
        # the constraint's coefficient is read without gradient: hold it at its value at log_pi
        objective = parts.objectives["disco/objective"].reduce(mask, LossTotals(10.0, 6, 2), torch.full((6,), 3))
        return objective, parts.objectives["disco/constraint"]

    x = log_pi.clone().requires_grad_(True)
    objective, constraint = f(x)
    objective.backward()
    numeric = torch.zeros_like(log_pi)
    for i, j in mask.nonzero().tolist():
        e = torch.zeros_like(log_pi)
        e[i, j] = 1e-6
        numeric[i, j] = (f(log_pi + e)[0] - f(log_pi - e)[0]) / 2e-6
    torch.testing.assert_close(x.grad, numeric, atol=1e-8, rtol=1e-6)


def test_prompts_without_both_classes_add_zero_but_count_in_q():
    s = torch.tensor([[-1.0], [-2.0], [-0.5], [-3.0]], dtype=torch.float64)
    group = torch.tensor([0, 0, 1, 1])
    parts, _ = run({"objective": "basic"}, s, s, torch.tensor([1.0, 0.0, 1.0, 1.0]), group)
    # prompt 0: J = -1 + 2 = 1; prompt 1 (all positive): 0; J = (1 + 0) / Q with Q = 2
    assert step_loss(parts, torch.ones_like(s), group).item() == pytest.approx(-0.5)
    single = disco_objective(torch.tensor([-1.0]), torch.tensor([True]), torch.tensor([False]), torch.tensor([0]), 1, 10.0)
    assert single.tolist() == [0.0]


def test_no_difficulty_bias_unlike_grpo():
    """The distinguishing property: GRPO's std scaling weights a 1-of-4 prompt and a 3-of-4 prompt
    differently per completion; DisCO-b gives every positive of every prompt the same gradient weight
    1 / (|O+| Q) and every negative -1 / (|O-| Q), with no group std."""
    log_pi = torch.full((8, 1), -1.0, dtype=torch.float64, requires_grad=True)
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 0])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    parts, _ = run({"objective": "basic"}, log_pi, log_pi.detach(), rewards, group)
    step_loss(parts, torch.ones_like(log_pi), group).backward()
    expected = [-1 / 2, 1 / 6, 1 / 6, 1 / 6, -1 / 6, -1 / 6, -1 / 6, 1 / 2]  # -dJ/ds, Q = 2
    assert log_pi.grad.flatten().tolist() == pytest.approx(expected)


def test_nan_padding_ignored_and_empty_rows():
    s, r = scores_case()
    mask = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 0.0]], dtype=torch.float64)
    log_pi = torch.cat([s, torch.full_like(s, float("nan"))], 1).requires_grad_(True)
    parts, _ = run({}, log_pi, torch.nan_to_num(log_pi.detach()), r, torch.zeros(4, dtype=torch.long), mask)
    loss = step_loss(parts, mask, torch.zeros(4, dtype=torch.long))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(log_pi.grad).all()


@pytest.mark.parametrize("hook, function", [("mask_tokens", lambda batch: batch.token_mask),
                                            ("gate_loss", lambda inputs: torch.ones_like(inputs.mask)),
                                            ("adjust_advantages", lambda advantages: 2 * advantages)])
def test_methods_whose_hooks_the_objective_makes_meaningless_are_refused(hook, function):
    """Token weights and gates scale the replaced policy loss, advantage changes reach no loss: refused."""
    with pytest.raises(CompositionError, match=rf"'disco' cannot run together with method 'other', which implements "
                                               rf"hook '{hook}'"):
        Composition(["disco", method_with("other", **{hook: function})])
