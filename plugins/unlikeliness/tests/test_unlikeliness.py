"""Tests of the unlikeliness reward: the card's worked example by hand, uneven and degenerate groups,
clear errors, and what distinguishes it from plain GRPO."""

from __future__ import annotations

import pytest
import torch

from grpo_plugins import BatchError, Composition, ConfigError, GRPOBatch, PluginError
from grpo_plugins.testing import make_batch
from grpo_plugins.ops import group_ranks
from grpo_plugin_unlikeliness import Unlikeliness, sequence_scores, unlikeliness_rewards


def batch_with_scores(prompt_ids, rewards, scores, lengths, num_tokens: int = 5) -> GRPOBatch:
    """A batch whose completions have the given lengths and a constant token log-prob equal to the score
    (so the mean score is exact); padding holds a large garbage value that must be ignored."""
    lengths = torch.tensor(lengths)
    mask = (torch.arange(num_tokens) < lengths[:, None]).float()
    old = torch.where(mask > 0, torch.tensor(scores, dtype=torch.float32)[:, None].expand(-1, num_tokens), torch.tensor(99.0))
    return make_batch(
        group_sizes=(1,), num_tokens=num_tokens,
        prompt_ids=torch.tensor(prompt_ids), rewards=torch.tensor(rewards, dtype=torch.float32),
        reward_components=None, completion_mask=mask, old_log_probs=old, ref_log_probs=None,
        completion_ids=torch.ones(len(prompt_ids), num_tokens, dtype=torch.long), rows=None,
    )


# ----------------------------------------------------------------------------- the card's example
def test_card_worked_example():
    """G=4, beta=0.25: R=[1,1,0,1], s=[-0.5,-2.0,-1.0,-0.1] -> ranks [2,0,1,3],
    R'=[0.875, 1.0, 0, 0.8125], A ~ [+0.447, +0.722, -1.478, +0.309]."""
    batch = batch_with_scores([7, 7, 7, 7], [1, 1, 0, 1], [-0.5, -2.0, -1.0, -0.1], lengths=[2, 5, 1, 3])
    batch = Composition(["unlikeliness"]).run_advantage_stage(batch)
    torch.testing.assert_close(batch.rewards, torch.tensor([0.875, 1.0, 0.0, 0.8125]))
    # mean 0.671875, std (ddof 1) = sqrt(0.6201171875 / 3) = 0.4546495
    std = (0.6201171875 / 3) ** 0.5
    expected = torch.tensor([0.203125, 0.328125, -0.671875, 0.140625]) / (std + 1e-6)
    torch.testing.assert_close(batch.advantages, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batch.advantages, torch.tensor([0.4468, 0.7217, -1.4778, 0.3093]), rtol=0, atol=1e-4)


def test_card_example_shuffled_among_uneven_groups():
    """The same group, interleaved with a group of 3 (beta rank / 3) and a group of one (unchanged)."""
    prompt_ids = [7, 3, 7, 9, 3, 7, 3, 7]
    rewards = [1, 1, 1, 1, 0, 0, 1, 1]
    scores = [-0.5, -3.0, -2.0, -0.2, -0.1, -1.0, -1.0, -0.1]
    batch = batch_with_scores(prompt_ids, rewards, scores, lengths=[2, 4, 5, 1, 3, 1, 2, 3])
    composition = Composition(["unlikeliness"])
    shaped = composition.method("unlikeliness").shape_rewards(batch=batch, rewards=batch.rewards)
    # group 3 (size 3): scores [-3.0, -0.1, -1.0] -> ranks [0, 2, 1]; rewards [1, 0, 1] -> [1, 0, 1 - 0.25/3]
    # group 9 (size 1): rank 0 -> unchanged
    expected = torch.tensor([0.875, 1.0, 1.0, 1.0, 0.0, 0.0, 1 - 0.25 / 3, 0.8125])
    torch.testing.assert_close(shaped, expected)


def test_sum_score_uses_the_sequence_log_likelihood():
    """One token at -1.0 (mean -1, sum -1) versus four tokens at -0.5 (mean -0.5, sum -2.0)."""
    batch = batch_with_scores([1, 1], [1, 1], [-1.0, -0.5], lengths=[1, 4])
    by_mean = Composition(["unlikeliness"]).method("unlikeliness").shape_rewards(batch=batch, rewards=batch.rewards)
    torch.testing.assert_close(by_mean, torch.tensor([1.0, 1 - 0.25 / 2]))
    by_sum = Composition([{"unlikeliness": {"score": "sum"}}]).method("unlikeliness")
    torch.testing.assert_close(by_sum.shape_rewards(batch=batch, rewards=batch.rewards), torch.tensor([1 - 0.25 / 2, 1.0]))


