"""Polychromic: the card's worked example by hand, the exact n = 1 cross-check with GRPO, the seeded
random subsets, and edge cases."""

from __future__ import annotations

import pytest
import torch

from grpo_plugins import Composition, GRPOBatch
from grpo_plugins.errors import BatchError, ConfigError, PluginError
from grpo_plugins.registry import resolve
from grpo_plugin_polychromic import polychromic_advantages


def batch_of(rewards, prompt_ids, completions=None, step=0) -> GRPOBatch:
    return GRPOBatch(
        prompt_ids=torch.tensor(prompt_ids),
        rewards=torch.tensor(rewards, dtype=torch.float32),
        completions=completions,
        step=step,
    )


def advantages(methods, batch):
    return Composition(methods).run_advantage_stage(batch).advantages


def test_discovered():
    assert resolve("polychromic").load().paper == "https://arxiv.org/abs/2509.25424"


def test_card_worked_example():
    # keys [a, a, b, c], r [1, 1, 0, 1], n = 2: the six pairs score .5, .5, 1, .5, 1, .5 -> b = 4/6
    # A_0 = mean(.5, .5, 1) - 4/6 = 0, A_1 = 0, A_2 = mean(.5, .5, .5) - 4/6 = -1/6, A_3 = mean(1, 1, .5) - 4/6 = 1/6
    batch = batch_of([1, 1, 0, 1], [0] * 4, completions=["a", "a", "b", "c"])
    adv = advantages([{"polychromic": {"set_size": 2}}], batch)
    assert adv.tolist() == pytest.approx([0.0, 0.0, -1 / 6, 1 / 6], abs=1e-6)
    # the distinguishing property: GRPO (without std) gives a, a and c the same advantage
    grpo = advantages([{"grpo": {"scale": "none"}}], batch_of([1, 1, 0, 1], [0] * 4))
    assert grpo[0] == grpo[1] == grpo[3]
    assert adv[3] > adv[0]


def test_set_size_one_equals_grpo_without_std_exactly():
    gen = torch.Generator().manual_seed(3)
    rewards = torch.rand(23, generator=gen) * 5 - 1
    ids = torch.tensor([4, 1, 1, 9, 4, 9, 1, 4, 9, 9, 2, 2, 4, 1, 2, 9, 4, 1, 2, 2, 9, 4, 1])  # uneven, shuffled
    texts = [str(i % 3) for i in range(23)]
    poly = advantages([{"polychromic": {"set_size": 1}}], batch_of(rewards.tolist(), ids.tolist(), texts))
    grpo = advantages([{"grpo": {"scale": "none"}}], batch_of(rewards.tolist(), ids.tolist()))
    # the same sums (polychromic's in float64, GRPO's in float32): equal up to float32 rounding
    assert torch.allclose(poly, grpo, rtol=1e-6, atol=1e-6)


def test_random_subsets_are_seeded_by_step_and_approach_the_exact_value():
    rewards = [1, 0, 1, 1, 0, 1, 0, 1]
    texts = ["a", "b", "a", "c", "d", "c", "b", "e"]
    config = {"set_size": 4, "num_subsets": 16}  # C(8, 4) = 70 > 16: random subsets
    first = advantages([{"polychromic": config}], batch_of(rewards, [0] * 8, texts, step=5))
    again = advantages([{"polychromic": config}], batch_of(rewards, [0] * 8, texts, step=5))
    other_step = advantages([{"polychromic": config}], batch_of(rewards, [0] * 8, texts, step=6))
    other_seed = advantages([{"polychromic": {**config, "seed": 1}}], batch_of(rewards, [0] * 8, texts, step=5))
    assert torch.equal(first, again)
    assert not torch.equal(first, other_step)
    assert not torch.equal(first, other_seed)
    # the generator is exactly the documented one
    keys = torch.tensor([0, 1, 0, 2, 3, 2, 1, 4])
    by_hand, _ = polychromic_advantages(
        torch.tensor(rewards, dtype=torch.float32), keys, torch.zeros(8, dtype=torch.long), 1, 4, 16,
        torch.Generator().manual_seed(0 * 1_000_003 + 5),
    )
    torch.testing.assert_close(first, by_hand)
    exact = advantages([{"polychromic": {"set_size": 4, "num_subsets": 70}}], batch_of(rewards, [0] * 8, texts))
    many, _ = polychromic_advantages(
        torch.tensor(rewards, dtype=torch.float32), keys, torch.zeros(8, dtype=torch.long), 1, 4, 20000,
        torch.Generator().manual_seed(1),
    )
    torch.testing.assert_close(many, exact, atol=0.01, rtol=0)


def test_constant_groups_and_identical_keys_give_zero():
    for value in (0.3, 1e6):
        adv = advantages([{"polychromic": {"set_size": 2}}], batch_of([value] * 4, [0] * 4, ["x"] * 4))
        assert adv.tolist() == [0.0] * 4
    # equal rewards but different keys are not constant: diversity alone moves the advantage
    adv = advantages([{"polychromic": {"set_size": 2}}], batch_of([1.0] * 4, [0] * 4, ["x", "x", "y", "z"]))
    assert adv[2] > 0 > adv[0]


def test_equal_rewards_with_distinct_keys_give_exactly_zero_at_any_scale():
    # 8 distinct keys, every reward 1e4 / 7, n = 3: every one of the 56 sets scores 1e4 / 7 * 3 / 3, so
    # every A_i = mean of equal scores - the same mean = 0 exactly (not a float32 residue of the sums)
    batch = batch_of([1e4 / 7] * 8, [0] * 8, completions=list("abcdefgh"))
    adv = advantages([{"polychromic": {"set_size": 3}}], batch)
    assert adv.tolist() == [0.0] * 8


