"""info_consistent, enabled by name through its installed entry point; numbers are worked by hand from the method card."""

import math

import pytest
import torch

from grpo_plugins import BatchError, Composition, CompositionError, ConfigError, GRPOBatch, PluginError, PromptRound
from grpo_plugins.registry import resolve
from grpo_plugin_info_consistent import (
    agreement_rewards,
    binary_entropy,
    group_instability,
    pairs_of,
    reset_conversation,
    stability_rewards,
    token_units,
)

H_THIRD = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))  # h(1/3) = h(2/3) = 0.636514


def batch_of(prompt_ids, completions, rewards=None, relevant=None, **fields):
    n = len(prompt_ids)
    rows = [{"prompt_id": pid, **({} if relevant is None else {"relevant_units": relevant[i]})} for i, pid in enumerate(prompt_ids)]
    return GRPOBatch(
        prompt_ids=torch.tensor(prompt_ids),
        rewards=torch.tensor(rewards if rewards is not None else [0.0] * n, dtype=torch.float32),
        completions=list(completions),
        completion_mask=torch.ones(n, 2),
        rows=rows,
        **fields,
    )


def round_of(budget, dataset_size, num_prompts=2):
    return PromptRound(num_prompts=num_prompts, budget=budget, dataset_size=dataset_size, step=0, default_rollouts=4)


def test_discovered_with_its_hooks():
    assert resolve("info_consistent").distribution == "grpo-plugin-info-consistent"
    composition = Composition(["info_consistent"])
    for hook in ("sample_prompts", "augment_prompts", "shape_rewards"):
        assert composition.providers(hook) == ["info_consistent"]
    assert composition.required_fields() == {"completions", "rows"}  # rows: its needs() reads dataset columns
    free = Composition([{"info_consistent": {"pair_prompts": False, "units": "tokens", "helpfulness": "reward"}}])
    assert free.providers("sample_prompts") == [] and free.required_fields() == {"completion_ids"}


def test_binary_entropy():
    torch.testing.assert_close(
        binary_entropy(torch.tensor([0.0, 1.0, 1 / 3, 2 / 3, 0.5], dtype=torch.float64)),
        torch.tensor([0.0, 0.0, H_THIRD, H_THIRD, math.log(2)], dtype=torch.float64),
    )


def test_card_worked_example_stability():
    # K = 3 variants, sets {a, b}, {a, b}, {a, c}: f(a) = 1, f(b) = 2/3, f(c) = 1/3, h(2/3) = h(1/3) = .6365
    # r_stab = -(0 + .6365) / 2 = -.3183 for all three: the card's rule does not separate them
    rows, units = pairs_of([["a", "b"], ["a", "b"], ["a", "c"]], {})
    index = torch.zeros(3, dtype=torch.long)
    torch.testing.assert_close(stability_rewards(rows, units, index, 1), torch.full((3,), -H_THIRD / 2, dtype=torch.float64))
    # H_q over the union {a, b, c}: (0 + .6365 + .6365) / 3 = .4243
    torch.testing.assert_close(group_instability(rows, units, index, 1), torch.tensor([2 * H_THIRD / 3], dtype=torch.float64))
    # agreement: {a, b}: (|1-1| + |1-2/3| + |0-1/3|) / 3 = 2/9;  {a, c}: (0 + 2/3 + 2/3) / 3 = 4/9
    torch.testing.assert_close(
        agreement_rewards(rows, units, index, 1), torch.tensor([-2 / 9, -2 / 9, -4 / 9], dtype=torch.float64)
    )


def test_card_example_through_the_advantage_stage_with_coverage():
    # relevant units {a, b}: coverage [1, 1, 0.5]; R = r_help + r_stab = [.68174, .68174, .18174]
    # mean .51508, centred [1/6, 1/6, -1/3], unbiased std sqrt(1/12) -> A = [.57735, .57735, -1.15470]
    batch = batch_of([5, 5, 5], ["A, b", "a;B", "a\nc"], relevant=[["a", "b"]] * 3)
    Composition(["info_consistent"]).run_advantage_stage(batch)
    r_stab = -H_THIRD / 2
    torch.testing.assert_close(batch.rewards, torch.tensor([1 + r_stab, 1 + r_stab, 0.5 + r_stab]))
    torch.testing.assert_close(batch.advantages, torch.tensor([0.577350, 0.577350, -1.154700]), atol=1e-4, rtol=0)


