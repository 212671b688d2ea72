"""TON in the real TRL GRPOTrainer: two tiny steps alone (the think-or-not format reward reaches the
batch, the skip rate is logged), equal to plain GRPO on accuracy + format (the cross-check), and
composed with round 1's ``sapo``."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402

from grpo_plugins.testing import BatchRecorder  # noqa: E402
from grpo_plugins_trl.testing import exact_answer_reward, tiny_grpo_run  # noqa: E402

# The tiny vocabulary has digits, '+' and '=': a completion "thought = answer" is well formed, and its
# thought is skipped when nothing stands before the '='.
TINY_PATTERN = r"(?P<think>[^=]*)=(?P<answer>[^=]*[0-9][^=]*)"
TON = {"ton": {"pattern": TINY_PATTERN}}


def tiny_format_reward(completions, **kwargs) -> list[float]:
    """The think-or-not format reward written out by hand: one '=' with a digit after it."""
    return [float(c.count("=") == 1 and any(ch.isdigit() for ch in c.split("=")[1])) for c in completions]


def logged(trainer, key: str) -> list[float]:
    return [row[key] for row in trainer.state.log_history if key in row]


def test_ton_alone_adds_the_format_reward_and_logs_the_skip_rate():
    recorder = BatchRecorder()
    trainer = tiny_grpo_run([TON, recorder], max_steps=2)
    assert len(recorder.batches) == 2
    for batch in recorder.batches:
        accuracy = torch.tensor(exact_answer_reward(batch.completions, [row["answer"] for row in batch.rows]))
        expected = accuracy + torch.tensor(tiny_format_reward(batch.completions))
        torch.testing.assert_close(batch.rewards, expected)
    skip_rates = logged(trainer, "plugins/ton/skip_rate")
    assert len(skip_rates) == 2 and all(0.0 <= s <= 1.0 for s in skip_rates)
    expected = [
        sum(f == 1.0 and not c.split("=")[0].strip() for c, f in zip(b.completions, tiny_format_reward(b.completions)))
        / len(b.completions)
        for b in recorder.batches
    ]
    assert skip_rates == pytest.approx(expected)
    assert all(math.isfinite(x) for x in logged(trainer, "loss"))


def test_cross_check_equals_plain_grpo_on_accuracy_plus_format():
    """Same seed, same first generation: TON's advantages equal plain GRPO's with the format reward as a
    second TRL reward function."""
    ton_recorder, plain_recorder = BatchRecorder(), BatchRecorder()
    tiny_grpo_run([TON, ton_recorder], max_steps=1)
    tiny_grpo_run([plain_recorder], max_steps=1, reward_funcs=[exact_answer_reward, tiny_format_reward])
    ton_batch, plain_batch = ton_recorder.batches[0], plain_recorder.batches[0]
    assert ton_batch.completions == plain_batch.completions
    torch.testing.assert_close(ton_batch.rewards, plain_batch.rewards)
    torch.testing.assert_close(ton_batch.advantages, plain_batch.advantages, rtol=1e-4, atol=1e-5)


def test_ton_composed_with_sapo():
    trainer = tiny_grpo_run([TON, "sapo"], max_steps=2)
    assert trainer.composition.names[:2] == ["ton", "sapo"]
    assert len(logged(trainer, "plugins/ton/format_rate")) == 2
    assert all(math.isfinite(x) for x in logged(trainer, "loss"))
