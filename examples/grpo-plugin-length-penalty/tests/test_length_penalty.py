"""The example plugin, enabled by name through its installed entry point."""

import pytest
import torch

from grpo_plugins import ConfigError, GRPOBatch, PluginError
from grpo_plugins.registry import resolve
from grpo_plugins.testing import make_batch


def contiguous_batch(rewards, lengths, prompt_ids, num_tokens=5):
    mask = (torch.arange(num_tokens) < torch.tensor(lengths)[:, None]).float()
    return GRPOBatch(prompt_ids=torch.tensor(prompt_ids), rewards=torch.tensor(rewards), completion_mask=mask)


def test_discovered_from_its_distribution():
    info = resolve("length_penalty")
    assert info.distribution == "grpo-plugin-length-penalty"
    assert info.version == "0.1.0"
    assert info.load().__module__ == "grpo_plugin_length_penalty"


def test_subtracts_penalty_times_length(enable_methods):
    # lengths 3, 1, 4, 2 at 0.1 per token: 1 - 0.3, 0 - 0.1, 1 - 0.4, 1 - 0.2
    batch = contiguous_batch([1.0, 0.0, 1.0, 1.0], [3, 1, 4, 2], [0, 0, 1, 1])
    composition = enable_methods([{"length_penalty": {"penalty_per_token": 0.1}}])
    composition.run_advantage_stage(batch)
    torch.testing.assert_close(batch.rewards, torch.tensor([0.7, -0.1, 0.6, 0.8]))
    # group 0: shaped (0.7, -0.1), mean 0.3, unbiased std 0.565685 -> A = +-0.4 / 0.565685 = +-0.707106
    # group 1: shaped (0.6, 0.8),  mean 0.7, unbiased std 0.141421 -> A = -+0.1 / 0.141421 = -+0.707103
    torch.testing.assert_close(
        batch.advantages, torch.tensor([0.707106, -0.707106, -0.707103, 0.707103]), atol=1e-5, rtol=0
    )
    assert composition.pop_metrics()["plugins/length_penalty/mean_penalty"] == pytest.approx(0.25)


def test_default_penalty_and_padding_ignored(enable_methods):
    # only the mask counts: tokens beyond it are padding
    batch = contiguous_batch([2.0, 2.0], [5, 0], [3, 3])
    enable_methods(["length_penalty"]).run_advantage_stage(batch)
    torch.testing.assert_close(batch.rewards, torch.tensor([2.0 - 0.005, 2.0]))


def test_zero_penalty_is_identity(enable_methods):
    batch = make_batch(group_sizes=(3, 2, 4, 2))
    before = batch.rewards.clone()
    enable_methods([{"length_penalty": {"penalty_per_token": 0}}]).run_advantage_stage(batch)
    torch.testing.assert_close(batch.rewards, before)


def test_negative_penalty_is_a_config_error(enable_methods):
    with pytest.raises(ConfigError, match=r"length_penalty.*'penalty_per_token' must lie in \[0, inf\)"):
        enable_methods([{"length_penalty": {"penalty_per_token": -0.1}}])


def test_needs_completion_tokens(enable_methods):
    batch = GRPOBatch(prompt_ids=torch.tensor([0, 0]), rewards=torch.tensor([1.0, 0.0]))
    with pytest.raises(PluginError, match="'length_penalty'.*'shape_rewards'.*no completion tokens"):
        enable_methods(["length_penalty"]).run_advantage_stage(batch)
