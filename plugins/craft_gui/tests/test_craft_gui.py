"""craft_gui, enabled by name through its installed entry point; numbers are worked by hand from the method card."""

import pytest
import torch

from grpo_plugins import BatchError, Composition, CompositionError, GRPOBatch, Method, PluginError, PromptRound, hookimpl
from grpo_plugins.registry import resolve
from grpo_plugins.testing import make_batch
from grpo_plugin_craft_gui import curriculum_draw, difficulty_bins, hybrid_reward, next_stage

NAMES = ("format", "action_type", "action_args", "judge")
WEIGHTS = (0.1, 0.3, 0.4, 0.2)


def round_of(num_prompts, dataset_size, step=0, budget=None):
    budget = budget or num_prompts * 4
    return PromptRound(num_prompts=num_prompts, budget=budget, dataset_size=dataset_size, step=step, default_rollouts=4)


def batch_of(prompt_ids, rewards, components=None, names=()):
    return GRPOBatch(
        prompt_ids=torch.tensor(prompt_ids),
        rewards=torch.tensor(rewards, dtype=torch.float32),
        reward_components=None if components is None else torch.tensor(components, dtype=torch.float32),
        reward_names=tuple(names),
        completion_mask=torch.ones(len(prompt_ids), 3),
    )


def set_pass_rates(method, rates):
    """Give prompt ids 0 .. len(rates)-1 the pass rates ``rates`` (None: leave the prompt unseen)."""
    for prompt_id, rate in enumerate(rates):
        if rate is not None:
            row = method.table.rows(torch.tensor([prompt_id]))
            method.table.columns["pass_rate"][row] = rate
            method.table.columns["visits"][row] = 1


def test_discovered_with_its_hooks_and_switches():
    assert resolve("craft_gui").distribution == "grpo-plugin-craft-gui"
    composition = Composition(["craft_gui"])
    assert composition.providers("sample_prompts") == ["craft_gui"]
    assert composition.providers("observe") == ["craft_gui"]
    assert composition.providers("shape_rewards") == []  # no components named: the trainer's reward stands
    shaped = Composition([{"craft_gui": {"reward_components": ["a"], "curriculum": False}}])
    assert shaped.providers("shape_rewards") == ["craft_gui"]
    assert shaped.providers("sample_prompts") == []


def test_worked_example_hybrid_reward_and_advantages():
    # R = 0.1 fmt + 0.3 type + 0.4 arg + 0.2 judge:
    #   (1, 1, 1, 1) -> 1.0;  (1, 1, 0, 1) -> 0.6;  (1, 1, 0.5, 0) -> 0.6;  (0, 0, 0, NaN: judge did not run) -> 0.0
    # card: [1.0, 0.6, 0.6, 0.0] -> mean .55, unbiased std sqrt(.51 / 3) = .412311 -> A = [1.0914, .1213, .1213, -1.3339]
    components = [[1, 1, 1, 1], [1, 1, 0, 1], [1, 1, 0.5, 0], [0, 0, 0, float("nan")]]
    batch = batch_of([7, 7, 7, 7], [0.0] * 4, components, NAMES)
    config = {"reward_components": list(NAMES), "reward_weights": list(WEIGHTS)}
    Composition([{"craft_gui": config}]).run_advantage_stage(batch)
    torch.testing.assert_close(batch.rewards, torch.tensor([1.0, 0.6, 0.6, 0.0]))
    torch.testing.assert_close(batch.advantages, torch.tensor([1.091410, 0.121268, 0.121268, -1.333946]), atol=1e-5, rtol=0)


def test_hybrid_reward_function():
    components = torch.tensor([[1.0, float("nan")], [0.5, 2.0]])
    torch.testing.assert_close(hybrid_reward(components, torch.tensor([2.0, 0.5])), torch.tensor([2.0, 2.0]))


def test_bins_follow_the_card_thresholds():
    # p >= 0.7 easy (0), 0.3 <= p < 0.7 medium (1), p < 0.3 hard (2); the thresholds themselves fall on the easier side
    rates = torch.tensor([1.0, 0.7, 0.69, 0.3, 0.29, 0.0], dtype=torch.float64)
    assert difficulty_bins(rates, torch.tensor([0.7, 0.3], dtype=torch.float64)).tolist() == [0, 0, 1, 1, 2, 2]


