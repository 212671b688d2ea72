"""Polychromic in the real TRL GRPOTrainer: two tiny steps alone and composed with round 1's ``sapo``; the
advantages the loss used are the set advantages drawn with the documented per-step generator."""

from __future__ import annotations


import pytest

pytest.importorskip("trl")

import math  # noqa: E402

import torch  # noqa: E402

from grpo_plugin_polychromic import diversity_keys, polychromic_advantages  # noqa: E402
from grpo_plugins_trl.testing import digit_overlap_reward, finite_losses, tiny_grpo_run  # noqa: E402


def positive_overlap_reward(completions, answer, **kwargs) -> list[float]:
    """``exp`` of the dense test reward: it varies for a random model and is > 0, as polychromic requires."""
    return [math.exp(r) for r in digit_overlap_reward(completions, answer)]


@pytest.mark.parametrize(
    "methods", [[{"polychromic": {"set_size": 2}}], [{"polychromic": {"set_size": 2}}, "sapo"]],
    ids=["alone", "with_sapo"],
)
def test_tiny_trl_run(methods):
    extra = {"num_iterations": 2} if len(methods) == 2 else {}
    trainer = tiny_grpo_run(methods, max_steps=2, reward_funcs=positive_overlap_reward, **extra)
    assert finite_losses(trainer)
    logged = set().union(*trainer.state.log_history)
    assert {"plugins/polychromic/mean_set_score", "plugins/polychromic/distinct_keys_per_group"} <= logged
    if len(methods) == 2:
        assert "plugins/sapo/gate_weight_mean" in logged
    batch = trainer.last_plugin_batch
    expected, _ = polychromic_advantages(
        batch.rewards.float(), diversity_keys(batch, "completion"), batch.group_index, batch.num_groups,
        set_size=2, num_subsets=128, generator=torch.Generator().manual_seed(0 * 1_000_003 + batch.step),
    )
    torch.testing.assert_close(batch.advantages, expected)
