"""DisCO on the real TRL trainer: alone (whole groups, the objective and the constraint logged) and
composed with a round-1 method."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("trl")
pytest.importorskip("grpo_plugin_disco")

from grpo_plugins_trl.testing import tiny_grpo_run  # noqa: E402


def rows(trainer, key):
    return [row[key] for row in trainer.state.log_history if key in row]


def test_disco_alone_and_composed():
    trainer = tiny_grpo_run(["disco"], max_steps=2, num_iterations=2)
    assert rows(trainer, "plugins/disco/objective") and rows(trainer, "plugins/disco/kl_old")
    assert all(math.isfinite(v) for v in rows(trainer, "loss"))
    composed = tiny_grpo_run(["unlikeliness", {"disco": {"objective": "basic"}}], max_steps=2)
    assert rows(composed, "plugins/disco/constraint") and all(math.isfinite(v) for v in rows(composed, "loss"))
