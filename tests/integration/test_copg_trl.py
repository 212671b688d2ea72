"""CoPG on the real TRL trainer: alone (reference log-probs at beta=0, whole groups) and composed with a
round-1 reward-shaping method."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("trl")
pytest.importorskip("grpo_plugin_copg")

from grpo_plugins_trl.testing import digit_overlap_reward, tiny_grpo_run  # noqa: E402


def rows(trainer, key):
    return [row[key] for row in trainer.state.log_history if key in row]


def test_copg_alone_and_composed():
    trainer = tiny_grpo_run([{"copg": {"beta": 0.2}}], max_steps=2, reward_funcs=digit_overlap_reward)
    pairwise, losses = rows(trainer, "plugins/copg/pairwise"), rows(trainer, "loss")
    # the policy surrogate is 0 and beta = 0: the loss is the pairwise objective
    assert pairwise and all(math.isfinite(v) and v >= 0 for v in pairwise)
    assert losses == pytest.approx(pairwise, rel=1e-5, abs=1e-8)
    composed = tiny_grpo_run(["unlikeliness", "copg"], max_steps=2, reward_funcs=digit_overlap_reward, beta=0.04)
    assert rows(composed, "plugins/copg/pairwise") and all(math.isfinite(v) for v in rows(composed, "loss"))
