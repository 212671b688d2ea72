"""DGPO in the real TRL GRPOTrainer: two tiny steps alone and composed with round 1's ``knapsack_rl``; the
advantages the loss used are DGPO's, recomputed from the gathered batch by the plugin's tensor functions."""

from __future__ import annotations


import pytest

pytest.importorskip("trl")

import torch  # noqa: E402

from grpo_plugin_dgpo import dgae_advantages, difficulty_weights, group_accuracy, valid_token_ratio  # noqa: E402
from grpo_plugins.ops import segment_max, segment_min  # noqa: E402
from grpo_plugins_trl.testing import digit_overlap_reward, exact_answer_reward, finite_losses, tiny_grpo_run  # noqa: E402


def expected_dgpo(batch) -> torch.Tensor:
    """DGAE x DQW (accuracy = the first reward function) x valid-token ratio, from the batch the loss used."""
    index, groups = batch.group_index, batch.num_groups
    rewards = batch.rewards.float()
    valid = segment_max(rewards, index, groups) > segment_min(rewards, index, groups)
    weights = difficulty_weights(group_accuracy(batch.reward_components[:, 0].float(), index, groups), valid)
    ratio = valid_token_ratio(batch.token_mask.gt(0).sum(-1), valid.index_select(0, index))
    return dgae_advantages(rewards, index, groups) * weights.index_select(0, index) * ratio.float()


@pytest.mark.parametrize("methods", [["dgpo"], ["dgpo", "knapsack_rl"]], ids=["alone", "with_knapsack_rl"])
def test_tiny_trl_run(methods):
    trainer = tiny_grpo_run(methods, max_steps=2, reward_funcs=[exact_answer_reward, digit_overlap_reward])
    assert finite_losses(trainer)
    logged = set().union(*trainer.state.log_history)
    assert {"plugins/dgpo/valid_token_ratio", "plugins/dgpo/frac_valid_groups"} <= logged
    if "knapsack_rl" in methods:
        assert "plugins/knapsack_rl/max_rollouts" in logged
    batch = trainer.last_plugin_batch
    torch.testing.assert_close(batch.advantages, expected_dgpo(batch))
    # DGAE's signature: a group's total |A| is its size G (times S / (S + 1e-4), S its summed |deviation|),
    # whatever its accuracy, before the two batch factors
    rewards, index = batch.rewards.float(), batch.group_index
    dgae = dgae_advantages(rewards, index, batch.num_groups)
    totals = torch.zeros(batch.num_groups).index_add_(0, index, dgae.abs())
    means = torch.zeros(batch.num_groups).index_add_(0, index, rewards) / batch.group_sizes
    deviation = torch.zeros(batch.num_groups).index_add_(0, index, (rewards - means[index]).abs())
    spread = totals > 0
    assert bool(spread.any())
    expected = batch.group_sizes.float() * deviation / (deviation + 1e-4)
    torch.testing.assert_close(totals[spread], expected[spread], atol=1e-4, rtol=1e-4)
