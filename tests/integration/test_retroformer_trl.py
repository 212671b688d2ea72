"""Retroformer in the real TRL GRPOTrainer: the environment is on the user's side (a reward function that
"retries the task" with the reflection and returns the next trial's return; a dataset column with the
failed trial's return). Two tiny steps alone (the reward is the return gain), equal to plain GRPO on the
next-trial return (the cross-check), and composed with round 1's ``knapsack_rl``."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402

from grpo_plugins.testing import BatchRecorder  # noqa: E402
from grpo_plugins_trl.testing import arithmetic_dataset, digit_overlap_reward, tiny_grpo_run  # noqa: E402


def next_trial_return(completions, answer, **kwargs) -> list[float]:
    """The user's environment: the frozen actor retries with the reflection; here, a score of the reflection."""
    return digit_overlap_reward(completions, answer)


def failed_trials():
    """Each prompt is a failed trial with its return G_k (from 0.0 to 0.4)."""
    data = arithmetic_dataset(32)
    return data.add_column("previous_return", [(i % 5) / 10 for i in range(len(data))])


def logged(trainer, key: str) -> list[float]:
    return [row[key] for row in trainer.state.log_history if key in row]


def test_retroformer_alone_rewards_the_return_gain():
    recorder = BatchRecorder()
    trainer = tiny_grpo_run(["retroformer", recorder], max_steps=2, dataset=failed_trials(), reward_funcs=next_trial_return)
    assert len(recorder.batches) == 2
    for batch in recorder.batches:
        answers = [row["answer"] for row in batch.rows]
        gains = [g - row["previous_return"] for g, row in zip(next_trial_return(batch.completions, answers), batch.rows)]
        torch.testing.assert_close(batch.rewards, torch.tensor(gains))
    gains_logged = logged(trainer, "plugins/retroformer/mean_return_gain")
    assert len(gains_logged) == 2
    assert gains_logged[0] == pytest.approx(recorder.batches[0].rewards.mean().item(), abs=1e-6)
    assert all(math.isfinite(x) for x in logged(trainer, "loss"))


def test_cross_check_equals_plain_grpo_on_the_next_trial_return():
    retro, plain = BatchRecorder(), BatchRecorder()
    tiny_grpo_run(["retroformer", retro], max_steps=1, dataset=failed_trials(), reward_funcs=next_trial_return)
    tiny_grpo_run([plain], max_steps=1, dataset=failed_trials(), reward_funcs=next_trial_return)
    assert retro.batches[0].completions == plain.batches[0].completions
    torch.testing.assert_close(retro.batches[0].advantages, plain.batches[0].advantages, rtol=1e-4, atol=1e-5)


def test_missing_previous_return_column_is_refused_at_start_up():
    from grpo_plugins import CompositionError

    with pytest.raises(CompositionError, match="method 'retroformer' needs dataset column 'previous_return'"):
        tiny_grpo_run(["retroformer"], max_steps=1, reward_funcs=next_trial_return, train=False)


def test_retroformer_composed_with_knapsack_rl():
    recorder = BatchRecorder()
    trainer = tiny_grpo_run(["knapsack_rl", "retroformer", recorder], max_steps=2, dataset=failed_trials(),
                            reward_funcs=next_trial_return)
    assert len(logged(trainer, "plugins/retroformer/frac_improved")) == 2
    assert any(key.startswith("plugins/knapsack_rl/") for row in trainer.state.log_history for key in row)
    for batch in recorder.batches:
        previous = torch.tensor([row["previous_return"] for row in batch.rows])
        answers = [row["answer"] for row in batch.rows]
        torch.testing.assert_close(batch.rewards, torch.tensor(next_trial_return(batch.completions, answers)) - previous)
    assert all(math.isfinite(x) for x in logged(trainer, "loss"))
