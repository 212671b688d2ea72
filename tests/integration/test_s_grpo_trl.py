"""S-GRPO in the real TRL GRPOTrainer: equal to TRL's own ``reward_weights`` sum of the format, accuracy and
suggestion rewards (the cross-check), two tiny steps alone, and composed with round 1's ``gdpo``."""

from __future__ import annotations


import pytest

pytest.importorskip("trl")

import torch  # noqa: E402

from grpo_plugins import Composition, GRPOBatch  # noqa: E402
from grpo_plugins_trl.testing import (  # noqa: E402
    arithmetic_dataset,
    completion_text,
    finite_losses,
    recording_trl,
    tiny_grpo_run,
)

WEIGHTS = {"format_weight": 0.5, "accuracy_weight": 2.0, "suggestion_weight": 1.5}
TRL_WEIGHTS = [0.5, 2.0, 1.5]


def critic_dataset():
    """The arithmetic prompts with a gold label per prompt (1: the 'proposed action' is correct)."""
    return arithmetic_dataset(16).map(lambda row: {"label": row["prompt_id"] % 2})


def format(completions, **kwargs):  # noqa: A001  (the reward's name is what S-GRPO reads)
    """1 where the output is digits only (the tiny model's 'required sections')."""
    return [float(completion_text(c).isdigit()) for c in completions]


def accuracy(completions, answer, **kwargs):
    """1 where the output starts with the answer's first digit (the critic's verdict matches the label)."""
    return [float(completion_text(c)[:1] == a[:1]) for c, a in zip(completions, answer)]


def suggestion(completions, answer, label, **kwargs):
    """1 where the output contains the answer's last digit; None (not applicable) for correct actions."""
    return [None if lab == 1 else float(a[-1] in completion_text(c)) for c, a, lab in zip(completions, answer, label)]


REWARDS = [format, accuracy, suggestion]


class RecordingTRL(recording_trl()):
    """Plain TRL recording rewards and advantages, and the gold labels of the latest batch."""

    def _calculate_rewards(self, inputs, *args, **kwargs):
        self.recorded_labels = [row["label"] for row in inputs]
        return super()._calculate_rewards(inputs, *args, **kwargs)


def test_equals_trl_reward_weights():
    trainer = tiny_grpo_run(None, trainer_cls=RecordingTRL, max_steps=1, reward_funcs=REWARDS,
                            dataset=critic_dataset(), reward_weights=TRL_WEIGHTS)
    rewards = trainer.recorded_rewards  # (8, 3), NaN suggestion where the action is correct
    n = rewards.shape[0]
    batch = GRPOBatch(
        prompt_ids=torch.arange(n) // 4, rewards=rewards.nansum(1), reward_components=rewards,
        reward_names=("format", "accuracy", "suggestion"), reward_weights=torch.ones(3),
        rows=[{"label": label} for label in trainer.recorded_labels],
    )
    ours = Composition([{"s_grpo": WEIGHTS}], defaults={"grpo": {"epsilon": 1e-4}}).run_advantage_stage(batch)
    assert torch.equal(ours.rewards, (rewards * torch.tensor(TRL_WEIGHTS).unsqueeze(0)).nansum(dim=1))
    torch.testing.assert_close(ours.advantages, trainer.recorded_advantages, atol=1e-5, rtol=1e-5)


def test_s_grpo_alone():
    trainer = tiny_grpo_run([{"s_grpo": WEIGHTS}], max_steps=2, reward_funcs=REWARDS, dataset=critic_dataset())
    assert finite_losses(trainer)
    assert any("plugins/s_grpo/critic_accuracy" in row for row in trainer.state.log_history)
    batch = trainer.last_plugin_batch
    wrong = torch.tensor([row["label"] == 0 for row in batch.rows])
    suggestion_reward = torch.where(wrong, torch.nan_to_num(batch.reward_components[:, 2]), torch.zeros(len(wrong)))
    expected = 0.5 * batch.reward_components[:, 0] + 2.0 * batch.reward_components[:, 1] + 1.5 * suggestion_reward
    torch.testing.assert_close(batch.rewards, expected)


def test_s_grpo_takes_the_trainer_reward_weights():
    trainer = tiny_grpo_run(["s_grpo"], max_steps=1, reward_funcs=REWARDS, dataset=critic_dataset(),
                            reward_weights=TRL_WEIGHTS)
    assert finite_losses(trainer)
    batch = trainer.last_plugin_batch
    torch.testing.assert_close(batch.reward_weights, torch.tensor(TRL_WEIGHTS))
    expected = (batch.reward_components * torch.tensor(TRL_WEIGHTS).unsqueeze(0)).sum(1)  # suggestion gated: no NaN
    torch.testing.assert_close(batch.rewards, expected)


def test_s_grpo_with_gdpo():
    from grpo_plugin_gdpo import gdpo_advantages

    trainer = tiny_grpo_run([{"s_grpo": WEIGHTS}, "gdpo"], max_steps=2, reward_funcs=REWARDS, dataset=critic_dataset())
    assert finite_losses(trainer)
    batch = trainer.last_plugin_batch
    torch.testing.assert_close(batch.reward_weights, torch.tensor(TRL_WEIGHTS))
    assert not bool(torch.isnan(batch.reward_components).any())  # gated: not-applicable suggestions read as 0
    expected = gdpo_advantages(batch.reward_components, batch.reward_weights, batch.group_index, batch.num_groups)
    torch.testing.assert_close(batch.advantages, expected)
