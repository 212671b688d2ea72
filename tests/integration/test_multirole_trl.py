"""MultiRole-R1 in the real TRL GRPOTrainer: two tiny steps alone, where the shaped reward equals the paper's
formula recomputed here by hand (distinct-2 from Python sets of the completion tokens), and composed with
round 1's ``llds``."""

from __future__ import annotations


import pytest

pytest.importorskip("trl")

from grpo_plugins_trl.testing import completion_text, digit_overlap_reward, finite_losses, tiny_grpo_run  # noqa: E402


def accuracy(completions, answer, **kwargs):
    """The verifiable reward (dense here, so that groups differ): the digit overlap."""
    return digit_overlap_reward(completions, answer)


def roles(completions, **kwargs):
    """The 'roles named' stand-in: the number of distinct digits the output writes."""
    return [float(len({ch for ch in completion_text(c) if ch.isdigit()})) for c in completions]


REWARDS = [accuracy, roles]


def shaped_by_hand(batch) -> list[float]:
    """r = acc + 0.5 min(roles, 4) / 4 + 0.5 distinct-2, one completion at a time in plain Python."""
    out = []
    for i in range(batch.num_completions):
        tokens = batch.completion_ids[i][batch.completion_mask[i] > 0].tolist()
        bigrams = list(zip(tokens, tokens[1:]))
        distinct = len(set(bigrams)) / len(bigrams) if bigrams else 0.0
        acc, role_count = batch.reward_components[i].tolist()
        out.append(acc + 0.5 * min(role_count, 4) / 4 + 0.5 * distinct)
    return out


def test_multirole_alone_rewards_diversity_as_the_paper_says():
    trainer = tiny_grpo_run(["multirole"], max_steps=2, reward_funcs=REWARDS)
    assert finite_losses(trainer)
    assert any("plugins/multirole/distinct_2" in row for row in trainer.state.log_history)
    batch = trainer.last_plugin_batch
    assert batch.rewards.tolist() == pytest.approx(shaped_by_hand(batch), abs=1e-5)


def test_multirole_with_llds():
    trainer = tiny_grpo_run(["multirole", "llds"], max_steps=2, reward_funcs=REWARDS)
    assert finite_losses(trainer)
    assert any(key.startswith("plugins/llds/") for row in trainer.state.log_history for key in row)
    batch = trainer.last_plugin_batch
    assert batch.rewards.tolist() == pytest.approx(shaped_by_hand(batch), abs=1e-5)
