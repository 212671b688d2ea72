"""Tests of TON: the card's worked example by hand, the three format-reward modes, the skip rate,
degenerate batches, clear errors, what distinguishes it from GRPO with a strict format reward, and the
cross-check against plain GRPO on accuracy + think-or-not format."""

from __future__ import annotations

import math
import random

import pytest
import torch

from grpo_plugins import BatchError, Composition, ConfigError, GRPOBatch, PluginError
from grpo_plugins.config import undeclared_domains
from grpo_plugins.testing import make_batch
from grpo_plugin_ton import (
    MALFORMED,
    SKIP,
    THOUGHT,
    TONConfig,
    classify_completions,
    drop_thought,
    think_or_not_format_reward,
    think_or_not_rewards,
)

SKIP_4 = "<think>\n\n</think><answer>4</answer>"
THINK_4 = "<think>2 + 2 makes 4</think>\n<answer>4</answer>"
THINK_5 = "<think>2 + 2 makes 5</think><answer>5</answer>"
BARE_5 = "5"


def text_batch(prompt_ids, completions, rewards, components=None, names=(), weights=None, num_tokens=4) -> GRPOBatch:
    """A batch of the given completions; padding of the log-probs holds NaN, which must not matter."""
    n = len(prompt_ids)
    lengths = torch.tensor([1 + i % num_tokens for i in range(n)])
    mask = (torch.arange(num_tokens) < lengths[:, None]).float()
    old = torch.where(mask > 0, torch.full((n, num_tokens), -0.5), torch.tensor(float("nan")))
    return make_batch(
        group_sizes=(1,), num_tokens=num_tokens,
        prompt_ids=torch.tensor(prompt_ids), rewards=torch.tensor(rewards, dtype=torch.float32),
        reward_components=None if components is None else torch.tensor(components, dtype=torch.float32),
        reward_names=tuple(names),
        reward_weights=None if weights is None else torch.tensor(weights, dtype=torch.float32),
        completion_mask=mask, old_log_probs=old, ref_log_probs=None,
        completion_ids=torch.ones(n, num_tokens, dtype=torch.long), completions=list(completions), rows=None,
    )


# ----------------------------------------------------------------------------- the card's example
def test_card_worked_example():
    """Rewards acc + fmt = [2, 2, 1, 0] -> mean 1.25, std (ddof 1) 0.957 -> A = [.78, .78, -.26, -1.31].
    The two correct answers skipped their thought, so skipping is reinforced on this prompt."""
    batch = text_batch([3] * 4, [SKIP_4, SKIP_4, THINK_5, BARE_5], rewards=[1, 1, 0, 0])  # accuracy only
    composition = Composition(["ton"])
    composition.run_advantage_stage(batch)
    torch.testing.assert_close(batch.rewards, torch.tensor([2.0, 2.0, 1.0, 0.0]))
    std = math.sqrt((0.75**2 * 2 + 0.25**2 + 1.25**2) / 3)
    expected = torch.tensor([0.75, 0.75, -0.25, -1.25]) / (std + 1e-6)
    torch.testing.assert_close(batch.advantages, expected)
    torch.testing.assert_close(batch.advantages, torch.tensor([0.78, 0.78, -0.26, -1.31]), rtol=0, atol=6e-3)
    metrics = composition.pop_metrics()
    assert metrics["plugins/ton/skip_rate"] == 0.5
    assert metrics["plugins/ton/format_rate"] == 0.75
    assert metrics["plugins/ton/mean_reward_skip"] == 2.0
    assert metrics["plugins/ton/mean_reward_thought"] == 1.0


def test_classify_statuses():
    completions = [
        SKIP_4,
        "<think>   \t </think><answer>4</answer>",  # blank thought of spaces and a tab
        "<think></think><answer>4</answer>",  # empty thought
        THINK_4,
        "<answer>4</answer>",  # no think block at all
        "<think>x</think><answer>4</answer> trailing",  # does not match the whole text
        "",  # an empty completion (every token masked)
        [{"role": "assistant", "content": SKIP_4}],  # a chat completion
        [{"role": "assistant", "content": [{"type": "text", "text": THINK_4}]}],  # content in parts
    ]
    expected = [SKIP, SKIP, SKIP, THOUGHT, MALFORMED, MALFORMED, MALFORMED, SKIP, THOUGHT]
    assert classify_completions(completions).tolist() == expected
    assert think_or_not_format_reward(completions) == [float(s != MALFORMED) for s in expected]


def test_custom_pattern_for_other_formats():
    """The GUI agent of the release answers in <action> tags; any pattern with a 'think' group works."""
    pattern = r"<think>(?P<think>.*?)</think><action>(?P<answer>.*?)</action>"
    completions = ["<think>\n\n</think><action>click(1, 2)</action>", "<think>find it</think><action>x</action>", SKIP_4]
    assert classify_completions(completions, pattern).tolist() == [SKIP, THOUGHT, MALFORMED]