def test_stage_zero_draws_exactly_the_eligible_prompts():
    # pass rates [0.9, 0.5, 0.1, unseen (prior 1.0), 0.7, 0.3] -> bins [0, 1, 2, 0, 0, 1]
    composition = Composition(["craft_gui"])
    method = composition.method("craft_gui")
    set_pass_rates(method, [0.9, 0.5, 0.1, None, 0.7, 0.3])
    assert method.bins(torch.arange(6)).tolist() == [0, 1, 2, 0, 0, 1]
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        assert sorted(composition.run_sample_prompts(round_of(3, 6), generator).tolist()) == [0, 3, 4]
        # four prompts: the three easy ones and one medium, never the hard prompt 2
        four = composition.run_sample_prompts(round_of(4, 6), generator).tolist()
        assert sorted(four) in ([0, 1, 3, 4], [0, 3, 4, 5])


def test_final_stage_samples_every_bin():
    composition = Composition(["craft_gui"])
    method = composition.method("craft_gui")
    set_pass_rates(method, [0.9, 0.5, 0.1, 1.0])
    method.stage = 2
    generator = torch.Generator().manual_seed(0)
    drawn = torch.cat([composition.run_sample_prompts(round_of(2, 4), generator) for _ in range(30)])
    assert set(drawn.tolist()) == {0, 1, 2, 3}


def test_draw_repeats_when_the_round_wants_more_prompts_than_exist():
    chosen = curriculum_draw(torch.tensor([0, 2, 0]), 0, 5, torch.Generator().manual_seed(1))
    assert chosen.shape == (5,)
    assert sorted(chosen[:3].tolist()) == [0, 1, 2] and chosen[3:].tolist() == chosen[:2].tolist()
    assert set(chosen[:2].tolist()) == {0, 2}  # the eligible ones first


def test_observe_updates_pass_rates_and_advances_the_stage():
    composition = Composition([{"craft_gui": {"success_threshold": 1.0}}])
    method = composition.method("craft_gui")
    # prompt 4: 3 of 4 succeed -> p = 0.75; prompt 9: 0 of 2 -> 0; batch accuracy 3/6 = 0.5: stays at stage 0
    composition.run_observe(batch_of([4, 4, 9, 4, 9, 4], [1, 1, 0, 0, 0, 1]), step=1)
    torch.testing.assert_close(method.table.get("pass_rate", torch.tensor([4, 9, 5])), torch.tensor([0.75, 0.0, 1.0], dtype=torch.float64))
    assert method.stage == 0
    # accuracy 3/4 = 0.75 > 0.7: stage 1 begins at step 2
    composition.run_observe(batch_of([4, 4, 4, 4], [1, 1, 1, 0]), step=2)
    assert (method.stage, method.stage_started_at) == (1, 2)
    metrics = composition.pop_metrics()
    assert metrics["plugins/craft_gui/batch_accuracy"] == 0.75 and metrics["plugins/craft_gui/stage_after_step"] == 1


def test_pass_rate_momentum():
    composition = Composition([{"craft_gui": {"pass_rate_momentum": 0.5}}])
    method = composition.method("craft_gui")
    composition.run_observe(batch_of([3, 3, 3, 3], [0, 0, 0, 1]), step=1)  # first visit: 0.25
    composition.run_observe(batch_of([3, 3, 3, 3], [1, 1, 1, 0]), step=2)  # 0.5 * 0.25 + 0.5 * 0.75 = 0.5
    torch.testing.assert_close(method.table.get("pass_rate", torch.tensor([3])), torch.tensor([0.5], dtype=torch.float64))


def test_next_stage_rule():
    assert next_stage(0, 0.71, 0, 2, 0.7, 0) == 1
    assert next_stage(0, 0.70, 5, 2, 0.7, 0) == 0  # "exceeds": equal is not enough
    assert next_stage(1, 0.10, 3, 2, 0.7, 3) == 2  # by steps
    assert next_stage(2, 0.99, 9, 2, 0.7, 3) == 2  # the last stage stays


