"""Tests of Retroformer: the card's worked example by hand, the rating modes, named and whole-reward
returns, the cross-check against plain GRPO, degenerate batches and clear errors on what the user's
side must supply."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_plugins import BatchError, Composition, ConfigError, GRPOBatch, PluginError
from grpo_plugins.config import undeclared_domains
from grpo_plugins.testing import make_batch
from grpo_plugin_retroformer import RetroformerConfig, retroformer_rewards, return_gain_ratings


def reflection_batch(prompt_ids, next_returns, previous, components=None, names=(), weights=None, num_tokens=3) -> GRPOBatch:
    """Reflections of the given prompts. ``previous`` maps a prompt id to G_k (its rows' column); the reward is
    ``next_returns`` unless components are given (then their weighted nan-sum). Log-prob padding holds NaN."""
    n = len(prompt_ids)
    mask = (torch.arange(num_tokens) < torch.tensor([1 + i % num_tokens for i in range(n)])[:, None]).float()
    if components is None:
        rewards = torch.tensor(next_returns, dtype=torch.float32)
    else:
        comps = torch.tensor(components, dtype=torch.float32)
        rewards = (comps * torch.tensor(weights)).nansum(1)
    return make_batch(
        group_sizes=(1,), num_tokens=num_tokens,
        prompt_ids=torch.tensor(prompt_ids), rewards=rewards,
        reward_components=None if components is None else torch.tensor(components, dtype=torch.float32),
        reward_names=tuple(names), reward_weights=None if weights is None else torch.tensor(weights),
        completion_mask=mask, completion_ids=torch.ones(n, num_tokens, dtype=torch.long),
        old_log_probs=torch.where(mask > 0, torch.tensor(-1.0), torch.tensor(float("nan"))), ref_log_probs=None,
        rows=[{"task": f"task {p}", "previous_return": previous[p]} for p in prompt_ids],
    )


# ----------------------------------------------------------------------------- the card's example
def test_card_worked_example():
    """Return before 0.2; reflections A, B, C give next returns 0.8, 0.2, 0.0 -> ratings [+0.6, 0, -0.2];
    z-score (ddof 1): mean .133, sd .416 -> A ~ [1.12, -0.32, -0.80]."""
    batch = reflection_batch([7, 7, 7], [0.8, 0.2, 0.0], {7: 0.2})
    composition = Composition(["retroformer"])
    composition.run_advantage_stage(batch)
    torch.testing.assert_close(batch.rewards, torch.tensor([0.6, 0.0, -0.2]))
    mean = 0.4 / 3
    sd = math.sqrt(((0.6 - mean) ** 2 + mean**2 + (0.2 + mean) ** 2) / 2)
    expected = (torch.tensor([0.6, 0.0, -0.2]) - mean) / (sd + 1e-6)
    torch.testing.assert_close(batch.advantages, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batch.advantages, torch.tensor([1.12, -0.32, -0.80]), rtol=0, atol=6e-3)
    metrics = composition.pop_metrics()
    assert metrics["plugins/retroformer/mean_return_gain"] == pytest.approx(0.4 / 3)
    assert metrics["plugins/retroformer/frac_improved"] == pytest.approx(1 / 3)
    assert metrics["plugins/retroformer/frac_worse"] == pytest.approx(1 / 3)
    assert metrics["plugins/retroformer/mean_previous_return"] == pytest.approx(0.2)


def test_improved_rating_is_the_releases_thresholded_label():
    """Gains [0.6, 0.3, 0.25, -0.2] with threshold 0.25 -> [1, 1, 0, 0]."""
    batch = reflection_batch([1] * 4, [0.8, 0.5, 0.45, 0.0], {1: 0.2})
    composition = Composition([{"retroformer": {"reward": "improved"}}])
    shaped = composition.method("retroformer").shape_rewards(batch=batch, rewards=batch.rewards)
    torch.testing.assert_close(shaped, torch.tensor([1.0, 1.0, 0.0, 0.0]))


def test_named_return_component_keeps_the_other_rewards():
    """Components: next return (weight 2) and a reflection-format reward (weight 0.5).
    r' = r - 2 G_next + 2 (G_next - G_k) = 0.5 format + 2 gain."""
    components = [[0.9, 1.0], [0.1, 0.0], [0.4, 1.0]]
    batch = reflection_batch([3, 3, 3], None, {3: 0.4}, components=components, names=("next_return", "format"), weights=[2.0, 0.5])
    shaped = Composition([{"retroformer": {"return_component": "next_return"}}]).method("retroformer").shape_rewards(
        batch=batch, rewards=batch.rewards
    )
    torch.testing.assert_close(shaped, torch.tensor([0.5 + 2 * 0.5, 0.0 + 2 * -0.3, 0.5 + 0.0]))


def test_pure_functions():
    nxt, prev = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.5, 0.5, 0.5])
    torch.testing.assert_close(return_gain_ratings(nxt, prev), torch.tensor([0.5, -0.5, 0.0]))
    torch.testing.assert_close(return_gain_ratings(nxt, prev, "improved", 0.0), torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(retroformer_rewards(torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([0.5]), 2.0), torch.tensor([2.0]))


# ----------------------------------------------------------------------------- cross-check and property
def test_cross_check_gain_advantages_equal_plain_grpo_on_the_next_returns():
    """The shared G_k of a prompt cancels in GRPO's group baseline: same advantages as plain GRPO on G_{k+1}."""
    prompt_ids = [4, 9, 4, 9, 4, 9, 9]
    next_returns = [0.9, 0.1, 0.3, 0.6, 0.3, 0.0, 1.0]
    previous = {4: 0.3, 9: 0.05}
    retro = Composition(["retroformer"]).run_advantage_stage(reflection_batch(prompt_ids, next_returns, previous))
    plain = Composition([]).run_advantage_stage(reflection_batch(prompt_ids, next_returns, previous))
    torch.testing.assert_close(retro.advantages, plain.advantages, rtol=1e-5, atol=1e-6)
    assert not torch.equal(retro.rewards, plain.rewards)  # the reward's level is the gain, not the return


def test_property_reward_sign_says_whether_the_reflection_helped():
    """Plain GRPO's reward is the return itself (all positive here); Retroformer's is positive exactly for the
    reflections that beat the failed trial, and 'improved' ranks a small and a large gain alike, unlike GRPO."""
    batch = reflection_batch([1, 1, 1, 2, 2, 2], [0.9, 0.6, 0.5, 0.2, 0.1, 0.15], {1: 0.6, 2: 0.1})
    shaped = Composition(["retroformer"]).method("retroformer").shape_rewards(batch=batch, rewards=batch.rewards)
    assert (shaped > 0).tolist() == [True, False, False, True, False, True]
    improved = Composition([{"retroformer": {"reward": "improved", "improvement_threshold": 0.0}}]).run_advantage_stage(
        reflection_batch([1, 1, 1], [0.9, 0.7, 0.5], {1: 0.6})
    )
    plain = Composition([]).run_advantage_stage(reflection_batch([1, 1, 1], [0.9, 0.7, 0.5], {1: 0.6}))
    assert improved.advantages[0] == improved.advantages[1] > 0
    assert plain.advantages[0] > plain.advantages[1]


# ----------------------------------------------------------------------------- degenerate batches
def test_constant_group_and_uneven_shuffled_groups():
    """Every reflection of prompt 5 got the same return: advantage exactly 0; prompt 6 (two reflections) and
    prompt 8 (one) are shaped with their own G_k wherever they sit in the batch."""
    prompt_ids = [5, 6, 5, 8, 6, 5]
    next_returns = [0.7, 0.9, 0.7, 0.3, 0.2, 0.7]
    batch = reflection_batch(prompt_ids, next_returns, {5: 0.1, 6: 0.4, 8: 0.5})
    shaped = Composition(["retroformer"]).method("retroformer").shape_rewards(batch=batch, rewards=batch.rewards)
    torch.testing.assert_close(shaped, torch.tensor([0.6, 0.5, 0.6, -0.2, -0.2, 0.6]))
    batch = Composition(["retroformer"]).run_advantage_stage(reflection_batch([5, 6, 5, 6, 5], [0.7, 0.9, 0.7, 0.2, 0.7], {5: 0.1, 6: 0.4}))
    assert batch.advantages[[0, 2, 4]].tolist() == [0.0, 0.0, 0.0]


def test_nan_padding_is_ignored_and_nan_reward_is_a_clear_error():
    batch = reflection_batch([1, 1], [0.5, 0.0], {1: 0.2})
    batch.completion_mask[1] = 0.0  # an empty reflection: every token masked
    assert bool(torch.isnan(batch.old_log_probs).any())
    Composition(["retroformer"]).run_advantage_stage(batch)
    torch.testing.assert_close(batch.rewards, torch.tensor([0.3, -0.2]))
    with pytest.raises(BatchError, match="NaN"):
        Composition(["retroformer"]).run_advantage_stage(reflection_batch([1, 1], [0.5, float("nan")], {1: 0.2}))


# ----------------------------------------------------------------------------- what the user supplies
def test_missing_previous_return_column_names_it():
    batch = reflection_batch([1, 1], [0.5, 0.0], {1: 0.2})
    batch.rows = [{"task": "t"}, {"task": "t"}]
    with pytest.raises(PluginError, match=r"'retroformer'.*previous_return_column='previous_return' is not a column.*\['task'\]"):
        Composition(["retroformer"]).run_advantage_stage(batch)
    batch.rows = None
    with pytest.raises(PluginError, match="the batch has none"):
        Composition(["retroformer"]).run_advantage_stage(batch)


@pytest.mark.parametrize("value, message", [(None, "one number per row"), ("high", "one number per row"), (float("inf"), "finite")])
def test_bad_previous_return_values(value, message):
    batch = reflection_batch([1, 1], [0.5, 0.0], {1: 0.2})
    batch.rows = [{"previous_return": value}] * 2
    with pytest.raises(PluginError, match=message):
        Composition(["retroformer"]).run_advantage_stage(batch)


def test_previous_return_must_be_shared_by_a_prompts_reflections():
    batch = reflection_batch([1, 1], [0.5, 0.0], {1: 0.2})
    batch.rows[1] = {"previous_return": 0.3}
    with pytest.raises(PluginError, match="same failed trial"):
        Composition(["retroformer"]).run_advantage_stage(batch)


def test_return_component_errors():
    components = [[0.9, 1.0], [0.1, float("nan")]]
    batch = reflection_batch([3, 3], None, {3: 0.4}, components=components, names=("next_return", "format"), weights=[1.0, 1.0])
    with pytest.raises(PluginError, match=r"2 reward functions \['next_return', 'format'\]; set return_component"):
        Composition(["retroformer"]).run_advantage_stage(batch)
    with pytest.raises(PluginError, match=r"return_component='score' is not one of"):
        Composition([{"retroformer": {"return_component": "score"}}]).run_advantage_stage(batch)
    batch.reward_components[1, 0] = float("nan")
    with pytest.raises(PluginError, match=r"gave no return \(NaN/None\) for completions \[1\]"):
        Composition([{"retroformer": {"return_component": "next_return"}}]).run_advantage_stage(batch)


def test_config_domains_and_discovery():
    assert undeclared_domains(RetroformerConfig) == []
    with pytest.raises(ConfigError):
        Composition([{"retroformer": {"improvement_threshold": float("nan")}}])
    with pytest.raises(ConfigError):
        Composition([{"retroformer": {"reward": "ratio"}}])
    composition = Composition(["retroformer"])
    assert composition.providers("shape_rewards") == ["retroformer"] and composition.required_fields() == {"rows"}
