"""GDRO, enabled by name; numbers hand-computed from the method card (22-gdro.md)."""

import math

import pytest
import torch

from grpo_plugins import Composition, CompositionError, ConfigError, GRPOBatch, Method, PluginError, PromptRound, hookimpl
from grpo_plugins.testing import FirstPrompts, resumed_sampler_rounds
from grpo_plugins.budgets import apportion
from grpo_plugin_gdro import bin_distribution, difficulty_bins, draw_by_bins, hedge_update, sqrt_rule_weights


def plan(num_prompts=4, budget=16, dataset_size=20, step=0):
    return PromptRound(num_prompts=num_prompts, budget=budget, dataset_size=dataset_size, step=step, default_rollouts=budget // num_prompts)


def test_discovered_with_two_switches():
    composition = Composition(["gdro"])
    for hook in ("sample_prompts", "allocate_rollouts", "observe"):
        assert composition.providers(hook) == ["gdro"]
    assert Composition([{"gdro": {"use_prompt_gdro": False}}]).providers("sample_prompts") == []
    assert Composition([{"gdro": {"use_rollout_gdro": False}}]).providers("allocate_rollouts") == []


def test_bins_and_unseen_prompts_are_hardest():
    rates = torch.tensor([0.0, 0.19, 0.2, 0.5, 0.8, 1.0, 0.9])
    seen = torch.tensor([True, True, True, True, True, True, False])
    assert difficulty_bins(rates, seen, (0, 0.2, 0.4, 0.6, 0.8, 1)).tolist() == [0, 0, 1, 2, 4, 4, 0]


def test_card_hedge_step():
    # a = .5, eta = 1, gamma = 0, bin losses [1, 0] after one step: m = [.5, 0], mhat = m / (1 - .5) = [1, 0]
    # -> q = softmax([1, 0]) = [.731, .269]
    log_w, ema, updates = hedge_update(torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                                       torch.zeros(2, dtype=torch.long), torch.tensor([1.0, 0.0], dtype=torch.float64),
                                       torch.tensor([True, True]), rate=0.5, step_size=1.0)
    q = bin_distribution(log_w, mixing=0.0)
    assert q.tolist() == pytest.approx([math.e / (math.e + 1), 1 / (math.e + 1)]) and q.tolist() == pytest.approx([0.731, 0.269], abs=1e-3)
    assert bin_distribution(log_w, mixing=0.1).tolist() == pytest.approx([0.9 * 0.7311 + 0.05, 0.9 * 0.2689 + 0.05], abs=1e-4)
    # the same step through observe: unseen prompts (bin 0) all fail, seen easy prompts (bin 1) all pass
    composition = Composition([{"gdro": {"bin_edges": (0.0, 0.5, 1.0), "ema_rate": 0.5, "mixing": 0.0}}])
    method = composition.method("gdro")
    method.table.set("pass_rate", torch.tensor([5, 6]), torch.tensor([1.0, 1.0]))
    method.table.set("seen", torch.tensor([5, 6]), True)
    composition.run_observe(GRPOBatch(prompt_ids=torch.tensor([1, 1, 2, 2, 5, 5, 6, 6]), rewards=torch.tensor([0.0, 0, 0, 0, 1, 1, 1, 1])), 1)
    assert method.distribution().tolist() == pytest.approx([0.731, 0.269], abs=1e-3)
    assert method.bins(torch.tensor([1, 5, 9])).tolist() == [0, 1, 0]  # 1 now seen with p = 0; 9 unseen


class RewardsAsAdvantages(Method):
    """An advantage estimator for the tests that accepts groups of one: the reward itself."""

    name = "rewards_as_advantages"

    @hookimpl
    def compute_advantages(self, batch: GRPOBatch) -> torch.Tensor:
        return batch.rewards


def test_card_square_root_allocation():
    # q = [.8, .2], p = [.5, .5], 4 prompts each, n in [1, 64], budget 64 -> [11, 5]
    bins = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    weights = sqrt_rule_weights(torch.tensor([0.8, 0.2]), torch.full((8,), 0.5), bins, variance_floor=0.05)
    assert apportion(weights, 64, 1, 64).tolist() == [11] * 4 + [5] * 4
    gdro = {"gdro": {"bin_edges": (0.0, 0.5, 1.0), "min_rollouts": 1, "max_rollouts": 64, "mixing": 0.0}}
    composition = Composition([gdro, RewardsAsAdvantages()])  # min_rollouts=1: an estimator for groups of one
    method = composition.method("gdro")
    ids = torch.arange(8)
    method.table.set("pass_rate", ids, torch.tensor([0.25] * 4 + [0.75] * 4))
    method.table.set("seen", ids, True)
    method.log_weights = torch.log(torch.tensor([0.8, 0.2], dtype=torch.float64))
    # q = [.8, .2] (no mixing); sigma^2 = .25 * .75 + .05 in both bins -> n ∝ sqrt(q): 10.67 vs 5.33 -> [11, 5]
    counts = composition.rollout_counts(plan(8, 64, 8), ids)
    assert counts.tolist() == [11] * 4 + [5] * 4 and int(counts.sum()) == 64


def test_draw_by_bins_follows_q_and_keeps_prompts_distinct_inside_a_bin():
    bins = torch.tensor([0] * 10 + [1] * 10 + [2] * 3)
    generator = torch.Generator().manual_seed(0)
    q = torch.tensor([0.6, 0.4, 0.0])
    draws = [draw_by_bins(bins, q, 5, generator) for _ in range(400)]
    chosen = torch.cat(draws)
    assert set(bins[chosen].tolist()) <= {0, 1}
    assert float((bins[chosen] == 0).double().mean()) == pytest.approx(0.6, abs=0.03)
    assert all(len(set(d.tolist())) == 5 for d in draws)  # each bin has 10 prompts: no repeat within a round
    empty = draw_by_bins(torch.tensor([1, 1]), torch.tensor([0.9, 0.1]), 3, generator)  # bin 0 is empty
    assert sorted(empty.tolist()) == [0, 0, 1] or sorted(empty.tolist()) == [0, 1, 1]


def test_property_hard_bins_get_more_prompts_and_rollouts_than_uniform():
    composition = Composition(["gdro"])
    method = composition.method("gdro")
    ids = torch.arange(100)
    rates = torch.where(ids < 50, 0.1, 0.9)  # half hard (bin 0), half easy (bin 4)
    method.table.set("pass_rate", ids, rates)
    method.table.set("seen", ids, True)
    for step in range(10):  # hard prompts keep failing, easy ones keep passing
        batch_ids = torch.tensor([0, 1, 60, 61]).repeat_interleave(4)
        rewards = torch.tensor([0.0] * 8 + [1.0] * 8)
        composition.run_observe(GRPOBatch(prompt_ids=batch_ids, rewards=rewards), step + 1)
    generator = torch.Generator().manual_seed(0)
    drawn = torch.cat([composition.run_sample_prompts(plan(8, 32, 100), generator) for _ in range(50)])
    assert float((drawn < 50).double().mean()) > 0.75  # uniform sampling: 0.5
    counts = composition.rollout_counts(plan(4, 32, 100), torch.tensor([2, 3, 70, 71]))
    assert int(counts.sum()) == 32 and bool((counts[:2] > counts[2:]).all())  # GRPO: 8 each


def test_edge_cases_and_messages():
    with pytest.raises(PluginError, match="gdro.*min_rollouts=2.*use_rollout_gdro=False"):
        Composition(["gdro"]).rollout_counts(plan(4, 6), torch.arange(4))
    with pytest.raises(PluginError, match="gdro.*NaN"):
        Composition(["gdro"]).run_observe(GRPOBatch(prompt_ids=torch.tensor([0, 0]), rewards=torch.tensor([1.0, float("nan")])), 1)
    with pytest.raises(ConfigError, match="bin_edges"):
        Composition([{"gdro": {"bin_edges": (0.0, 0.6, 0.4, 1.0)}}])
    with pytest.raises(ConfigError, match="both off"):
        Composition([{"gdro": {"use_prompt_gdro": False, "use_rollout_gdro": False}}])
    # a batch with groups of one and a bin never observed: the weights stay finite
    composition = Composition(["gdro"])
    composition.run_observe(GRPOBatch(prompt_ids=torch.tensor([3, 4]), rewards=torch.tensor([1.0, 0.0])), 1)
    assert bool(torch.isfinite(composition.method("gdro").distribution()).all())


def test_resumed_run_plans_the_same_rounds(tmp_path):
    straight, resumed = resumed_sampler_rounds(["gdro"], tmp_path, lambda r: plan(4, 24, 30, r), seed=4, resume_at=6)
    assert resumed == straight
    assert all(sum(c) == 24 for _, c in straight)

def test_a_second_prompt_sampler_is_refused_with_the_switch_to_use():
    with pytest.raises(CompositionError, match="'gdro'.*'first_prompts'.*sample_prompts") as error:
        Composition(["gdro", FirstPrompts()])
    assert "switch the hook off" in str(error.value)
    composition = Composition([{"gdro": {"use_prompt_gdro": False}}, FirstPrompts()])
    assert composition.providers("sample_prompts") == ["first_prompts"]


def test_one_rollout_per_prompt_refuses_grpo_at_start_up():
    """min_rollouts=1: pass rates [0, 0, 1, 1] give counts [3, 3, 1, 1]; grpo cannot normalise a group of one."""
    config = {"gdro": {"bin_edges": (0.0, 0.5, 1.0), "min_rollouts": 1, "mixing": 0.0}}
    with pytest.raises(CompositionError, match="'gdro' cannot run together with method 'grpo'.*min_rollouts=1"):
        Composition([config])
    composition = Composition([config, RewardsAsAdvantages()])
    method = composition.method("gdro")
    method.table.set("pass_rate", torch.arange(4), torch.tensor([0.0, 0.0, 1.0, 1.0]))
    method.table.set("seen", torch.arange(4), True)
    method.log_weights = torch.log(torch.tensor([0.9, 0.1], dtype=torch.float64))
    # q = [.9, .1]; sigma^2 = 0 + .05 in both bins -> n ∝ sqrt(q) = 3 : 1, budget 8 -> [3, 3, 1, 1]
    assert composition.rollout_counts(plan(4, 8, 4), torch.arange(4)).tolist() == [3, 3, 1, 1]
    assert Composition([{"gdro": {"min_rollouts": 1, "use_rollout_gdro": False}}]).providers("compute_advantages") == ["grpo"]


def test_sampling_survives_an_underflowed_bin_weight():
    """mixing=0: the only occupied bins trail by 800 and 801 in log-weight (softmax over all bins gives 0 there);
    restricted to the occupied bins q = softmax([-800, -801]) = [.731, .269]."""
    composition = Composition([{"gdro": {"bin_edges": (0.0, 0.3, 0.6, 1.0), "mixing": 0.0, "use_rollout_gdro": False}}])
    method = composition.method("gdro")
    method.log_weights = torch.tensor([0.0, -800.0, -801.0], dtype=torch.float64)
    method.table.set("pass_rate", torch.arange(10), torch.tensor([0.4] * 5 + [0.9] * 5))
    method.table.set("seen", torch.arange(10), True)
    occupied = torch.tensor([False, True, True])
    q = bin_distribution(method.log_weights, 0.0, occupied)
    assert q.tolist() == pytest.approx([0.0, math.e / (math.e + 1), 1 / (math.e + 1)])
    chosen = composition.run_sample_prompts(plan(4, 16, 10), torch.Generator().manual_seed(0))
    assert chosen.numel() == 4 and bool((method.bins(chosen) > 0).all())
    # with mixing the restricted q is the mixed q renormalised over the occupied bins
    mixed = bin_distribution(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), 0.3, occupied)
    full = bin_distribution(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), 0.3)
    assert mixed.tolist() == pytest.approx([0.0, *(full[1:] / full[1:].sum()).tolist()])


def test_pass_rates_are_read_before_reward_shaping():
    """A shaper that scales every reward by 0.89: an all-correct prompt still records pass rate 1."""
    composition = Composition([ScaleRewards(), "gdro"])
    batch = GRPOBatch(prompt_ids=torch.tensor([3, 3, 4, 4]), rewards=torch.tensor([1.0, 1.0, 1.0, 0.0]))
    composition.run_advantage_stage(batch)
    composition.run_observe(batch, 1)
    assert batch.rewards.tolist() == pytest.approx([0.89, 0.89, 0.89, 0.0])
    assert composition.method("gdro").table.get("pass_rate", torch.tensor([3, 4])).tolist() == [1.0, 0.5]


class ScaleRewards(Method):
    """A reward shaper for the tests: every reward times 0.89."""

    name = "scale_rewards"

    @hookimpl
    def shape_rewards(self, batch: GRPOBatch, rewards: torch.Tensor) -> torch.Tensor:
        return rewards * 0.89
