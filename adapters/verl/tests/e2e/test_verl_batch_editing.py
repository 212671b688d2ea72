"""Batch editing through verl's own training loop (``PPOTrainer.fit``) on CPU: ``keep_rows`` decides in verl's
V1 DAPO filter, verl's replay buffer refills the dropped groups with new prompts, and the cost is logged.
See :mod:`grpo_plugins_verl.cpu_fit` for the stand-ins."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import grpo_plugins_verl
from grpo_plugins import Method, PluginError, hookimpl
from grpo_plugins.batch_editing import RefillExhausted
from grpo_plugins_verl.cpu_fit import compose_config, run_fit
from grpo_plugins_verl.refill import PluginReplayBuffer

pytestmark = pytest.mark.e2e

REWARD = Path(__file__).with_name("reward.py")
STEPS = ("trainer.total_training_steps=2", "trainer.save_freq=-1", "trainer.resume_mode=disable")


class KeepOneInFour(Method):
    """Keeps the groups of prompts whose dataset index is 1 mod 4, drops the others; records what it saw
    and what trained."""

    name = "keep_one_in_four"

    def __init__(self):
        super().__init__()
        self.trained, self.seen = [], []

    def requires(self):
        return {"completions"}

    @hookimpl
    def keep_rows(self, batch):
        self.seen.append(batch)
        return batch.prompt_ids % 4 == 1

    @hookimpl
    def observe(self, batch, step):
        self.trained.append(batch.prompt_ids.clone())


class DropAll(Method):
    name = "drop_all"

    @hookimpl
    def keep_rows(self, batch):
        return torch.zeros_like(batch.rewards, dtype=torch.bool)


def test_keep_rows_groups_are_refilled_by_verl_replay_buffer(tiny_assets, ray_cluster):
    method = KeepOneInFour()
    grpo_plugins_verl.configure([method])
    config = compose_config([], tiny_assets, REWARD, STEPS)
    result = run_fit(config)
    assert isinstance(result.trainer.replay_buffer, PluginReplayBuffer)
    assert result.trainer.config.data.gen_batch_size == 1  # verl's exact refill: one prompt per fetch
    assert len(method.trained) == 2 and all(bool((ids % 4 == 1).all()) for ids in method.trained)  # kept groups only
    assert result.rollout_counts == [[4, 4], [4, 4]]  # each step still trains 2 whole groups
    dropped = sum(step["batch_editing/dropped_groups"] for step in result.metrics)
    assert dropped > 0 and dropped == sum(step["training/filter_groups/evicted_samples"] for step in result.metrics
                                          if "training/filter_groups/evicted_samples" in step)
    for step in result.metrics:
        assert step["batch_editing/rollouts"] == 4 * (2 + step["batch_editing/refill_prompts"])
        assert step["batch_editing/refill_rollouts"] == 4 * step["batch_editing/refill_prompts"]
        assert step["batch_editing/generation_rounds"] == 1 + step["batch_editing/refill_rounds"]
        assert math.isfinite(step["actor/pg_loss"])
    assert any(step["batch_editing/refill_rounds"] > 0 for step in result.metrics)
    # keep_rows sees the scored rows as inject_rows and the advantage stage do: tokens, texts, the current step
    assert {batch.step for batch in method.seen} == {0, 1}
    for batch in method.seen:
        n = batch.num_completions
        assert batch.completion_ids.shape == batch.completion_mask.shape and batch.completion_ids.shape[0] == n
        assert len(batch.prompts) == n and len(batch.completions) == n
        assert all(isinstance(text, str) for text in batch.completions)


def test_prs_vspo_with_verl_own_filter_groups(tiny_assets, ray_cluster, monkeypatch):
    """prs_vspo's keep_rows and verl's own dynamic sampling (algorithm.filter_groups on the e2e reward's total)
    together, with prs_vspo's value-based sampler planning every refill round."""
    pytest.importorskip("grpo_plugin_prs_vspo")
    import json

    monkeypatch.setenv("GRPO_PLUGINS_E2E_REWARDS", json.dumps({"names": ["format", "accuracy"], "values": [0.0, 1.0]}))
    methods = ["prs_vspo"]
    overrides = [*STEPS, "algorithm.filter_groups.enable=True", "algorithm.filter_groups.metric=score",
                 "+algorithm.grpo_plugins_reward_keys=[format,accuracy]"]
    result = run_fit(compose_config(methods, tiny_assets, REWARD, overrides))
    assert len(result.metrics) == 2 and result.trainer.replay_buffer.filter_groups_metric == "score"
    for step in result.metrics:
        assert math.isfinite(step["actor/pg_loss"]) and step["batch_editing/rollouts"] >= 8
        assert "plugins/prs_vspo/replaced_group_fraction" in step


def test_refills_beyond_max_num_gen_batches_stop_the_run(tiny_assets, ray_cluster):
    grpo_plugins_verl.configure([DropAll()])
    config = compose_config([], tiny_assets, REWARD, [*STEPS, "algorithm.filter_groups.max_num_gen_batches=2"])
    with pytest.raises((RefillExhausted, PluginError), match=r"drop_all.*max_num_gen_batches=2"):
        run_fit(config)