def test_ties_are_broken_by_batch_position():
    scores = torch.tensor([-1.0, -1.0, -2.0, -1.0, -1.0])
    index = torch.tensor([1, 0, 1, 0, 1])
    # group 0: positions 1, 3 tie -> ranks 0, 1; group 1: positions 0, 2, 4 with -2.0 lowest -> 2:0, 0:1, 4:2
    assert group_ranks(index, 2, scores).tolist() == [1, 0, 0, 1, 2]


# ----------------------------------------------------------------------------- degenerate groups
def test_all_correct_group_is_no_longer_degenerate_and_rarest_gets_most():
    """Plain GRPO gives an all-correct group zero advantages; here the ranks break the tie. An all-wrong
    group stays at zero."""
    batch = batch_with_scores([1, 1, 1, 1, 2, 2], [1, 1, 1, 1, 0, 0], [-0.3, -2.5, -1.0, -0.1, -1.0, -2.0], [3, 3, 3, 3, 2, 2])
    plain = Composition([]).run_advantage_stage(batch_with_scores([1, 1, 1, 1, 2, 2], [1, 1, 1, 1, 0, 0], [0] * 6, [3] * 6))
    assert torch.equal(plain.advantages, torch.zeros(6))
    shaped = Composition(["unlikeliness"]).run_advantage_stage(batch)
    # ranks [2, 0, 1, 3] -> R' = [0.875, 1, 0.9375, 0.8125]: mean 0.90625, std (ddof 1) = sqrt(0.01953125 / 3)
    torch.testing.assert_close(shaped.rewards, torch.tensor([0.875, 1.0, 0.9375, 0.8125, 0.0, 0.0]))
    centred = torch.tensor([-0.03125, 0.09375, 0.03125, -0.09375])
    std = (0.01953125 / 3) ** 0.5  # 0.0806872
    torch.testing.assert_close(shaped.advantages[:4], centred / (std + 1e-6), rtol=1e-5, atol=1e-6)
    assert shaped.advantages[1] == shaped.advantages[:4].max()  # the least likely correct completion
    assert torch.equal(shaped.advantages[4:], torch.zeros(2))


def test_uniform_groups_can_be_left_unshaped_like_the_release_filter():
    batch = batch_with_scores([1, 1, 1, 2, 2], [1, 1, 1, 1, 0], [-0.3, -2.5, -1.0, -0.1, -1.0], [3, 3, 3, 3, 2])
    method = Composition([{"unlikeliness": {"shape_uniform_groups": False}}]).method("unlikeliness")
    # group 1 is all correct: unshaped; group 2: ranks [1, 0] of 2 -> [1 - 0.25 / 2, 0]
    torch.testing.assert_close(method.shape_rewards(batch=batch, rewards=batch.rewards), torch.tensor([1, 1, 1, 0.875, 0]))


def test_group_of_one_keeps_its_reward():
    shaped = unlikeliness_rewards(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([-0.1, -5.0, -0.2]), torch.tensor([0, 1, 2]), 3)
    torch.testing.assert_close(shaped, torch.ones(3))


def test_completion_without_tokens_scores_zero_and_ranks_most_likely():
    """A completion whose tokens are all masked scores 0 (like the release's masked mean), the highest
    possible log-likelihood."""
    batch = batch_with_scores([1, 1, 1], [1, 1, 1], [-0.2, -0.1, -0.3], lengths=[2, 0, 1])
    assert sequence_scores(batch.old_log_probs, batch.completion_mask).tolist() == pytest.approx([-0.2, 0.0, -0.3])
    shaped = Composition(["unlikeliness"]).method("unlikeliness").shape_rewards(batch=batch, rewards=batch.rewards)
    torch.testing.assert_close(shaped, torch.tensor([1 - 0.25 / 3, 1 - 0.25 * 2 / 3, 1.0]))


def test_all_tokens_masked_is_an_error():
    batch = batch_with_scores([1, 1], [1, 0], [-0.2, -0.1], lengths=[0, 0])
    with pytest.raises(BatchError, match="masks every token"):
        Composition(["unlikeliness"]).run_advantage_stage(batch)


# ----------------------------------------------------------------------------- clear errors
def test_nan_rewards_are_a_clear_error():
    batch = batch_with_scores([1, 1], [1, 0], [-0.2, -0.1], lengths=[2, 2])
    batch.rewards = torch.tensor([float("nan"), 1.0])
    with pytest.raises(BatchError, match="NaN"):
        Composition(["unlikeliness"]).run_advantage_stage(batch)
    with pytest.raises(ValueError, match="NaN"):
        unlikeliness_rewards(batch.rewards, torch.zeros(2), torch.zeros(2, dtype=torch.long), 1)


