"""OBLR-PO in real TRL runs (alone and with Unlikeliness) and its baseline against verl's ``opo``."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("trl")
pytest.importorskip("grpo_plugin_oblr_po", reason="grpo-plugin-oblr-po is not installed")

import torch  # noqa: E402

from grpo_plugins import Composition, GRPOBatch  # noqa: E402
from grpo_plugins_trl.testing import digit_overlap_reward, tiny_grpo_run  # noqa: E402


def logged(trainer, key):
    return [row[key] for row in trainer.state.log_history if key in row]


@pytest.mark.parametrize("methods", [["oblr_po"], ["unlikeliness", "oblr_po"]])
def test_two_steps_scale_the_learning_rate(methods):
    pytest.importorskip("grpo_plugin_unlikeliness")
    trainer = tiny_grpo_run(methods, max_steps=2, reward_funcs=digit_overlap_reward)
    factors = logged(trainer, "plugins/update_scale")
    assert len(factors) == 2 and all(0 < f < 1 for f in factors)  # noisy micro-batch gradients shrink the step
    assert factors == pytest.approx(logged(trainer, "plugins/oblr_po/step_factor"))
    stats = trainer.last_plugin_batch.gradient_statistics
    assert stats.unit_sq_norms.shape == (2,) and float(stats.mean_sq_norm) > 0


def test_baseline_equals_verl_opo():
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    torch.manual_seed(1)
    n, width = 12, 8
    lengths = torch.randint(0, width + 1, (n,))
    lengths[0] = 3
    mask = (torch.arange(width) < lengths[:, None]).float()
    prompt_ids = torch.tensor([4, 4, 4, 9, 9, 1, 1, 1, 1, 7, 7, 7])
    rewards = torch.rand(n).round(decimals=1)
    ours = Composition(["oblr_po"]).run_advantage_stage(GRPOBatch(
        prompt_ids=prompt_ids, rewards=rewards, completion_mask=mask, completion_ids=torch.ones(n, width, dtype=torch.long)))
    token_rewards = torch.zeros(n, width)
    token_rewards[:, 0] = rewards  # verl sums the token rewards
    theirs, _ = core_algos.compute_opo_outcome_advantage(token_rewards, mask, np.array(prompt_ids.tolist()))
    torch.testing.assert_close(ours.advantages[:, None] * mask, theirs, rtol=0, atol=1e-7)
