"""COPO in the real TRL GRPOTrainer: two tiny steps alone and composed with round 1's ``vade``; answers are
the decoded completions; the advantages the loss used are COPO's, recomputed from the gathered batch."""

from __future__ import annotations


import pytest

pytest.importorskip("trl")

import torch  # noqa: E402

from grpo_plugin_copo import answer_classes, copo_advantages  # noqa: E402
from grpo_plugins_trl.testing import digit_overlap_reward, finite_losses, tiny_grpo_run  # noqa: E402


@pytest.mark.parametrize(
    "methods", [[{"copo": {"answers": "completion"}}], [{"copo": {"answers": "completion"}}, "vade"]],
    ids=["alone", "with_vade"],
)
def test_tiny_trl_run(methods):
    trainer = tiny_grpo_run(methods, max_steps=2, reward_funcs=digit_overlap_reward)
    assert finite_losses(trainer)
    logged = set().union(*trainer.state.log_history)
    assert {"plugins/copo/mean_local_weight", "plugins/copo/frac_zero_advantage"} <= logged
    if len(methods) == 2:
        assert "plugins/vade/mixed_group_fraction" in logged
    batch = trainer.last_plugin_batch
    assert batch.completions is not None and len(batch.completions) == batch.num_completions
    expected, _ = copo_advantages(
        batch.rewards.float(), answer_classes(batch, "completion"), batch.group_index, batch.num_groups
    )
    torch.testing.assert_close(batch.advantages, expected)