def test_groups_are_the_prompt_ids_not_the_texts():
    # two requests interleaved; each request's three completions form the group whatever their order
    completions = ["a, b", "x", "a, b", "x", "a, c", "y"]
    batch = batch_of([5, 9, 5, 9, 5, 9], completions, relevant=[["a", "b"], ["x"]] * 3)
    composition = Composition([{"info_consistent": {"helpfulness_weight": 0.0}}])
    composition.run_advantage_stage(batch)
    # request 9: {x}, {x}, {y} -> f(x) = 2/3, f(y) = 1/3 -> every r_stab = -h(1/3)
    torch.testing.assert_close(batch.rewards[[1, 3, 5]], torch.full((3,), -H_THIRD))
    torch.testing.assert_close(batch.rewards[[0, 2, 4]], torch.full((3,), -H_THIRD / 2))
    metrics = composition.pop_metrics()
    assert metrics["plugins/info_consistent/group_instability_mean"] == pytest.approx((2 * H_THIRD / 3 + H_THIRD) / 2)


def test_helpfulness_variants():
    batch = batch_of([1, 1], ["a, b, c", "a"], rewards=[2.0, -1.0])
    config = {"helpfulness": "unit_count", "target_units": 2, "stability_weight": 0.0}
    unit_count = Composition([{"info_consistent": {**config, "trainer_reward": "ignore"}}])
    unit_count.run_advantage_stage(batch)
    torch.testing.assert_close(batch.rewards, torch.tensor([1.0, 0.5]))  # min(3 / 2, 1), 1 / 2
    batch = batch_of([1, 1], ["a, b, c", "a"], rewards=[2.0, -1.0])
    reward = Composition([{"info_consistent": {"helpfulness": "reward", "stability_weight": 0.0}}])
    reward.run_advantage_stage(batch)
    torch.testing.assert_close(batch.rewards, torch.tensor([1.0, 0.0]))  # the trainer's reward clipped to [0, 1]


