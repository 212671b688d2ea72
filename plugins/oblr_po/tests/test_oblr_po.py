"""OBLR-PO on the core alone: the card's worked examples, edge cases and the property against GRPO."""

import math

import pytest
import torch

from grpo_plugins import Composition, CompositionError, ConfigError, GradientStatistics, GRPOBatch, TrainerCapabilities
from grpo_plugin_oblr_po import gradient_snr, gradient_weights, optimal_baseline_advantages, snr_step_factor


def batch(rewards, lengths, prompt_ids, width=4):
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).float()
    return GRPOBatch(prompt_ids=torch.tensor(prompt_ids), rewards=torch.tensor(rewards, dtype=torch.float32),
                     completion_ids=torch.ones(len(rewards), width, dtype=torch.long), completion_mask=mask)


def test_card_baseline_example():
    # rewards [0, 1] with weights [1, 3]: b* = 0.75, A = [-0.75, 0.25] (a mean baseline gives +-0.5)
    adv = optimal_baseline_advantages(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 3.0]), torch.tensor([0, 0]), 1)
    assert adv.tolist() == [-0.75, 0.25]


def test_length_weights_through_the_composition():
    b = Composition(["oblr_po"]).run_advantage_stage(batch([0.0, 1.0, 2.0, 2.0], [1, 3, 2, 4], [5, 5, 9, 9]))
    assert torch.allclose(b.advantages, torch.tensor([-0.75, 0.25, 0.0, 0.0]))


def test_card_snr_example():
    # unit gradients [1, 0] and [3, 0]: g = [2, 0], noise = 2, SNR = 4 / (2 / 2) = 4, factor 0.8
    stats = GradientStatistics(unit_sq_norms=torch.tensor([1.0, 9.0]), mean_sq_norm=torch.tensor(4.0))
    assert float(gradient_snr(stats)) == pytest.approx(4.0)
    assert float(snr_step_factor(gradient_snr(stats))) == pytest.approx(0.8)


def test_scale_update_ema_and_state():
    comp = Composition([{"oblr_po": {"snr_momentum": 0.5}}])
    b = batch([0.0, 1.0], [2, 2], [0, 0])
    b.gradient_statistics = GradientStatistics(torch.tensor([1.0, 9.0]), torch.tensor(4.0))  # SNR 4
    assert float(comp.run_scale_update(b, 0)) == pytest.approx(0.8)
    b.gradient_statistics = GradientStatistics(torch.tensor([2.0, 2.0]), torch.tensor(0.0))  # SNR 0
    assert float(comp.run_scale_update(b, 1)) == pytest.approx(2.0 / 3.0)  # EMA 0.5*4 + 0.5*0 = 2
    assert comp.state_dict() == {"oblr_po": {"snr_ema": 2.0}}


def test_no_noise_and_single_unit_leave_the_step_alone():
    comp = Composition(["oblr_po"])
    b = batch([0.0, 1.0], [2, 2], [0, 0])
    b.gradient_statistics = GradientStatistics(torch.tensor([4.0, 4.0]), torch.tensor(4.0))  # identical units
    assert float(comp.run_scale_update(b, 0)) == 1.0
    b.gradient_statistics = GradientStatistics(torch.tensor([4.0]), torch.tensor(4.0))
    assert float(Composition(["oblr_po"]).run_scale_update(b, 0)) == 1.0


def test_all_zero_gradients_give_no_estimate_and_keep_the_ema():
    # units [0, 0], mean 0: SNR is 0 / 0 -> NaN (no estimate), not inf
    zero = GradientStatistics(torch.tensor([0.0, 0.0]), torch.tensor(0.0))
    assert math.isnan(float(gradient_snr(zero)))
    comp = Composition([{"oblr_po": {"snr_momentum": 0.5}}])
    b = batch([0.0, 1.0], [2, 2], [0, 0])
    snr4 = GradientStatistics(torch.tensor([1.0, 9.0]), torch.tensor(4.0))
    b.gradient_statistics = snr4
    assert float(comp.run_scale_update(b, 0)) == pytest.approx(0.8)  # EMA 4
    b.gradient_statistics = zero
    assert float(comp.run_scale_update(b, 1)) == 1.0  # not scaled
    assert comp.state_dict() == {"oblr_po": {"snr_ema": 4.0}}  # the EMA is left alone (was reset to inf)
    b.gradient_statistics = GradientStatistics(torch.tensor([2.0, 2.0]), torch.tensor(0.0))  # SNR 0
    assert float(comp.run_scale_update(b, 2)) == pytest.approx(2.0 / 3.0)  # EMA 0.5*4 + 0.5*0 = 2


def test_both_parts_off_is_refused():
    with pytest.raises(ConfigError, match="use_baseline and adaptive_step"):
        Composition([{"oblr_po": {"use_baseline": False, "adaptive_step": False}}])


def test_missing_statistics_is_a_clear_error():
    with pytest.raises(Exception, match="gradient_statistics"):
        Composition(["oblr_po"]).run_scale_update(batch([0.0, 1.0], [2, 2], [0, 0]), 0)


def test_constant_groups_single_rows_and_zero_weights():
    # constant group at a non-dyadic scale -> exactly 0; a group of one -> 0; all-empty group -> plain mean
    b = Composition(["oblr_po"]).run_advantage_stage(
        batch([7.782482, 7.782482, 7.782482, 3.0, 0.0, 1.0], [1, 2, 3, 2, 0, 0], [0, 0, 0, 1, 2, 2]))
    assert b.advantages[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert b.advantages[4:].tolist() == [-0.5, 0.5]


def test_token_surprise_weights_ignore_nan_padding():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    logp = torch.tensor([[math.log(0.5), 0.0, float("nan")]])
    assert gradient_weights("token_surprise", mask, logp).tolist() == [0.25]


def test_nan_rewards_are_refused():
    with pytest.raises(Exception, match="(?i)finite|nan"):
        Composition(["oblr_po"]).run_advantage_stage(batch([float("nan"), 1.0], [2, 2], [0, 0]))


def test_property_longer_correct_completions_move_the_baseline():
    # GRPO gives +-0.707 to a 0/1 pair whatever the lengths; OBLR-PO weights the baseline toward the long one
    b = Composition(["oblr_po"]).run_advantage_stage(batch([0.0, 1.0], [1, 4], [0, 0]))
    g = Composition(["grpo"]).run_advantage_stage(batch([0.0, 1.0], [1, 4], [0, 0]))
    assert torch.allclose(b.advantages, torch.tensor([-0.8, 0.2]))
    assert g.advantages[0] == -g.advantages[1]


def test_trainer_without_update_control_is_refused():
    caps = TrainerCapabilities.standard("verl")
    with pytest.raises(CompositionError, match="update_control"):
        Composition(["oblr_po"]).check_capabilities(caps)