def test_success_component_decides_success():
    config = {"success_component": "action_type", "success_threshold": 0.5}
    composition = Composition([{"craft_gui": config}])
    batch = batch_of([1, 1], [0.0, 0.0], [[0.0, 1.0], [0.0, float("nan")]], ("format", "action_type"))
    composition.run_observe(batch, step=1)
    torch.testing.assert_close(composition.method("craft_gui").table.get("pass_rate", torch.tensor([1])), torch.tensor([0.5], dtype=torch.float64))


def test_missing_reward_component_is_a_clear_error_at_the_first_batch():
    composition = Composition([{"craft_gui": {"reward_components": ["format", "judge"]}}])
    batch = batch_of([1, 1], [0.0, 1.0], [[1.0], [0.0]], ("format",))
    with pytest.raises(PluginError, match=r"craft_gui.*\['judge'\].*reward_components"):
        composition.run_advantage_stage(batch)
    observing = Composition([{"craft_gui": {"success_component": "judge"}}])
    with pytest.raises(PluginError, match=r"craft_gui.*\['judge'\]"):
        observing.run_observe(batch, step=1)


class BonusOnRowOne(Method):
    """A shaper that adds 5 to the second completion's reward."""

    name = "bonus_on_row_one"

    @hookimpl
    def shape_rewards(self, batch, rewards):
        return rewards + torch.tensor([0.0, 5.0, 0.0, 0.0], dtype=rewards.dtype)


def test_a_shaper_listed_before_craft_gui_is_refused_and_one_after_it_composes():
    # components as in the worked example: R = [1.0, .6, .6, 0]; the trainer's own rewards are [0, 0, 0, 0]
    components = [[1, 1, 1, 1], [1, 1, 0, 1], [1, 1, 0.5, 0], [0, 0, 0, float("nan")]]
    config = {"craft_gui": {"reward_components": list(NAMES), "reward_weights": list(WEIGHTS)}}
    # listed before: its +5 on row 1 would be overwritten by R, so the run is refused at start-up, naming both
    with pytest.raises(CompositionError, match=r"'craft_gui' must run first among the methods implementing hook "
                                               r"'shape_rewards'.*but method 'bonus_on_row_one' is listed before it"):
        Composition([BonusOnRowOne(), config])
    # listed after: it shapes craft_gui's R, R + [0, 5, 0, 0] = [1, 5.6, .6, 0]
    batch = batch_of([7, 7, 7, 7], [0.0] * 4, components, NAMES)
    Composition([config, BonusOnRowOne()]).run_advantage_stage(batch)
    torch.testing.assert_close(batch.rewards, torch.tensor([1.0, 5.6, 0.6, 0.0]))


@pytest.mark.parametrize(
    "config, message",
    [
        ({"pass_rate_thresholds": [0.3, 0.7]}, "strictly decreasing"),
        ({"pass_rate_thresholds": []}, "strictly decreasing"),
        ({"pass_rate_thresholds": [1.5]}, r"item 0 must lie in \[0, 1\]"),
        ({"reward_components": ["a", "b"], "reward_weights": [1.0]}, "reward_weights has 1 values"),
        ({"advance_accuracy": 1.5}, "advance_accuracy"),
        ({"pass_rate_momentum": 1.0}, "pass_rate_momentum"),
        ({"stage_steps": -1}, "stage_steps"),
    ],
)
def test_bad_config_is_refused_at_start_up(config, message):
    with pytest.raises(CompositionError, match=message):
        Composition([{"craft_gui": config}])


def test_every_numeric_option_declares_a_domain():
    from grpo_plugins.config import undeclared_domains
    from grpo_plugin_craft_gui import CraftGUIConfig

    assert undeclared_domains(CraftGUIConfig) == []


def test_constant_group_gets_exactly_zero_advantage():
    # every completion of a group has the same non-dyadic components -> equal shaped rewards -> A = 0 exactly
    components = [[1, 1, 0.3, 0.7]] * 3 + [[1, 0, 0, 0], [0, 0, 0, 0]]
    batch = batch_of([1, 1, 1, 2, 2], [0.0] * 5, components, NAMES)
    config = {"reward_components": list(NAMES), "reward_weights": list(WEIGHTS)}
    Composition([{"craft_gui": config}]).run_advantage_stage(batch)
    assert batch.advantages[:3].tolist() == [0.0, 0.0, 0.0]
    assert batch.advantages[3] > 0 > batch.advantages[4]


