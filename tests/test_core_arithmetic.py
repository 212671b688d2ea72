"""The built-in ``grpo``'s trainer arithmetics (``grpo_plugins.arithmetic``) against the trainers' own
formulas written out here, and its options: hand-computed values, constant groups exactly 0, groups of
one, TRL's ``normalize_then_sum``. (The adapters' tests compare with TRL's and verl's real code.)"""

import math

import pytest
import torch

from grpo_plugins import Composition
from grpo_plugins.arithmetic import group_mean_std, stacked_groups, two_pass_std
from grpo_plugins.errors import ConfigError
from grpo_plugins.testing import make_batch


def shuffled_groups(sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    index = index[torch.randperm(index.numel(), generator=gen)]
    return index, torch.randn(index.numel(), generator=gen) * 3 + 0.3


def test_stacked_groups_keep_batch_order_per_size():
    index = torch.tensor([1, 0, 1, 2, 0, 1])
    values = torch.arange(6.0)
    stacks = {tuple(groups.tolist()): stacked.tolist() for groups, stacked in stacked_groups(values, index, 3)}
    assert stacks == {(2,): [[3.0]], (0,): [[1.0, 4.0]], (1,): [[0.0, 2.0, 5.0]]}


def test_verl_arithmetic_is_torch_mean_and_std_of_each_group():
    sizes = [2, 7, 3, 7, 1, 64, 2, 3]
    index, values = shuffled_groups(sizes)
    mean, std = group_mean_std(values, index, len(sizes), "verl")
    for g, size in enumerate(sizes):
        group = values[index == g]  # batch order, as verl stacks a group
        if size > 1:
            assert torch.equal(mean[g], torch.mean(group)) and torch.equal(std[g], torch.std(group))
        else:  # verl scores a group of one against mean 0, std 1
            assert (mean[g].item(), std[g].item()) == (0.0, 1.0)


def test_trl_arithmetic_is_nanmean_and_two_pass_std_of_each_row():
    sizes = [4] * 6
    index, values = shuffled_groups(sizes, seed=1)
    values[3] = torch.nan  # ignored, as TRL ignores an unscorable row
    mean, std = group_mean_std(values, index, len(sizes), "trl")
    for g in range(len(sizes)):
        group = values[index == g]
        kept = group[~torch.isnan(group)]
        row_mean = torch.nanmean(group)
        variance = torch.nanmean((group - row_mean) ** 2) * (len(kept) / (len(kept) - 1))
        assert torch.equal(mean[g], row_mean) and torch.equal(std[g], torch.sqrt(variance))
        assert std[g].item() == pytest.approx(statistics_std(kept.tolist()), rel=1e-5)


def statistics_std(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def test_two_pass_std_by_hand_and_undefined_for_one_value():
    assert two_pass_std(torch.tensor([1.0, 2.0, 4.0])).item() == pytest.approx(math.sqrt(7 / 3))
    assert two_pass_std(torch.tensor([1.0, torch.nan, 3.0])).item() == pytest.approx(math.sqrt(2.0))
    assert math.isnan(two_pass_std(torch.tensor([5.0])).item())


def grpo(batch, **config):
    composition = Composition([{"grpo": config}])
    composition.run_advantage_stage(batch)
    return batch.advantages


@pytest.mark.parametrize("arithmetic", ["segments", "trl", "verl"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_every_arithmetic_gives_the_same_advantages_to_rounding(arithmetic, scale):
    rewards = [0.0, 1.0, 0.25] + [123.4] * 4 + [2.0, 3.0, 0.5, 0.5, 0.7]
    reference = grpo(make_batch((3, 4, 5), rewards=rewards, shuffle=False), scale=scale)
    advantages = grpo(make_batch((3, 4, 5), rewards=rewards, shuffle=False), scale=scale, arithmetic=arithmetic)
    assert torch.allclose(advantages, reference, atol=1e-6)
    constant = torch.arange(12).ge(3) & torch.arange(12).lt(7)
    assert bool((advantages[constant] == 0).all())  # exactly 0 at reward 123.4, whatever the arithmetic
    assert bool((advantages[~constant] != 0).any())


def test_hand_computed_group_advantages_in_trl_arithmetic():
    batch = make_batch((2, 2), rewards=[1.0, 0.0, 0.0, 0.0], shuffle=False)
    advantages = grpo(batch, arithmetic="trl", epsilon=1e-4)
    std = math.sqrt(0.5)  # unbiased std of {1, 0}
    assert advantages.tolist() == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.0, 0.0])


def test_groups_of_one_are_scored_as_verl_scores_them_and_refused_otherwise():
    batch = make_batch((1, 3), rewards=[2.0, 1.0, 0.0, 0.0], shuffle=False)
    assert grpo(batch, arithmetic="verl").tolist()[0] == pytest.approx(2.0 / (1 + 1e-6))
    with pytest.raises(Exception, match="at least 2 completions"):
        grpo(make_batch((1, 3), rewards=[2.0, 1.0, 0.0, 0.0], shuffle=False), arithmetic="trl")


def test_normalize_then_sum_by_hand():
    """Two reward functions, weights (1, 2): each z-scored in its group, summed, z-scored over the batch."""
    components = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.0, 3.0]])
    batch = make_batch((2, 2), rewards=components @ torch.tensor([1.0, 2.0]), shuffle=False,
                       reward_components=components, reward_weights=torch.tensor([1.0, 2.0]))
    advantages = grpo(batch, aggregation="normalize_then_sum", epsilon=1e-4)
    z = 0.5 / (math.sqrt(0.5) + 1e-4)  # a two-member group's z-score of {1, 0}
    # group 1: function 1 z-scores (z, -z), function 2 is constant there: exactly 0
    # group 2: function 1 (z, -z), function 2 {1, 3} -> (-z3, z3) weighted 2
    z3 = 1.0 / (math.sqrt(2.0) + 1e-4)
    summed = [z, -z, z - 2 * z3, -z + 2 * z3]
    mean = sum(summed) / 4
    std = statistics_std(summed)
    assert advantages.tolist() == pytest.approx([(s - mean) / (std + 1e-4) for s in summed], rel=1e-5)


def test_normalize_then_sum_of_a_constant_batch_is_exactly_zero():
    components = torch.full((6, 2), 7.3)
    batch = make_batch((3, 3), rewards=components.sum(1), reward_components=components,
                       reward_weights=torch.ones(2))
    assert bool((grpo(batch, aggregation="normalize_then_sum") == 0).all())


def test_normalize_then_sum_is_not_computed_in_verls_arithmetic():
    with pytest.raises(ConfigError, match="normalize_then_sum"):
        Composition([{"grpo": {"aggregation": "normalize_then_sum", "arithmetic": "verl"}}])
