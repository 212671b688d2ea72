"""craft_gui in the real TRL GRPOTrainer: two tiny steps alone (the curriculum plans the rounds, the
stage advances, the hybrid reward is the weighted mix of two reward functions) and composed with
round 1's ``knapsack_rl`` (craft_gui picks the prompts, knapsack_rl their rollout counts)."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402

from grpo_plugins_trl.testing import digit_overlap_reward, exact_answer_reward, tiny_grpo_run  # noqa: E402

CONFIG = {
    "reward_components": ["exact_answer_reward", "digit_overlap_reward"],
    "reward_weights": [0.7, 0.3],
    "success_component": "exact_answer_reward",
    "stage_steps": 1,  # the random tiny model never passes 0.7 accuracy: advance by steps
}
REWARDS = [exact_answer_reward, digit_overlap_reward]


def logged(trainer, key: str) -> list[float]:
    return [row[key] for row in trainer.state.log_history if key in row]


def test_craft_gui_alone_plans_rounds_advances_and_mixes_rewards():
    trainer = tiny_grpo_run([{"craft_gui": CONFIG}], max_steps=2, reward_funcs=REWARDS)
    assert logged(trainer, "plugins/craft_gui/stage_after_step") == [1.0, 2.0]
    assert logged(trainer, "plugins/craft_gui/eligible_fraction")
    assert trainer._plugin_rounds  # the rounds came from the plugin sampler
    batch = trainer.last_plugin_batch
    components = batch.reward_components.double()
    expected = 0.7 * components[:, 0] + 0.3 * components[:, 1]
    torch.testing.assert_close(batch.rewards.double(), expected, rtol=1e-6, atol=1e-6)
    method = trainer.composition.method("craft_gui")
    assert int(method.table.columns["visits"].sum()) == 4  # two rounds of two prompts observed
    assert all(math.isfinite(x) for x in logged(trainer, "loss"))


def test_craft_gui_composed_with_knapsack_rl():
    trainer = tiny_grpo_run([{"craft_gui": CONFIG}, "knapsack_rl"], max_steps=2, reward_funcs=REWARDS)
    assert trainer.composition.providers("sample_prompts") == ["craft_gui"]
    assert trainer.composition.providers("allocate_rollouts") == ["knapsack_rl"]
    assert logged(trainer, "plugins/craft_gui/stage_after_step")
    assert any(key.startswith("plugins/knapsack_rl/") for row in trainer.state.log_history for key in row)
    assert all(math.isfinite(x) for x in logged(trainer, "loss"))


def test_missing_reward_component_stops_the_first_batch():
    with pytest.raises(Exception, match=r"craft_gui.*\['judge'\]"):
        tiny_grpo_run([{"craft_gui": {"reward_components": ["judge"]}}], max_steps=1)
