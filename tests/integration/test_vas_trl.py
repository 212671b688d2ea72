"""VAS in TRL's GRPOTrainer: alone (with trajectory diversity) and composed with Knapsack RL."""

import math

import pytest

pytest.importorskip("trl")
pytest.importorskip("grpo_plugin_vas")

from grpo_plugins_trl.testing import tiny_grpo_run  # noqa: E402


def logged(trainer, prefix):
    return {key: value for row in trainer.state.log_history for key, value in row.items() if key.startswith(prefix)}


def test_vas_alone_measures_diversity_and_refreshes():
    trainer = tiny_grpo_run([{"vas": {"ovs_weight": 0.8, "tds_weight": 0.2, "update_every": 1}}], max_steps=2)
    metrics = logged(trainer, "plugins/vas/")
    assert "plugins/vas/trajectory_diversity" in metrics and 0.0 <= metrics["plugins/vas/trajectory_diversity"] <= 1.0
    method = trainer.composition.method("vas")
    assert len(method.table) > 0 and method.last_refresh >= 1
    assert all(math.isfinite(row["loss"]) for row in trainer.state.log_history if "loss" in row)


def test_vas_samples_and_knapsack_allocates():
    pytest.importorskip("grpo_plugin_knapsack_rl", reason="the composition partner grpo-plugin-knapsack-rl is not installed")
    trainer = tiny_grpo_run(["vas", {"knapsack_rl": {"min_rewards": 2}}], max_steps=2)
    assert trainer.composition.providers("sample_prompts") == ["vas"]
    assert trainer.composition.providers("allocate_rollouts") == ["knapsack_rl"]
    assert logged(trainer, "plugins/vas/") and logged(trainer, "plugins/knapsack_rl/")
    assert all(r.numel() == trainer.args.generation_batch_size for r in trainer._plugin_rounds)
