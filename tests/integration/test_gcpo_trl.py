"""GCPO in the real TRL GRPOTrainer: two tiny steps alone, where the advantages are plain GRPO of the shaped
reward (the cross-check) and the shaped reward is the paper's formula recomputed here by hand, and composed
with round 1's ``sapo``."""

from __future__ import annotations


import pytest

pytest.importorskip("trl")

import torch  # noqa: E402

from grpo_plugins_trl.testing import completion_text, digit_overlap_reward, finite_losses, tiny_grpo_run  # noqa: E402


def accuracy(completions, answer, **kwargs):
    """Correctness score (dense, so that groups differ): the digit overlap."""
    return digit_overlap_reward(completions, answer)


def format(completions, **kwargs):  # noqa: A001  (the reward's name is what GCPO reads)
    """1 where the output is digits only."""
    return [float(completion_text(c).isdigit()) for c in completions]


def aux(completions, **kwargs):
    """The 'auxiliary construction' stand-in: the output writes a '+'."""
    return [float("+" in completion_text(c)) for c in completions]


REWARDS = [accuracy, format, aux]


def shaped_by_hand(batch) -> list[float]:
    """The paper's reward, one completion at a time in plain Python (L_target: the group's longest)."""
    acc, fmt, flag = (batch.reward_components[:, k].tolist() for k in range(3))
    lengths = batch.completion_mask.sum(1).tolist()
    groups = batch.prompt_ids.tolist()
    out = []
    for i, g in enumerate(groups):
        members = [j for j, h in enumerate(groups) if h == g]
        with_aux = [acc[j] for j in members if flag[j] != 0]
        without = [acc[j] for j in members if flag[j] == 0]
        m = 0.0
        if with_aux and without:
            gap = sum(with_aux) / len(with_aux) - sum(without) / len(without)
            m = 1.0 if gap > 0 else (-1.0 if gap < 0 else 0.0)
        target = max(max(lengths[j] for j in members), 1)
        out.append(acc[i] + fmt[i] + m * (flag[i] != 0) + 0.5 * min(lengths[i] / target, 1.0) * acc[i])
    return out


def grpo_by_hand(rewards: torch.Tensor, groups: torch.Tensor, epsilon: float = 1e-4) -> torch.Tensor:
    out = torch.zeros_like(rewards)
    for g in groups.unique():
        r = rewards[groups == g].double()
        constant = bool((r == r[0]).all())
        out[groups == g] = (torch.zeros_like(r) if constant else (r - r.mean()) / (r.std() + epsilon)).float()
    return out


def test_gcpo_alone_is_plain_grpo_on_the_shaped_reward():
    trainer = tiny_grpo_run(["gcpo"], max_steps=2, reward_funcs=REWARDS)
    assert finite_losses(trainer)
    assert any("plugins/gcpo/aux_rate" in row for row in trainer.state.log_history)
    batch = trainer.last_plugin_batch
    assert batch.rewards.tolist() == pytest.approx(shaped_by_hand(batch), abs=1e-5)
    torch.testing.assert_close(batch.advantages, grpo_by_hand(batch.rewards, batch.prompt_ids), atol=1e-5, rtol=1e-5)


def test_gcpo_with_sapo():
    trainer = tiny_grpo_run(["gcpo", "sapo"], max_steps=2, reward_funcs=REWARDS)
    assert finite_losses(trainer)
    batch = trainer.last_plugin_batch
    assert batch.rewards.tolist() == pytest.approx(shaped_by_hand(batch), abs=1e-5)