def test_uneven_groups_group_of_one_and_masked_rows_in_observe():
    batch = make_batch(group_sizes=(3, 1, 4, 2), rewards=[1, 0, 1, 1, 0, 0, 1, 1, 0, 1])
    batch.completion_mask[0] = 0  # a completion with every token masked changes nothing here
    composition = Composition(["craft_gui"])
    composition.run_observe(batch, step=1)
    method = composition.method("craft_gui")
    expected = [
        float(batch.rewards[batch.prompt_ids == pid].mean()) for pid in batch.group_prompt_ids.tolist()
    ]
    torch.testing.assert_close(method.table.get("pass_rate", batch.group_prompt_ids), torch.tensor(expected, dtype=torch.float64))


def test_nan_reward_is_a_clear_error():
    batch = batch_of([1, 1], [float("nan"), 1.0])
    with pytest.raises(BatchError, match=r"rewards contain NaN"):
        Composition(["craft_gui"]).run_advantage_stage(batch)


def test_property_hard_prompts_are_held_back_where_grpo_samples_uniformly():
    # 100 prompts, 20 measured hard. craft_gui's stage 0 never draws them while 80 easy ones remain;
    # the trainer's own (GRPO) sampler draws them at their share, ~20 %.
    composition = Composition(["craft_gui"])
    set_pass_rates(composition.method("craft_gui"), [0.0] * 20 + [0.9] * 80)
    generator = torch.Generator().manual_seed(0)
    drawn = torch.cat([composition.run_sample_prompts(round_of(8, 100), generator) for _ in range(50)])
    assert int((drawn < 20).sum()) == 0
    uniform = torch.cat([torch.randperm(100, generator=generator)[:8] for _ in range(50)])
    assert int((uniform < 20).sum()) > 40
    assert Composition([]).run_sample_prompts(round_of(8, 100), generator) is None  # plain GRPO: the trainer samples


def run_rounds(composition, generator, rounds, start):
    """Plan ``rounds`` rounds, each observed with a deterministic outcome: prompts below 6 always succeed."""
    drawn = []
    for r in range(start, start + rounds):
        prompt_ids = composition.run_sample_prompts(round_of(4, 20, step=r), generator)
        ids = prompt_ids.repeat_interleave(2)
        rewards = (ids < 6).float()
        rewards[1::2] = torch.where(ids[1::2] % 3 == 0, 1.0, rewards[1::2])
        composition.run_observe(GRPOBatch(prompt_ids=ids, rewards=rewards), step=r + 1)
        drawn.append((prompt_ids.tolist(), composition.method("craft_gui").stage))
    return drawn


def test_resume_draws_exactly_what_an_uninterrupted_run_draws(tmp_path):
    config = {"craft_gui": {"advance_accuracy": 0.6, "stage_steps": 4}}
    whole = Composition([config])
    generator = torch.Generator().manual_seed(3)
    uninterrupted = run_rounds(whole, generator, 8, 0)

    first = Composition([config])
    generator = torch.Generator().manual_seed(3)
    before = run_rounds(first, generator, 3, 0)
    first.save(tmp_path / "state.pt")
    generator_state = generator.get_state()

    resumed = Composition([config])
    resumed.load(tmp_path / "state.pt")
    generator = torch.Generator()
    generator.set_state(generator_state)
    after = run_rounds(resumed, generator, 5, 3)
    assert before + after == uninterrupted
    assert len({stage for _, stage in uninterrupted}) > 1  # the run did move through stages
    state = resumed.state_dict()["craft_gui"]
    assert set(state) == {"keys", "pass_rate", "visits", "stage", "stage_started_at"}


def test_state_from_another_threshold_config_is_refused():
    composition = Composition(["craft_gui"])
    composition.method("craft_gui").stage = 2
    saved = composition.state_dict()
    fewer = Composition([{"craft_gui": {"pass_rate_thresholds": [0.5]}}])
    with pytest.raises(PluginError, match="stage 2 outside"):
        fewer.load_state_dict(saved)
