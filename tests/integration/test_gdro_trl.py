"""GDRO in TRL's GRPOTrainer: both switches on, composed with GDPO; a start-up conflict message."""

import math

import pytest

pytest.importorskip("trl")
pytest.importorskip("grpo_plugin_gdro")

from grpo_plugins.errors import CompositionError  # noqa: E402
from grpo_plugins_trl.testing import digit_overlap_reward, exact_answer_reward, tiny_grpo_run  # noqa: E402


def logged(trainer, prefix):
    return {key: value for row in trainer.state.log_history for key, value in row.items() if key.startswith(prefix)}


def test_gdro_composed_with_gdpo():
    pytest.importorskip("grpo_plugin_gdpo", reason="the composition partner grpo-plugin-gdpo is not installed")
    trainer = tiny_grpo_run(["gdro", "gdpo"], max_steps=2, reward_funcs=[exact_answer_reward, digit_overlap_reward])
    assert trainer.composition.providers("compute_advantages") == ["gdpo"]
    metrics = logged(trainer, "plugins/gdro/")
    weights = [metrics[f"plugins/gdro/bin_{k}_weight"] for k in range(5)]
    assert sum(weights) == pytest.approx(1.0)
    assert all(r.numel() == trainer.args.generation_batch_size for r in trainer._plugin_rounds)
    assert all(math.isfinite(row["loss"]) for row in trainer.state.log_history if "loss" in row)


def test_two_prompt_samplers_are_refused_at_start_up():
    pytest.importorskip("grpo_plugin_vas", reason="grpo-plugin-vas is not installed")
    with pytest.raises(CompositionError, match="'gdro'.*'vas'.*sample_prompts.*switch the hook off"):
        tiny_grpo_run(["gdro", "vas"], train=False)