def test_nan_log_probs_are_a_clear_error_but_padding_is_ignored():
    batch = batch_with_scores([1, 1], [1, 1], [-0.2, -0.1], lengths=[2, 3])
    batch.old_log_probs[0, 4] = float("nan")  # padding: ignored
    Composition(["unlikeliness"]).run_advantage_stage(batch)
    batch = batch_with_scores([1, 1], [1, 1], [-0.2, -0.1], lengths=[2, 3])
    batch.old_log_probs[1, 1] = float("nan")
    with pytest.raises(PluginError, match="unlikeliness.*old_log_probs are NaN"):
        Composition(["unlikeliness"]).run_advantage_stage(batch)


def test_missing_old_log_probs_is_a_clear_error():
    batch = make_batch(old_log_probs=None)
    with pytest.raises(PluginError, match="unlikeliness.*no old_log_probs.*requires them"):
        Composition(["unlikeliness"]).run_advantage_stage(batch)


def test_config_is_validated():
    with pytest.raises(ConfigError, match=r"'rank_penalty' must lie in \[0, 1\]"):
        Composition([{"unlikeliness": {"rank_penalty": -0.1}}])
    with pytest.raises(ConfigError, match=r"'rank_penalty' must lie in \[0, 1\], got 5"):  # would rank correct below wrong
        Composition([{"unlikeliness": {"rank_penalty": 5}}])
    with pytest.raises(ConfigError, match="score"):
        Composition([{"unlikeliness": {"score": "median"}}])


# ----------------------------------------------------------------------------- versus plain GRPO
def test_zero_penalty_is_plain_grpo():
    make = lambda: make_batch(group_sizes=(3, 5, 4, 2), num_tokens=6, seed=3)  # noqa: E731
    plain = Composition([]).run_advantage_stage(make())
    shaped = Composition([{"unlikeliness": {"rank_penalty": 0.0}}]).run_advantage_stage(make())
    torch.testing.assert_close(shaped.advantages, plain.advantages)


def test_matches_a_loop_reference_on_uneven_random_groups():
    """An explicit per-group loop (sort each group, ties by position) agrees with the vectorised ranks."""
    gen = torch.Generator().manual_seed(5)
    index = torch.randint(0, 7, (60,), generator=gen)
    scores = torch.randint(-4, 1, (60,), generator=gen).float() / 2  # many ties
    rewards = torch.randint(0, 2, (60,), generator=gen).float()
    expected = torch.empty(60)
    for g in range(7):
        members = [i for i in range(60) if index[i] == g]
        ordered = sorted(members, key=lambda i: (float(scores[i]), i))
        for rank, i in enumerate(ordered):
            expected[i] = rewards[i] * (1 - 0.25 * rank / len(members))
    torch.testing.assert_close(unlikeliness_rewards(rewards, scores, index, 7), expected)


def test_million_token_batch_matches_a_sort_reference():
    """20 000 completions x 50 tokens in 1 250 shuffled groups of 16 (the batch the speed benchmark times:
    benchmarks/methods/): every shaped reward is r (1 - 0.25 rank / 16), the ranks taken from an independent
    double stable sort (by score, then by group; ties by batch position)."""
    n, t = 20_000, 50
    batch = make_batch(group_sizes=(16,) * (n // 16), num_tokens=t, seed=1)
    shaped = Unlikeliness().shape_rewards(batch=batch, rewards=batch.rewards)
    assert shaped.shape == (n,) and torch.isfinite(shaped).all()
    scores = sequence_scores(batch.old_log_probs, batch.completion_mask, "mean")
    by_score = torch.sort(scores, stable=True).indices
    order = by_score[torch.sort(batch.group_index[by_score], stable=True).indices]  # groups of 16 in a row
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n) % 16
    torch.testing.assert_close(shaped, batch.rewards * (1 - 0.25 * rank / 16))
    assert bool((shaped < batch.rewards).any())  # the penalty applied somewhere


def test_metrics_of_the_shaping():
    """Frac of flat groups before/after and the mean reward scale (the composition with sapo's loss is in
    tests/integration/test_round1_compositions.py)."""
    composition = Composition(["unlikeliness"])
    batch = batch_with_scores([1, 1, 1, 1], [1, 1, 1, 1], [-0.3, -2.5, -1.0, -0.1], [3, 3, 3, 3])
    composition.run_advantage_stage(batch)
    metrics = composition.pop_metrics()
    assert metrics["plugins/unlikeliness/frac_flat_groups_before"] == 1.0
    assert metrics["plugins/unlikeliness/frac_flat_groups_after"] == 0.0
    assert metrics["plugins/unlikeliness/mean_reward_scale"] == pytest.approx((0.875 + 1 + 0.9375 + 0.8125) / 4)


# ----------------------------------------------------------------------------- a short real TRL run
