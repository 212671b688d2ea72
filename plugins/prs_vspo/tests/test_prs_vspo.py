"""PRS + VSPO, enabled by name; numbers hand-computed from the method card (06-prs-vspo.md)."""

import math

import pytest
import torch

from grpo_plugins import Composition, CompositionError, GRPOBatch, PluginError, PromptRound, TrainerCapabilities
from grpo_plugin_prs_vspo import staged_rewards, task_value

NAMES = ("format", "accuracy")


def batch(prompt_ids, fmt, acc, extra=None):
    components = torch.tensor([fmt, acc], dtype=torch.float32).T
    names = NAMES
    if extra is not None:
        components = torch.cat([components, torch.tensor(extra, dtype=torch.float32)[:, None]], dim=1)
        names = NAMES + ("length",)
    return GRPOBatch(prompt_ids=torch.tensor(prompt_ids), rewards=components.nansum(1), reward_components=components,
                     reward_names=names, completion_mask=torch.ones(len(prompt_ids), 3))


def test_discovered_with_its_hooks_and_switches():
    c = Composition(["prs_vspo"])
    for hook in ("shape_rewards", "keep_rows", "sample_prompts", "observe"):
        assert c.providers(hook) == ["prs_vspo"]
    off = Composition([{"prs_vspo": {"format_reward": None, "replace_zero_advantage_groups": False,
                                     "value_sampling": False}}])
    assert [off.providers(h) for h in ("shape_rewards", "keep_rows", "sample_prompts")] == [[], [], []]


def test_card_worked_example_staged_rewards():
    # [invalid, valid-wrong, valid-right, valid-wrong] -> [0, 0.2, 1.0, 0.2] instead of [0, 0, 1, 0]
    out = staged_rewards(torch.tensor([0.0, 1, 1, 1]), torch.tensor([0.0, 0, 1, 0]))
    assert out.tolist() == pytest.approx([0.0, 0.2, 1.0, 0.2])
    # partial format credit below the threshold: b * f = 0.2 * 0.5; correctness is ignored there
    assert staged_rewards(torch.tensor([0.5]), torch.tensor([1.0])).tolist() == pytest.approx([0.1])
    c = Composition(["prs_vspo"])
    shaped = c.run_advantage_stage(batch([3, 3, 3, 3], [0, 1, 1, 1], [0, 0, 1, 0], extra=[5, 5, 5, 5]))
    assert shaped.rewards.tolist() == pytest.approx([0.0, 0.2, 1.0, 0.2])  # the length component is not summed in
    # GRPO on the shaped group: mean 0.35, std (unbiased) 0.4123 -> advantages of the card's group
    mean, std = 0.35, math.sqrt(((0.35) ** 2 + 2 * 0.15**2 + 0.65**2) / 3)
    expected = [(r - mean) / (std + 1e-6) for r in (0.0, 0.2, 1.0, 0.2)]
    assert shaped.advantages.tolist() == pytest.approx(expected, rel=1e-4)


def test_keep_rows_reads_the_shaped_reward_unlike_a_plain_reward_filter():
    # group 1: correctness all 0 but formats differ -> PRS [0, .2, .2, .2] differ -> kept (a DAPO filter on
    # accuracy drops it); group 2: all valid and right -> PRS constant 1.0 -> dropped; group 3: one completion -> kept
    b = batch([1, 1, 1, 1, 2, 2, 3], [0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 0])
    c = Composition(["prs_vspo"])
    assert c.run_keep_rows(b).tolist() == [True] * 4 + [False, False, True]
    assert c.pop_metrics()["plugins/prs_vspo/replaced_group_fraction"] == pytest.approx(1 / 3)
    plain = Composition([{"prs_vspo": {"format_reward": None}}])  # no PRS: the trainer's reward decides
    assert plain.run_keep_rows(b).tolist() == [True] * 4 + [False, False, True]
    flat = batch([1, 1], [1, 1], [0, 0])
    assert plain.run_keep_rows(GRPOBatch(prompt_ids=flat.prompt_ids, rewards=torch.tensor([0.5, 0.5]))).tolist() == [False, False]


def test_task_value_numbers():
    # p = 0.5: 0.5 * 0.5 + 0.5 * 1 = 0.75; p = 0.25: 0.375 + 0.5 * H2(0.25) = 0.375 + 0.5 * 0.811278 = 0.780639
    v = task_value(torch.tensor([0.5, 0.25, 0.0, 1.0]))
    assert v.tolist() == pytest.approx([0.75, 0.780639, 0.5, 0.0], abs=1e-6)
    assert task_value(torch.tensor([0.25]), difficulty_weight=1.0).tolist() == pytest.approx([0.75])