def test_uneven_groups_shuffled_and_too_small_groups():
    # group 7: keys [p, q, p], r [1, 1, 0], n = 2 -> pairs (0,1): 1, (0,2): .25, (1,2): .5; b = 1.75/3
    # group 2: keys [u, v], r [0, 1] -> one pair .5, b = .5, both 0
    rewards = [1, 0, 1, 1, 0]
    ids = [7, 2, 7, 2, 7]
    texts = ["p", "u", "q", "v", "p"]
    adv = advantages([{"polychromic": {"set_size": 2}}], batch_of(rewards, ids, texts))
    b = 1.75 / 3
    assert adv.tolist() == pytest.approx([(1 + 0.25) / 2 - b, 0.0, (1 + 0.5) / 2 - b, 0.0, (0.25 + 0.5) / 2 - b], abs=1e-6)
    with pytest.raises(PluginError, match=r"polychromic.*at least 3 completions.*\[2\]"):
        advantages([{"polychromic": {"set_size": 3}}], batch_of(rewards, ids, texts))


def test_group_of_one_with_set_size_one_is_zero():
    adv = advantages([{"polychromic": {"set_size": 1}}], batch_of([1, 0, 1], [3, 3, 8], ["a", "b", "c"]))
    assert adv.tolist() == [0.5, -0.5, 0.0]


def test_scale_by_std_option_and_keys_from_reward_or_function():
    batch = batch_of([1, 1, 0, 1], [0] * 4, completions=["a", "a", "b", "c"])
    scaled = advantages([{"polychromic": {"set_size": 2, "scale_by_std": True}}], batch)
    std = torch.tensor([0.0, 0.0, -1 / 6, 1 / 6]).std().item()
    assert scaled.tolist() == pytest.approx([0.0, 0.0, -1 / 6 / (std + 1e-6), 1 / 6 / (std + 1e-6)], abs=1e-5)
    by_reward = advantages([{"polychromic": {"set_size": 2, "diversity_key": "reward"}}], batch_of([1, 1, 0, 1], [0] * 4))
    # keys = rewards: pairs (0,1) 1*.5, (0,2) .5, (0,3) .5, (1,2) .5, (1,3) .5, (2,3) .5 -> b = 3/6
    assert by_reward.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0], abs=1e-6)
    by_len = advantages([{"polychromic": {"set_size": 2, "diversity_key": "builtins:len"}}], batch)
    # every text has length 1: one key, so d(S) = 1/2 for every pair; scores .5, .25, .5, .25, .5, .25, b = .375
    assert by_len.tolist() == pytest.approx([1 / 24, 1 / 24, -1 / 8, 1 / 24], abs=1e-6)
    with pytest.raises(PluginError, match="needs the decoded completions"):
        advantages(["polychromic"], batch_of([1, 0, 1, 0], [0] * 4))


def test_negative_rewards_are_refused_when_sets_have_diversity():
    # keys [a, a, b, c], n = 2, all rewards -1: f(S) = -d(S) would push the duplicates a, a up
    # (A = [+1/12, +1/12, -1/12, -1/12]); the card's example shifted by -1 ([0, 0, -1, 0]) likewise
    for rewards in ([-1.0, -1.0, -1.0, -1.0], [0.0, 0.0, -1.0, 0.0]):
        with pytest.raises(PluginError, match=r"polychromic with set_size=2 needs rewards >= 0 \(got a minimum of -1\)"):
            advantages([{"polychromic": {"set_size": 2}}], batch_of(rewards, [0] * 4, ["a", "a", "b", "c"]))
    with pytest.raises(ValueError, match="rewards >= 0"):
        polychromic_advantages(torch.tensor([1.0, -0.5]), torch.tensor([0, 1]), torch.tensor([0, 0]), 1, set_size=2)
    # n = 1 has d(S) = 1: any reward is fine (GRPO without the std); r = 0 is fine for every n
    assert advantages([{"polychromic": {"set_size": 1}}], batch_of([-1.0, -3.0], [0, 0], ["a", "b"])).tolist() == [1.0, -1.0]
    zero = advantages([{"polychromic": {"set_size": 2}}], batch_of([0.0, 0.0, 0.0], [0] * 3, ["a", "a", "b"]))
    assert zero.tolist() == [0.0, 0.0, 0.0]


def test_config_and_nan_rewards():
    with pytest.raises(ConfigError, match="set_size"):
        Composition([{"polychromic": {"set_size": 0}}])
    with pytest.raises(ConfigError, match="diversity_key"):
        Composition([{"polychromic": {"diversity_key": "answer"}}])
    with pytest.raises(BatchError, match="NaN"):
        advantages([{"polychromic": {"set_size": 1}}], batch_of([1.0, float("nan")], [0, 0], ["a", "b"]))
    comp = Composition([{"polychromic": {"set_size": 2}}])
    comp.run_advantage_stage(batch_of([1, 1, 0, 1], [0] * 4, completions=["a", "a", "b", "c"]))
    metrics = comp.pop_metrics()
    assert metrics["plugins/polychromic/mean_set_score"] == pytest.approx(4 / 6)
    assert metrics["plugins/polychromic/distinct_keys_per_group"] == 3.0
