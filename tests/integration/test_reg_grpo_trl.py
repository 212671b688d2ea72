"""Reg-GRPO on the real TRL trainer: alone and composed with a round-1 method."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("trl")
pytest.importorskip("grpo_plugin_reg_grpo")

from grpo_plugins_trl.testing import digit_overlap_reward, tiny_grpo_run  # noqa: E402


def rows(trainer, key):
    return [row[key] for row in trainer.state.log_history if key in row]


def test_reg_grpo_alone_and_composed():
    trainer = tiny_grpo_run(["reg_grpo"], max_steps=2, num_iterations=2, reward_funcs=digit_overlap_reward)
    regression = rows(trainer, "plugins/reg_grpo/regression")
    assert regression and all(math.isfinite(v) and v >= 0 for v in regression)
    assert rows(trainer, "loss") == pytest.approx(regression, rel=1e-5, abs=1e-8)  # the only loss
    composed = tiny_grpo_run(["unlikeliness", "reg_grpo", "llds"], max_steps=2, reward_funcs=digit_overlap_reward)
    assert rows(composed, "plugins/reg_grpo/regression") and rows(composed, "plugins/llds/llds")