def test_value_sampling_after_observe():
    # without the replacement, observe counts the trained batch (keep_rows counts every round otherwise)
    c = Composition([{"prs_vspo": {"replace_zero_advantage_groups": False}}])
    method = c.method("prs_vspo")
    # prompt 0: 4/4 solved, prompt 1: 2/4, prompt 2: 0/4; prompts 3.. unseen (p = 1/2)
    b = batch([0] * 4 + [1] * 4 + [2] * 4, [1] * 12, [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    c.run_observe(b, step=1)
    solved, seen = method.counts(torch.tensor([0, 1, 2]))
    assert solved.tolist() == [4.0, 2.0, 0.0] and seen.tolist() == [4.0, 4.0, 4.0]
    # p = 5/6, 1/2, 1/6 -> V = 0.5/6 + 0.5 H2(5/6), 0.75, 0.5*5/6 + 0.5 H2(1/6); H2(1/6) = 0.650022
    value = task_value(torch.tensor([5 / 6, 1 / 2, 1 / 6], dtype=torch.float64))
    assert value.tolist() == pytest.approx([0.408344, 0.75, 0.741678], abs=1e-6)
    round = PromptRound(num_prompts=2, budget=8, dataset_size=3, step=1, default_rollouts=4)
    for seed in range(20):  # drawn with probability V / sum V, without replacement, from the adapter's generator
        drawn = c.run_sample_prompts(round, torch.Generator().manual_seed(seed))
        expected = torch.multinomial(value, 2, replacement=False, generator=torch.Generator().manual_seed(seed))
        assert drawn.tolist() == expected.tolist()
    assert c.pop_metrics()["plugins/prs_vspo/sampled_task_value"] == pytest.approx(float(value[expected].mean()))
    restored = Composition([{"prs_vspo": {"replace_zero_advantage_groups": False}}])
    restored.load_state_dict(c.state_dict())
    assert restored.method("prs_vspo").counts(torch.tensor([1]))[0].tolist() == [2.0]


def test_dropped_groups_count_for_the_task_value():
    """Prompt 0 solved 4/4 (PRS constant: dropped), prompt 1 solved 1/4 (kept). keep_rows counts both groups,
    so prompt 0 loses value (p = 5/6, V = 0.408344) instead of keeping the unseen prior (V = 0.75); observe,
    which sees only the kept group, counts nothing again (p = 2/6 for prompt 1, V = 0.792481)."""
    c = Composition(["prs_vspo"])
    b = batch([0] * 4 + [1] * 4, [1] * 8, [1, 1, 1, 1, 1, 0, 0, 0])
    keep = c.run_keep_rows(b)
    assert keep.tolist() == [False] * 4 + [True] * 4
    trained = batch([1] * 4, [1] * 4, [1, 0, 0, 0])
    c.run_observe(c.run_advantage_stage(trained), step=1)
    solved, seen = c.method("prs_vspo").counts(torch.tensor([0, 1, 2]))
    assert solved.tolist() == [4.0, 1.0, 0.0] and seen.tolist() == [4.0, 4.0, 0.0]
    round = PromptRound(num_prompts=3, budget=12, dataset_size=3, step=1, default_rollouts=4)
    c.pop_metrics()
    drawn = c.run_sample_prompts(round, torch.Generator().manual_seed(0))
    assert sorted(drawn.tolist()) == [0, 1, 2]  # all three: the mean of their values is logged
    h2 = lambda p: -(p * math.log2(p) + (1 - p) * math.log2(1 - p))  # noqa: E731
    values = [0.5 / 6 + 0.5 * h2(5 / 6), 0.5 * 4 / 6 + 0.5 * h2(2 / 6), 0.75]
    assert values == pytest.approx([0.408344, 0.792481, 0.75], abs=1e-6)
    assert c.pop_metrics()["plugins/prs_vspo/sampled_task_value"] == pytest.approx(sum(values) / 3)


def test_constant_groups_get_exactly_zero_at_any_scale():
    c = Composition([{"prs_vspo": {"format_bonus": 0.3, "correct_weight": 1234.5}}])
    out = c.run_advantage_stage(batch([1, 1, 1, 2, 2], [1, 1, 1, 0, 1], [1, 1, 1, 0, 1]))
    assert out.advantages[:3].tolist() == [0.0, 0.0, 0.0]


def test_missing_or_nan_components_are_named():
    c = Composition([{"prs_vspo": {"correct_reward": "correct"}}])
    with pytest.raises(PluginError, match="needs the reward function 'correct'"):
        c.run_keep_rows(batch([1, 1], [1, 1], [0, 1]))
    with pytest.raises(PluginError, match=r"'format' gave no value \(NaN\) for completions \[1\]"):
        Composition(["prs_vspo"]).run_keep_rows(batch([1, 1], [1, float("nan")], [0, 1]))


def test_config_domains():
    with pytest.raises(CompositionError, match="format_threshold"):
        Composition([{"prs_vspo": {"format_threshold": 0.0}}])
    with pytest.raises(CompositionError, match="difficulty_weight"):
        Composition([{"prs_vspo": {"difficulty_weight": 1.5}}])


def test_needs_batch_editing_refused_without_it():
    c = Composition(["prs_vspo"])
    caps = TrainerCapabilities.standard("verl")
    with pytest.raises(CompositionError, match="method 'prs_vspo' needs trainer feature 'batch_editing'"):
        c.check_capabilities(caps)
    c.check_capabilities(caps.with_features("batch_editing"))
