"""BNPO in the real TRL GRPOTrainer: two tiny steps alone and composed with round 1's ``llds``; the advantages
the loss used are BNPO's, recomputed from the gathered batch by the plugin's tensor function."""

from __future__ import annotations


import pytest

pytest.importorskip("trl")

import torch  # noqa: E402

from grpo_plugin_bnpo import bnpo_advantages  # noqa: E402
from grpo_plugins_trl.testing import digit_overlap_reward, finite_losses, tiny_grpo_run  # noqa: E402


def unit_overlap_reward(completions, answer, **kwargs):
    """The dense digit-overlap score clipped to [0, 1] (BNPO's default reward range)."""
    return [min(max(x, 0.0), 1.0) for x in digit_overlap_reward(completions, answer)]


@pytest.mark.parametrize("methods", [["bnpo"], ["bnpo", "llds"]], ids=["alone", "with_llds"])
def test_tiny_trl_run(methods):
    extra = {"num_iterations": 2} if "llds" in methods else {}
    trainer = tiny_grpo_run(methods, max_steps=2, reward_funcs=unit_overlap_reward, **extra)
    assert finite_losses(trainer)
    rows = [row for row in trainer.state.log_history if "plugins/bnpo/alpha" in row]
    assert rows and all(row["plugins/bnpo/alpha"] >= 1 and row["plugins/bnpo/beta"] >= 1 for row in rows)
    if "llds" in methods:
        assert any("plugins/llds/llds" in row for row in trainer.state.log_history)
    batch = trainer.last_plugin_batch
    expected, _, _ = bnpo_advantages(batch.rewards.float(), batch.group_index, batch.num_groups)
    torch.testing.assert_close(batch.advantages, expected)