def test_token_units_ignore_padding_and_repeats():
    ids = torch.tensor([[7, 7, 3, 0], [3, 9, 0, 0], [5, 5, 5, 5]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.float32)
    rows, units = token_units(ids, mask)
    # dense unit ids: 3 -> 0, 7 -> 1, 9 -> 2; the fully masked row has no unit
    assert sorted(zip(rows.tolist(), units.tolist())) == [(0, 0), (0, 1), (1, 0), (1, 2)]


def test_tokens_mode_with_nan_free_padding_and_all_masked_rows():
    ids = torch.tensor([[4, 6, 1], [4, 6, 2], [4, 8, 8], [9, 9, 9]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.float32)
    batch = GRPOBatch(prompt_ids=torch.tensor([3, 3, 3, 3]), rewards=torch.ones(4), completion_ids=ids, completion_mask=mask)
    config = {"units": "tokens", "helpfulness": "reward", "pair_prompts": False}
    Composition([{"info_consistent": config}]).run_advantage_stage(batch)
    # sets {4, 6}, {4, 6}, {4, 8}, {}: f(4) = 3/4, f(6) = 1/2, f(8) = 1/4 over the 4 completions
    h = lambda f: -(f * math.log(f) + (1 - f) * math.log(1 - f))  # noqa: E731
    expected = [1 - (h(0.75) + h(0.5)) / 2, 1 - (h(0.75) + h(0.5)) / 2, 1 - (h(0.75) + h(0.25)) / 2, 1.0]
    torch.testing.assert_close(batch.rewards, torch.tensor(expected))


def test_constant_group_gets_exactly_zero_advantage():
    # every variant gives the same set: r_stab = 0, equal coverage -> equal rewards -> A = 0 exactly
    batch = batch_of([1, 1, 1, 2, 2], ["a, b", "b, a", "A,B", "a", "c"], relevant=[["a", "b", "d"]] * 5)
    Composition(["info_consistent"]).run_advantage_stage(batch)
    assert batch.advantages[:3].tolist() == [0.0, 0.0, 0.0]
    assert batch.advantages[3] > 0 > batch.advantages[4]


def test_group_of_one_and_empty_completion():
    batch = batch_of([1, 2, 2], ["a", "", "a"], relevant=[["a"]] * 3)
    composition = Composition([{"info_consistent": {"stability": "agreement"}}])
    shaped = composition.method("info_consistent").shape_rewards(batch=batch, rewards=batch.rewards)
    # group 1 alone: consistent with itself (0), covers a -> 1; group 2: {} and {a}: f(a) = 1/2
    # agreement: {} -> -(0 + 1/2) / 1 = -1/2 (help 0); {a} -> -((1 - 1) + 1/2) = -1/2 (help 1)
    torch.testing.assert_close(shaped, torch.tensor([1.0, -0.5, 0.5]))


def test_property_consistent_answers_win_where_grpo_sees_no_signal():
    # every completion is equally "helpful" by the trainer's reward, so GRPO's advantages are all 0;
    # with the agreement rule the variants agreeing with the majority get a positive advantage
    completions = ["fund a, fund b", "fund a, fund b", "fund a, fund b", "fund c"]
    plain = batch_of([4] * 4, completions, rewards=[1.0] * 4)
    Composition([]).run_advantage_stage(plain)
    assert plain.advantages.tolist() == [0.0] * 4
    batch = batch_of([4] * 4, completions, rewards=[1.0] * 4)
    Composition([{"info_consistent": {"helpfulness": "reward", "stability": "agreement"}}]).run_advantage_stage(batch)
    assert bool((batch.advantages[:3] > 0).all()) and batch.advantages[3] < 0


def test_missing_columns_are_clear_errors_at_augment_and_at_the_first_batch():
    composition = Composition(["info_consistent"])
    rows = [{"prompt": "q", "relevant_units": ["a"]}] * 3
    with pytest.raises(PluginError, match=r"info_consistent.*column 'prompt_id'"):
        composition.run_augment_prompts(round_of(3, 3), torch.arange(3), ["q"] * 3, rows)
    rows = [{"prompt": "q", "prompt_id": 0}] * 3
    with pytest.raises(PluginError, match=r"info_consistent.*column 'relevant_units'.*relevant_column"):
        composition.run_augment_prompts(round_of(3, 3), torch.arange(3), ["q"] * 3, rows)
    batch = batch_of([1, 1], ["a", "b"])
    with pytest.raises(PluginError, match=r"info_consistent.*column 'relevant_units'"):
        composition.run_advantage_stage(batch)


def test_rows_of_one_draw_must_share_a_prompt_id():
    composition = Composition([{"info_consistent": {"variants_per_request": 2, "helpfulness": "reward"}}])
    rows = [{"prompt_id": 0}, {"prompt_id": 0}, {"prompt_id": 1}, {"prompt_id": 2}]
    with pytest.raises(PluginError, match=r"prompt_ids \[1, 2\].*contiguously"):
        composition.run_augment_prompts(round_of(8, 8), torch.arange(4), ["q"] * 4, rows)


def test_augment_resets_each_variant_conversation():
    history = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "earlier question"},
        {"role": "assistant", "content": "earlier answer"},
        {"role": "user", "content": "which funds?"},
    ]
    assert reset_conversation(history) == [history[0], history[3]]
    assert reset_conversation("plain text") == "plain text"
    composition = Composition([{"info_consistent": {"variants_per_request": 2, "helpfulness": "reward"}}])
    out = composition.run_augment_prompts(round_of(4, 4), torch.tensor([0, 0]), [history, "b"], [{"prompt_id": 0}] * 2)
    assert out == [[history[0], history[3]], "b"]