# ----------------------------------------------------------------------------- the three modes
def test_replace_mode_swaps_the_trainers_format_reward_at_its_weight():
    """A strict format reward (1 only with a real thought) weighted 0.5 is replaced by the think-or-not one:
    r' = r - 0.5 strict + 0.5 f. NaN in the replaced component (did not apply) counts as 0."""
    completions = [SKIP_4, THINK_4, THINK_5, BARE_5]
    accuracy = [1.0, 1.0, 0.0, 0.0]
    strict = [0.0, 1.0, 1.0, float("nan")]
    rewards = [1.0, 1.5, 0.5, 0.0]  # the trainer's nan-sum of accuracy + 0.5 strict
    batch = text_batch([1] * 4, completions, rewards, components=list(zip(accuracy, strict)),
                       names=("accuracy", "strict_format"), weights=[1.0, 0.5])
    composition = Composition([{"ton": {"format_reward": "replace", "format_component": "strict_format"}}])
    composition.run_advantage_stage(batch)
    torch.testing.assert_close(batch.rewards, torch.tensor([1.5, 1.5, 0.5, 0.0]))


def test_none_mode_only_observes_and_equals_plain_grpo():
    completions = [SKIP_4, THINK_4, THINK_5, BARE_5, SKIP_4, SKIP_4]
    rewards = [2.0, 2.0, 1.0, 0.0, 1.5, 0.5]
    composition = Composition([{"ton": {"format_reward": "none"}}])
    ton = composition.run_advantage_stage(text_batch([1, 1, 1, 1, 2, 2], completions, rewards))
    plain = Composition([]).run_advantage_stage(text_batch([1, 1, 1, 1, 2, 2], completions, rewards))
    assert torch.equal(ton.rewards, plain.rewards) and torch.equal(ton.advantages, plain.advantages)
    assert composition.pop_metrics()["plugins/ton/skip_rate"] == 0.5


def test_format_weight_scales_the_added_reward():
    batch = text_batch([1, 1], [SKIP_4, BARE_5], [1.0, 1.0])
    shaped = Composition([{"ton": {"format_weight": 0.25}}]).method("ton").shape_rewards(batch=batch, rewards=batch.rewards)
    torch.testing.assert_close(shaped, torch.tensor([1.25, 1.0]))


def test_think_or_not_rewards_formula():
    rewards = torch.tensor([1.0, 0.0, 2.0])
    status = torch.tensor([SKIP, MALFORMED, THOUGHT])
    torch.testing.assert_close(think_or_not_rewards(rewards, status, 2.0), torch.tensor([3.0, 0.0, 4.0]))
    replaced = torch.tensor([0.0, float("nan"), 1.0])
    torch.testing.assert_close(think_or_not_rewards(rewards, status, 2.0, replaced), torch.tensor([3.0, 0.0, 2.0]))


