"""DCPO on the core alone: the card's worked example, the dual clip, edge cases and the property against GRPO."""

import math

import pytest
import torch

from grpo_plugins import Composition, CompositionError, GRPOBatch, LossInputs, TrainerCapabilities
from grpo_plugins.surrogates import dual_clip_loss
from grpo_plugin_dcpo import dcpo_advantages, mixing_weight, target_temperature


def test_card_example_numbers():
    assert target_temperature(0.3, 0.5, 0.8, 1.2) == 1.2
    weight = mixing_weight(0.3, 0.5, 0.1, 0.5)
    assert weight == pytest.approx(1 / 6)
    logits = torch.tensor([2.0, 0.0])
    rho = torch.softmax(logits / 1.2, 0)[0] / torch.softmax(logits, 0)[0]
    assert float(rho) == pytest.approx(0.954, abs=1.5e-3)  # the card rounds the probabilities first
    adv = dcpo_advantages(torch.tensor([1.0, -1.0]), torch.tensor([True, False]), torch.stack([rho, rho])[:, None],
                          torch.ones(2, 1), weight)
    assert adv[:, 0].tolist() == pytest.approx([5 / 6 + float(rho) / 6, -5 / 6])
    assert float(adv[0, 0]) == pytest.approx(0.992, abs=5e-4)


def test_no_correct_sample_means_no_regulariser():
    assert mixing_weight(0.3, 0.5, 0.1, 0.0) == 0.0


def test_dual_clip_bounds_negative_advantages():
    ratio = torch.tensor([[5.0, 5.0, 0.5, 1.0]])
    adv = torch.tensor([[-1.0, 1.0, 1.0, -2.0]])
    loss = dual_clip_loss(ratio, adv, 0.2, 0.2, 3.0)
    # A<0, r=5: max(5, 1.2) = 5, capped at 3; A>0, r=5: max(-5, -1.2) = -1.2; A>0, r=.5: max(-.5, -.8) = -.5
    assert loss[0].tolist() == pytest.approx([3.0, -1.2, -0.5, 2.0])


def stage(entropy, rewards=(1.0, 0.0, 1.0, 0.0)):
    n, t = len(rewards), 3
    mask = torch.ones(n, t)
    mask[1, 2] = 0
    lp1 = torch.full((n, t), math.log(0.881))
    lp_hot = torch.full((n, t), math.log(0.841))
    lp_cold = torch.full((n, t), math.log(0.93))
    nan = torch.tensor(float("nan"))
    b = GRPOBatch(prompt_ids=torch.tensor([0, 0, 1, 1]), rewards=torch.tensor(rewards), completion_mask=mask,
                  completion_ids=torch.ones(n, t, dtype=torch.long),
                  old_entropies=torch.where(mask > 0, torch.full((n, t), entropy), nan),
                  old_log_probs_at={0.8: lp_cold, 1.0: lp1, 1.2: torch.where(mask > 0, lp_hot, nan)})
    return Composition(["dcpo"]).run_advantage_stage(b)


def test_through_the_composition_hot_target():
    b = stage(0.3)  # H <= H0: tau = 1.2; half correct: alpha' = 1/6
    grpo = 1 / math.sqrt(2)
    rho = 0.841 / 0.881
    assert float(b.advantages[0, 0]) == pytest.approx(5 / 6 * grpo + rho / 6, rel=1e-4)
    assert float(b.advantages[1, 0]) == pytest.approx(-5 / 6 * grpo, rel=1e-4)
    assert float(b.advantages[1, 2]) == 0.0  # padding (NaN there) ignored


def test_through_the_composition_cold_target():
    b = stage(0.9)  # H > H0: tau = 0.8
    assert float(b.advantages[0, 0]) == pytest.approx(5 / 6 / math.sqrt(2) + (0.93 / 0.881) / 6, rel=1e-4)


def test_constant_groups_of_wrong_answers_stay_zero():
    b = stage(0.3, rewards=(0.0, 0.0, 1.0, 1.0))
    assert b.advantages[:2].abs().sum() == 0  # incorrect constant group: no regulariser, GRPO gives 0


def test_property_correct_constant_group_still_learns():
    # GRPO gives a group of all-correct answers 0; DCPO's regulariser pushes it toward the target distribution
    b = stage(0.3, rewards=(0.0, 0.0, 1.0, 1.0))
    assert bool((b.advantages[2:] > 0).all())


def test_surrogate_through_the_loss_stage():
    lp = torch.log(torch.tensor([[0.5, 0.5]])).requires_grad_()
    inputs = LossInputs(log_probs=lp, old_log_probs=torch.log(torch.tensor([[0.1, 0.5]])),
                        advantages=torch.tensor([[-1.0, -1.0]]), mask=torch.ones(1, 2))
    parts = Composition(["dcpo"]).run_loss_stage(inputs, lambda i: torch.zeros_like(i.log_probs))
    assert parts.policy.detach()[0].tolist() == pytest.approx([3.0, 1.0])


def test_verl_is_refused():
    with pytest.raises(CompositionError, match="old_log_probs_at"):
        Composition(["dcpo"]).check_capabilities(TrainerCapabilities.standard("verl"))
