"""DGPO: the card's worked example by hand, edge cases, and what sets it apart from GRPO."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_plugins import Composition, GRPOBatch
from grpo_plugins.errors import BatchError, ConfigError, PluginError
from grpo_plugins.registry import resolve


def batch_of(rewards, prompt_ids, lengths=None, components=None, names=None, tokens=6) -> GRPOBatch:
    rewards = torch.tensor(rewards, dtype=torch.float32)
    n = rewards.numel()
    lengths = torch.tensor(lengths if lengths is not None else [4] * n)
    mask = (torch.arange(tokens) < lengths[:, None]).float()
    comps = None if components is None else torch.tensor(components, dtype=torch.float32)
    return GRPOBatch(
        prompt_ids=torch.tensor(prompt_ids),
        rewards=rewards,
        reward_components=comps,
        reward_names=tuple(names or (f"r{k}" for k in range(0 if comps is None else comps.shape[1]))),
        reward_weights=None if comps is None else torch.ones(comps.shape[1]),
        completion_mask=mask,
    )


def advantages(methods, batch):
    return Composition(methods).run_advantage_stage(batch).advantages


CARD_REWARDS = [1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0]
CARD_IDS = [0] * 4 + [1] * 4 + [2] * 4


def test_discovered_with_paper_link():
    info = resolve("dgpo")
    assert info.distribution == "grpo-plugin-dgpo"
    assert info.load().paper == "https://arxiv.org/abs/2601.20614"


def test_card_worked_example():
    # DGAE: group 0 (acc .25): mean .25, sum |dev| = 1.5 -> 4 * [.75, -.25, -.25, -.25] / 1.5001
    #       group 1 (acc .75): mean .75, sum |dev| = 1.5 -> 4 * [.25, .25, .25, -.75] / 1.5001
    # DQW: 2 softmax(-.25/2, -.75/2) = 2 / (1 + e^{-.25}) = 1.124353 and 2 - 1.124353 = 0.875647
    # token ratio with equal lengths: 12 / 8 = 1.5
    adv = advantages(["dgpo"], batch_of(CARD_REWARDS, CARD_IDS))
    dgae0 = 4 * 0.75 / 1.5001
    w0 = 2 / (1 + math.exp(-0.25))
    expected_0 = [dgae0 * w0 * 1.5] + [-dgae0 / 3 * w0 * 1.5] * 3
    expected_1 = [dgae0 / 3 * (2 - w0) * 1.5] * 3 + [-dgae0 * (2 - w0) * 1.5]
    assert adv[:4].tolist() == pytest.approx(expected_0, abs=1e-5)
    assert adv[:4].tolist() == pytest.approx([3.373, -1.124, -1.124, -1.124], abs=1e-3)  # the card's numbers
    assert adv[4:8].tolist() == pytest.approx(expected_1, abs=1e-5)
    assert adv[8:].tolist() == [0.0] * 4


def test_each_factor_alone():
    batch = batch_of(CARD_REWARDS, CARD_IDS)
    only_mad = advantages([{"dgpo": {"difficulty_weighting": False, "token_ratio": False}}], batch)
    assert only_mad[:4].tolist() == pytest.approx([2.0, -0.6667, -0.6667, -0.6667], abs=1e-3)
    centred = advantages([{"dgpo": {"mad_scaling": False, "difficulty_weighting": False, "token_ratio": False}}], batch)
    assert centred[:4].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])


def test_total_abs_advantage_is_group_size_whatever_the_accuracy():
    # the property that separates DGAE from GRPO: GRPO's total |A| grows with p (1 - p), DGAE's is G at any accuracy
    rewards = [1, 0, 0, 0, 0, 0, 0, 0] + [1, 1, 1, 1, 0, 0, 0, 0]
    ids = [0] * 8 + [1] * 8
    dgae = advantages([{"dgpo": {"difficulty_weighting": False, "token_ratio": False}}], batch_of(rewards, ids))
    grpo = advantages([], batch_of(rewards, ids))
    assert dgae[:8].abs().sum().item() == pytest.approx(8.0, abs=1e-3)
    assert dgae[8:].abs().sum().item() == pytest.approx(8.0, abs=1e-3)
    assert grpo[:8].abs().sum().item() < grpo[8:].abs().sum().item() - 1.0  # GRPO under-weights the hard group
    # with DQW on, the harder group (acc 1/8) gets the larger total
    full = advantages([{"dgpo": {"token_ratio": False}}], batch_of(rewards, ids))
    assert full[:8].abs().sum() > full[8:].abs().sum()


def test_zero_accuracy_group_valid_through_another_reward_counts_as_easiest():
    # group 0: accuracy [0,0], format [1,0] -> valid, acc 0 read as 1; group 1: accuracy [1,0] -> acc .5
    comps = [[0, 1], [0, 0], [1, 0], [0, 0]]
    batch = batch_of([1, 0, 1, 0], [0, 0, 1, 1], components=comps, names=("accuracy", "format"))
    adv = advantages([{"dgpo": {"token_ratio": False}}], batch)
    w1 = 2 / (1 + math.exp(-(1 - 0.5) / 2))  # softmax over (-1/2, -0.5/2), times 2
    assert adv[2].item() == pytest.approx(2 * 0.5 / 1.0001 * w1, abs=1e-5)
    assert adv[0].item() == pytest.approx(2 * 0.5 / 1.0001 * (2 - w1), abs=1e-5)
    # naming the component explicitly does the same; an unknown name is a clear error
    same = advantages([{"dgpo": {"token_ratio": False, "accuracy_reward": "accuracy"}}], batch)
    assert torch.equal(adv, same)
    with pytest.raises(PluginError, match="accuracy_reward 'acc' is not a reward component.*'accuracy', 'format'"):
        advantages([{"dgpo": {"accuracy_reward": "acc"}}], batch)


def test_accuracy_outside_unit_interval_is_a_clear_error():
    with pytest.raises(PluginError, match=r"dgpo.*must lie in \[0, 1\]"):
        advantages(["dgpo"], batch_of([2.0, 0.0, 1.0, 0.0], [0, 0, 1, 1]))
    # without DQW any finite reward works
    adv = advantages([{"dgpo": {"difficulty_weighting": False, "token_ratio": False}}], batch_of([2.0, 0.0], [0, 0]))
    assert adv.tolist() == pytest.approx([1.0, -1.0], abs=1e-3)


def test_token_ratio_uses_lengths_of_valid_groups():
    # valid group 0 has lengths 2 + 4 = 6, invalid group 1 has 6 + 6 = 12: ratio 18 / 6 = 3
    batch = batch_of([1, 0, 1, 1], [0, 0, 1, 1], lengths=[2, 4, 6, 6])
    adv = advantages([{"dgpo": {"difficulty_weighting": False}}], batch)
    assert adv.tolist() == pytest.approx([3 * 1 / 1.0001, -3 * 1 / 1.0001, 0.0, 0.0], abs=1e-5)
    no_tokens = batch_of([1, 0], [0, 0])
    no_tokens.completion_mask = None
    with pytest.raises(PluginError, match="token_ratio: false"):
        advantages(["dgpo"], no_tokens)


def test_constant_groups_give_exactly_zero_at_any_scale():
    for value in (0.1, 3.7, 1e6):
        adv = advantages([{"dgpo": {"difficulty_weighting": False}}], batch_of([value] * 3 + [0, 1], [0, 0, 0, 1, 1]))
        assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    # an all-constant batch: every factor is neutral and every advantage is 0
    assert advantages(["dgpo"], batch_of([1, 1, 0, 0], [0, 0, 1, 1])).tolist() == [0.0] * 4


def test_float64_rewards_keep_their_precision():
    # 1e6 and 1e6 + .01 differ below float32's precision (its step at 1e6 is .0625): a float32 copy makes the
    # group constant (A = 0). In float64: G (r - mean) / (sum |r - mean| + eps) = 4 (+-.005) / (.02 + 1e-4)
    batch = batch_of([0.0] * 4, [0] * 4)
    batch.rewards = torch.tensor([1e6, 1e6 + 0.01, 1e6, 1e6 + 0.01], dtype=torch.float64)
    adv = advantages([{"dgpo": {"difficulty_weighting": False}}], batch)
    assert adv.dtype == torch.float64
    expected = 0.02 / 0.0201
    assert adv.tolist() == pytest.approx([-expected, expected, -expected, expected], abs=1e-6)


def test_groups_of_one_and_uneven_groups_shuffled():
    # group 5: [1, 0, 0] (acc 1/3), group 9: [1] alone (constant -> 0), group 7: [0, 1] (acc 1/2)
    rewards = [1, 0, 0, 1, 0, 1]
    ids = [5, 5, 5, 9, 7, 7]
    order = [3, 4, 0, 5, 2, 1]
    adv = advantages(["dgpo"], batch_of([rewards[i] for i in order], [ids[i] for i in order]))
    by_position = dict(zip(order, adv.tolist()))
    # DGAE: group 5: 3 * [2/3, -1/3, -1/3] / (4/3 + 1e-4); group 7: 2 * [-1/2, 1/2] / (1 + 1e-4)
    w5 = 2 / (1 + math.exp(-(0.5 - 1 / 3) / 2))
    ratio = 6 * 4 / (5 * 4)  # equal lengths: 6 completions, 5 of them in valid groups
    assert by_position[0] == pytest.approx(3 * (2 / 3) / (4 / 3 + 1e-4) * w5 * ratio, abs=1e-5)
    assert by_position[1] == pytest.approx(-3 * (1 / 3) / (4 / 3 + 1e-4) * w5 * ratio, abs=1e-5)
    assert by_position[5] == pytest.approx(2 * 0.5 / 1.0001 * (2 - w5) * ratio, abs=1e-5)
    assert by_position[3] == 0.0


def test_all_tokens_masked_in_a_completion_and_nan_rewards():
    batch = batch_of([1, 0, 0, 1], [0, 0, 1, 1], lengths=[0, 4, 4, 4])  # completion 0 has no token
    adv = advantages([{"dgpo": {"difficulty_weighting": False}}], batch)
    assert torch.isfinite(adv).all()
    assert adv.tolist() == pytest.approx([1 / 1.0001, -1 / 1.0001, -1 / 1.0001, 1 / 1.0001], abs=1e-5)
    bad = batch_of([1.0, float("nan"), 0.0, 1.0], [0, 0, 1, 1])
    with pytest.raises(BatchError, match="NaN"):
        advantages(["dgpo"], bad)


def test_nan_accuracy_component_is_left_out_of_the_group_mean():
    nan = float("nan")
    comps = [[1, 1], [nan, 0], [0, 0], [1, 1], [0, 1], [nan, 0]]
    batch = batch_of([2, 0, 0, 2, 1, 0], [0, 0, 0, 1, 1, 1], components=comps)
    adv = advantages([{"dgpo": {"token_ratio": False}}], batch)
    # accuracies: group 0 mean(1, 0) = .5, group 1 mean(1, 0) = .5 -> equal weights of 1
    plain = advantages([{"dgpo": {"token_ratio": False, "difficulty_weighting": False}}], batch)
    torch.testing.assert_close(adv, plain)


def test_bad_config_is_refused():
    with pytest.raises(ConfigError, match="temperature"):
        Composition([{"dgpo": {"temperature": 0.0}}])
    with pytest.raises(ConfigError, match="epsilon"):
        Composition([{"dgpo": {"epsilon": -1.0}}])


def test_metrics():
    comp = Composition(["dgpo"])
    comp.run_advantage_stage(batch_of(CARD_REWARDS, CARD_IDS))
    metrics = comp.pop_metrics()
    assert metrics["plugins/dgpo/valid_token_ratio"] == pytest.approx(1.5)
    assert metrics["plugins/dgpo/frac_valid_groups"] == pytest.approx(2 / 3)
    assert metrics["plugins/dgpo/difficulty_weight_max"] == pytest.approx(1.124353, abs=1e-5)