def test_sample_prompts_draws_whole_requests():
    # 12 rows = 4 requests of K = 3 variants; budget 12 with 2 completions per variant -> 2 requests
    composition = Composition([{"info_consistent": {"rollouts_per_variant": 2}}])
    generator = torch.Generator().manual_seed(0)
    chosen = composition.run_sample_prompts(round_of(12, 12), generator)
    blocks = chosen.view(2, 3)
    assert bool((blocks % 3 == torch.arange(3)).all()) and bool((blocks // 3 == blocks[:, :1] // 3).all())
    assert blocks[0, 0] != blocks[1, 0]
    assert composition.rollout_counts(round_of(12, 12), chosen).tolist() == [2] * 6
    # more requests than the dataset holds: every request once, then again
    many = composition.run_sample_prompts(round_of(36, 12), generator)
    assert sorted((many[::3] // 3)[:4].tolist()) == [0, 1, 2, 3]


def test_sample_prompts_refuses_a_layout_that_does_not_fit():
    composition = Composition(["info_consistent"])
    with pytest.raises(PluginError, match="13 rows, not a multiple of variants_per_request=3"):
        composition.run_sample_prompts(round_of(6, 13), torch.Generator())
    with pytest.raises(PluginError, match="budget of 8 completions is not a multiple"):
        composition.run_sample_prompts(round_of(8, 12), torch.Generator())


def test_resume_draws_exactly_what_an_uninterrupted_run_draws():
    # the method keeps no state: the adapter's generator alone decides the draw
    composition = Composition(["info_consistent"])
    assert composition.state_dict() == {}
    generator = torch.Generator().manual_seed(7)
    whole = [composition.run_sample_prompts(round_of(6, 30), generator).tolist() for _ in range(6)]
    generator = torch.Generator().manual_seed(7)
    first = [composition.run_sample_prompts(round_of(6, 30), generator).tolist() for _ in range(2)]
    saved, generator_state = composition.state_dict(), generator.get_state()
    resumed = Composition(["info_consistent"])
    resumed.load_state_dict(saved)
    generator = torch.Generator()
    generator.set_state(generator_state)
    rest = [resumed.run_sample_prompts(round_of(6, 30), generator).tolist() for _ in range(4)]
    assert first + rest == whole


def test_nan_reward_is_a_clear_error():
    batch = batch_of([1, 1], ["a", "a"], rewards=[float("nan"), 1.0], relevant=[["a"]] * 2)
    with pytest.raises(BatchError, match="rewards contain NaN"):
        Composition(["info_consistent"]).run_advantage_stage(batch)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"variants_per_request": 0}, "variants_per_request"),
        ({"unit_pattern": "("}, "not a regular expression"),
        ({"helpfulness_weight": 0.0, "stability_weight": 0.0}, "both 0"),
        ({"stability_weight": -1.0}, "stability_weight"),
        ({"stability": "jaccard"}, "stability"),
    ],
)
def test_bad_config_is_refused_at_start_up(config, message):
    with pytest.raises(CompositionError, match=message):
        Composition([{"info_consistent": config}])


def test_every_numeric_option_declares_a_domain():
    from grpo_plugins.config import undeclared_domains
    from grpo_plugin_info_consistent import InfoConsistentConfig

    assert undeclared_domains(InfoConsistentConfig) == []


def test_a_discarded_trainer_reward_is_refused_added_or_ignored_by_choice():
    """unit_count with target 2: r_help = [1, 0.5]; trainer rewards [2, -1] were once dropped without a word."""
    config = {"helpfulness": "unit_count", "target_units": 2, "stability_weight": 0.0}
    with pytest.raises(PluginError, match=r"info_consistent with helpfulness='unit_count'.*not 0 here \(e.g. 2\)"
                                          r".*trainer_reward='add'.*'ignore'"):
        Composition([{"info_consistent": config}]).run_advantage_stage(batch_of([1, 1], ["a, b, c", "a"], rewards=[2.0, -1.0]))
    added = batch_of([1, 1], ["a, b, c", "a"], rewards=[2.0, -1.0])
    Composition([{"info_consistent": {**config, "trainer_reward": "add"}}]).run_advantage_stage(added)
    torch.testing.assert_close(added.rewards, torch.tensor([3.0, -0.5]))  # [1 + 2, 0.5 - 1]
    zero = batch_of([1, 1], ["a, b, c", "a"], rewards=[0.0, 0.0])  # a placeholder reward of 0 discards nothing
    Composition([{"info_consistent": config}]).run_advantage_stage(zero)
    torch.testing.assert_close(zero.rewards, torch.tensor([1.0, 0.5]))
    with pytest.raises(ConfigError, match="trainer_reward='add' has no meaning with helpfulness='reward'"):
        Composition([{"info_consistent": {"helpfulness": "reward", "trainer_reward": "add"}}])
    from grpo_plugins.needs import relation_problems
    from grpo_plugin_info_consistent import InfoConsistent

    assert "'info_consistent' cannot run together with method 'gdpo'" in relation_problems(
        {"info_consistent": InfoConsistent().needs()}, ["info_consistent", "gdpo"])[0]
