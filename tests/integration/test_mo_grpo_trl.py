"""MO-GRPO in the real TRL GRPOTrainer: equal to TRL's own ``reward_weights`` with the normalised aspect
weights (the cross-check), two tiny steps alone, and composed with round 1's ``gdpo`` (multi-reward)."""

from __future__ import annotations


import pytest

pytest.importorskip("trl")

import torch  # noqa: E402

from grpo_plugins import Composition, GRPOBatch  # noqa: E402
from grpo_plugins_trl.testing import (  # noqa: E402
    completion_text,
    digit_overlap_reward,
    exact_answer_reward,
    finite_losses,
    recording_trl,
    tiny_grpo_run,
)

WEIGHTS = [2.0, 1.0, 1.0]
NORMALISED = torch.tensor(WEIGHTS) / sum(WEIGHTS)


def safety(completions, **kwargs):
    """Aspect 'safety' (a stand-in score): fewer characters is safer."""
    return [1.0 / (1 + len(completion_text(c))) for c in completions]


def helpfulness(completions, answer, **kwargs):
    """Aspect 'helpfulness': the dense digit-overlap score."""
    return digit_overlap_reward(completions, answer)


def truthfulness(completions, answer, **kwargs):
    """Aspect 'truthfulness': exact answer."""
    return exact_answer_reward(completions, answer)


ASPECTS = [safety, helpfulness, truthfulness]


RecordingTRL = recording_trl()


def test_equals_trl_reward_weights():
    """One real TRL step with reward_weights = the normalised aspect weights; MO-GRPO (trainer weights 1) on the
    rewards TRL gathered gives TRL's rewards bit for bit and TRL's advantages."""
    trainer = tiny_grpo_run(None, trainer_cls=RecordingTRL, max_steps=1, reward_funcs=ASPECTS,
                            reward_weights=NORMALISED.tolist())
    rewards = trainer.recorded_rewards  # (8, 3): two prompts, consecutive blocks of num_generations = 4
    n = rewards.shape[0]
    groups = torch.arange(n) // 4
    assert bool((rewards.view(-1, 4, 3).std(dim=1) > 0).any()), "degenerate rollout: constant rewards"
    batch = GRPOBatch(prompt_ids=groups, rewards=rewards.nansum(1), reward_components=rewards,
                      reward_names=("safety", "helpfulness", "truthfulness"), reward_weights=torch.ones(3))
    ours = Composition([{"mo_grpo": {"weights": WEIGHTS}}], defaults={"grpo": {"epsilon": 1e-4}}).run_advantage_stage(batch)
    assert torch.equal(ours.rewards, (rewards * NORMALISED.unsqueeze(0)).nansum(dim=1))  # TRL's own sum
    torch.testing.assert_close(ours.advantages, trainer.recorded_advantages, atol=1e-5, rtol=1e-5)


def test_mo_grpo_alone():
    trainer = tiny_grpo_run([{"mo_grpo": {"weights": WEIGHTS}}], max_steps=2, reward_funcs=ASPECTS)
    assert finite_losses(trainer)
    assert any("plugins/mo_grpo/mean_safety" in row for row in trainer.state.log_history)
    batch = trainer.last_plugin_batch
    assert batch.reward_names == ("safety", "helpfulness", "truthfulness")
    torch.testing.assert_close(batch.rewards, (batch.reward_components * NORMALISED).sum(1))


def test_mo_grpo_with_gdpo_normalises_each_aspect_with_its_weight():
    """mo_grpo hands its normalised weights to gdpo: the advantages are GDPO's with weights (0.5, 0.25, 0.25)."""
    from grpo_plugin_gdpo import gdpo_advantages

    trainer = tiny_grpo_run([{"mo_grpo": {"weights": WEIGHTS}}, "gdpo"], max_steps=2, reward_funcs=ASPECTS)
    assert finite_losses(trainer)
    assert any("plugins/gdpo/distinct_advantages_per_group" in row for row in trainer.state.log_history)
    batch = trainer.last_plugin_batch
    torch.testing.assert_close(batch.reward_weights, NORMALISED)
    expected = gdpo_advantages(batch.reward_components, NORMALISED, batch.group_index, batch.num_groups)
    torch.testing.assert_close(batch.advantages, expected)