# ----------------------------------------------------------------------------- cross-check and property
def test_cross_check_equals_plain_grpo_on_accuracy_plus_format():
    """TON (add mode) on the accuracy reward gives exactly plain GRPO's advantages on the reward
    accuracy + think-or-not format computed by the independent reward function."""
    completions = [SKIP_4, THINK_4, THINK_5, BARE_5, "<think>\n</think><answer>7</answer>", BARE_5, THINK_4]
    prompt_ids = [5, 5, 9, 5, 9, 9, 5]
    accuracy = [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    ton = Composition(["ton"]).run_advantage_stage(text_batch(prompt_ids, completions, accuracy))
    total = [a + f for a, f in zip(accuracy, think_or_not_format_reward(completions))]
    plain = Composition([]).run_advantage_stage(text_batch(prompt_ids, completions, total))
    assert torch.equal(ton.rewards, plain.rewards)
    assert torch.equal(ton.advantages, plain.advantages)


def test_property_skipping_is_not_punished_unlike_grpo_with_a_strict_format():
    """With a strict format reward (a real thought required), plain GRPO ranks a correct skip below a correct
    thought; TON in replace mode gives both the same advantage."""
    completions = [SKIP_4, THINK_4, THINK_5, BARE_5]
    accuracy, strict = [1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]
    rewards = [a + s for a, s in zip(accuracy, strict)]

    def batch():
        return text_batch([1] * 4, completions, rewards, components=list(zip(accuracy, strict)),
                          names=("accuracy", "strict_format"), weights=[1.0, 1.0])

    plain = Composition([]).run_advantage_stage(batch())
    assert plain.advantages[0] < plain.advantages[1]
    ton = Composition([{"ton": {"format_reward": "replace", "format_component": "strict_format"}}]).run_advantage_stage(batch())
    assert ton.advantages[0] == ton.advantages[1] > 0


# ----------------------------------------------------------------------------- degenerate batches
def test_constant_group_gets_exactly_zero():
    """Every completion skipped and answered correctly: shaped rewards 2.0 each, advantage exactly 0."""
    batch = Composition(["ton"]).run_advantage_stage(text_batch([4, 4, 4, 8, 8], [SKIP_4] * 3 + [THINK_4, BARE_5], [1, 1, 1, 1, 0]))
    assert batch.advantages[:3].tolist() == [0.0, 0.0, 0.0]
    assert batch.advantages[3] > 0 > batch.advantages[4]


def test_uneven_shuffled_groups_and_a_group_of_one():
    """Shaping is per completion: a shuffled batch with groups of 3, 1 and 2 is shaped in place; the group
    of one is shaped too (the estimator, not TON, decides what a group of one means)."""
    prompt_ids = [2, 7, 2, 5, 7, 2]
    completions = [SKIP_4, BARE_5, THINK_5, SKIP_4, THINK_4, BARE_5]
    batch = text_batch(prompt_ids, completions, [1, 0, 0, 1, 1, 0])
    shaped = Composition(["ton"]).method("ton").shape_rewards(batch=batch, rewards=batch.rewards)
    torch.testing.assert_close(shaped, torch.tensor([2.0, 0.0, 1.0, 2.0, 2.0, 0.0]))


def test_completion_with_every_token_masked_is_malformed_and_nan_padding_is_ignored():
    batch = text_batch([1, 1, 1], [SKIP_4, "", THINK_4], [1.0, 0.0, 1.0])
    batch.completion_mask[1] = 0.0  # the empty completion has no token
    assert bool(torch.isnan(batch.old_log_probs).any())  # NaN sits in the padding
    Composition(["ton"]).run_advantage_stage(batch)
    torch.testing.assert_close(batch.rewards, torch.tensor([2.0, 0.0, 2.0]))
    assert bool(torch.isfinite(batch.advantages).all())


def test_nan_reward_is_a_clear_error():
    with pytest.raises(BatchError, match="NaN"):
        Composition(["ton"]).run_advantage_stage(text_batch([1, 1], [SKIP_4, BARE_5], [1.0, float("nan")]))


# ----------------------------------------------------------------------------- errors
def test_missing_completions_is_a_clear_error():
    batch = text_batch([1, 1], [SKIP_4, BARE_5], [1.0, 0.0])
    batch.completions = None
    with pytest.raises(PluginError, match="'ton'.*no decoded completions"):
        Composition(["ton"]).run_advantage_stage(batch)


def test_unknown_format_component_names_the_components():
    batch = text_batch([1, 1], [SKIP_4, BARE_5], [1.0, 0.0], components=[[1.0], [0.0]], names=("accuracy",), weights=[1.0])
    composition = Composition([{"ton": {"format_reward": "replace", "format_component": "format"}}])
    with pytest.raises(PluginError, match=r"format_component='format'.*\['accuracy'\]"):
        composition.run_advantage_stage(batch)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"pattern": "<think>(.*"}, "not a valid regular expression"),
        ({"pattern": "<think>(.*?)</think>"}, "group named 'think'"),
        ({"format_reward": "replace"}, "needs format_component"),
        ({"format_component": "fmt"}, "only read with format_reward='replace'"),
        ({"format_weight": -1.0}, "format_weight"),
        # format_weight is read only in 'add' mode: a weight set with another mode would be silently ignored
        ({"format_reward": "none", "format_weight": 2.0},
         r"ton.*format_weight=2 is only read with format_reward='add' \(got format_reward='none'"),
        ({"format_reward": "replace", "format_component": "fmt", "format_weight": 2.0},
         r"ton.*format_weight=2 is only read with format_reward='add' .*weight the trainer gives format_component"),
        ({"format_reward": "sometimes"}, "format_reward"),
    ],
)
def test_bad_config_is_refused_at_start(config, message):
    with pytest.raises(ConfigError, match=message):
        Composition([{"ton": config}])


def test_every_numeric_option_declares_a_domain_and_the_method_is_discovered():
    assert undeclared_domains(TONConfig) == []
    composition = Composition(["ton"])
    assert composition.providers("shape_rewards") == ["ton"]
    assert composition.required_fields() == {"completions"}


# ----------------------------------------------------------------------------- stage 1 helper
def test_thought_dropout():
    rng = random.Random(0)
    assert drop_thought(THINK_4, rng, ratio=1.0) == "<think>\n\n</think>\n<answer>4</answer>"
    assert drop_thought(THINK_4, rng, ratio=0.0) == THINK_4
    assert drop_thought(BARE_5, rng, ratio=1.0) == BARE_5  # malformed: unchanged
    dropped = sum(drop_thought(THINK_4, rng) != THINK_4 for _ in range(2000))
    assert 900 < dropped < 1100  # the release's ratio 0.5
