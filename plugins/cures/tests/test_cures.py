"""CurES, enabled by name; numbers hand-computed from the method card (05-cures.md)."""

import math

import pytest
import torch

from grpo_plugins import Composition, CompositionError, ConfigError, GRPOBatch, PluginError, PromptRound
from grpo_plugins.testing import FirstPrompts, resumed_sampler_rounds
from grpo_plugin_cures import cures_allocation, posterior_accuracy, sampling_probabilities


def plan(num_prompts=3, budget=16, dataset_size=3, step=0):
    return PromptRound(num_prompts=num_prompts, budget=budget, dataset_size=dataset_size, step=step, default_rollouts=budget // num_prompts)


def test_discovered_with_its_hooks_and_switches():
    composition = Composition(["cures"])
    for hook in ("sample_prompts", "allocate_rollouts", "observe"):
        assert composition.providers(hook) == ["cures"]
    off = Composition([{"cures": {"use_sampler": False, "use_allocation": False}}])
    assert off.providers("sample_prompts") == [] and off.providers("allocate_rollouts") == []


def test_card_sampling_probabilities():
    # (a, n) = (0,4), (2,4), (4,4): p_hat = 1/6, 1/2, 5/6; sqrt(pq) = 0.3727, 0.5, 0.3727; tau = 0.1
    # weights e^3.727, e^5, e^3.727 -> P = [0.179, 0.642, 0.179]
    accepted, seen = torch.tensor([0.0, 2.0, 4.0]), torch.tensor([4.0, 4.0, 4.0])
    assert posterior_accuracy(accepted, seen).tolist() == pytest.approx([1 / 6, 1 / 2, 5 / 6])
    probs = sampling_probabilities(accepted, seen, temperature=0.1)
    e = math.exp(10 * math.sqrt(5 / 36))
    expected = [e / (2 * e + math.exp(5)), math.exp(5) / (2 * e + math.exp(5)), e / (2 * e + math.exp(5))]
    assert probs.tolist() == pytest.approx(expected) and probs.tolist() == pytest.approx([0.179, 0.642, 0.179], abs=1e-3)
    # the released sampler's tau_x = (a_x + 1) / 0.01: almost uniform
    released = sampling_probabilities(accepted, seen, temperature_mode="released_code")
    assert float(released.max() - released.min()) < 1e-3


def test_card_allocation_exact_total_and_dropped_prompt():
    # p = [0.5, 0.25, 0], budget 16: sigma = [0.5, 0.433, 0] -> 16 sigma / 0.933 = [8.57, 7.43, 0] -> [9, 7, 0]
    known = torch.ones(3, dtype=torch.bool)
    assert cures_allocation(torch.tensor([0.5, 0.25, 0.0]), known, 16).tolist() == [9, 7, 0]
    composition = Composition(["cures"])
    composition.method("cures").set_counts(torch.tensor([0, 1, 2]), torch.tensor([2.0, 1.0, 0.0]), torch.tensor([4.0, 4.0, 4.0]))
    counts = composition.rollout_counts(plan(), torch.tensor([0, 1, 2]))
    assert counts.tolist() == [9, 7, 0]  # the p = 0 prompt is dropped from the round
    assert composition.pop_metrics()["plugins/cures/dropped_prompts"] == 1.0


def test_unknown_prompts_get_the_probe_and_settled_ones_nothing():
    # prompt 0 unknown -> probe 4; prompt 1 (p = 1) -> 0; prompt 2 (p = 0.5) takes the other 12
    counts = cures_allocation(torch.tensor([0.0, 1.0, 0.5]), torch.tensor([False, True, True]), 16)
    assert counts.tolist() == [4, 0, 12]
    # nobody with 0 < p < 1: the rest is split evenly
    assert cures_allocation(torch.tensor([0.0, 1.0]), torch.tensor([True, True]), 6).tolist() == [3, 3]
    # min_rollouts lifts a small share; max_rollouts caps a large one
    assert cures_allocation(torch.tensor([0.5, 0.01]), torch.ones(2, dtype=torch.bool), 20, min_rollouts=5).tolist() == [15, 5]
    assert cures_allocation(torch.tensor([0.5, 0.01]), torch.ones(2, dtype=torch.bool), 20, max_rollouts=12).tolist() == [12, 8]


def test_what_full_mixed_prompts_leave_never_makes_a_group_of_one():
    # max_rollouts 4, counts (2,4), (4,4), (0,4), (4,4): p = [.5, 1, 0, 1], only prompt 0 is mixed; budget 8.
    # Prompt 0 at the cap takes 4 and nobody else is in the round (settled_rollouts 0): the cap yields, so
    # prompt 0 takes all 8 and the settled prompts stay dropped (not [4, 2, 1, 1] with two groups of one).
    composition = Composition([{"cures": {"max_rollouts": 4}}])
    ids = torch.arange(4)
    composition.method("cures").set_counts(ids, torch.tensor([2.0, 4.0, 0.0, 4.0]), torch.full((4,), 4.0))
    assert composition.rollout_counts(plan(4, 8, 4), ids).tolist() == [8, 0, 0, 0]
    known = torch.ones(3, dtype=torch.bool)
    # settled_rollouts 2, cap 4, budget 12: the mixed prompt is full at 4, the settled ones take the rest up to 4
    assert cures_allocation(torch.tensor([0.5, 1.0, 1.0]), known, 12, settled_rollouts=2, max_rollouts=4).tolist() == [4, 4, 4]
    # budget 14: every prompt of the round is at the cap, which yields for the mixed prompt (by sigma): 4 + 2
    assert cures_allocation(torch.tensor([0.5, 1.0, 1.0]), known, 14, settled_rollouts=2, max_rollouts=4).tolist() == [6, 4, 4]
    # a probed prompt (no estimate: 4 = min(probe 4, 12 // 2)) takes what the full mixed prompt leaves, up to the cap
    assert cures_allocation(torch.tensor([0.5, 0.0]), torch.tensor([True, False]), 12, max_rollouts=6).tolist() == [6, 6]


def test_observe_counts_accepted_above_threshold_and_refuses_nan():
    composition = Composition([{"cures": {"threshold": 0.5}}])
    batch = GRPOBatch(prompt_ids=torch.tensor([4, 4, 4, 9, 9]), rewards=torch.tensor([0.9, 0.5, 0.2, 1.0, 0.7]))
    composition.run_observe(batch, 1)
    accepted, seen = composition.method("cures").counts(torch.tensor([4, 9, 1]))
    assert accepted.tolist() == [1.0, 2.0, 0.0] and seen.tolist() == [3.0, 2.0, 0.0]
    with pytest.raises(PluginError, match="cures.*NaN"):
        composition.run_observe(GRPOBatch(prompt_ids=torch.tensor([1, 1]), rewards=torch.tensor([1.0, float("nan")])), 2)


def test_pass_without_replacement_then_a_new_pass():
    composition = Composition(["cures"])
    generator = torch.Generator().manual_seed(0)
    rounds = [composition.run_sample_prompts(plan(4, 16, 12), generator).tolist() for _ in range(4)]
    assert sorted(sum(rounds[:3], [])) == list(range(12))  # one pass covers the dataset once
    assert len(set(rounds[3])) == 4


def test_property_mid_accuracy_prompts_get_more_than_uniform():
    # GRPO / the trainer: uniform prompts, budget // P each. CurES: p = 0.5 prompts are drawn more often
    # and given more rollouts than p = 0.05 prompts.
    composition = Composition([{"cures": {"pass_without_replacement": False}}])
    method = composition.method("cures")
    ids = torch.arange(20)
    method.set_counts(ids, torch.where(ids < 10, 10.0, 1.0), torch.full((20,), 20.0))  # p = 0.5 vs 0.05
    generator = torch.Generator().manual_seed(0)
    drawn = torch.cat([composition.run_sample_prompts(plan(4, 16, 20), generator) for _ in range(300)])
    assert float((drawn < 10).double().mean()) > 0.6  # uniform sampling: 0.5
    counts = composition.rollout_counts(plan(4, 16, 20), torch.tensor([0, 1, 12, 13]))
    assert int(counts.sum()) == 16 and counts[0] > 4 > counts[2]


def test_config_domains_and_conflicts():
    with pytest.raises(ConfigError, match="temperature"):
        Composition([{"cures": {"temperature": 0.0}}])
    with pytest.raises(ConfigError, match="max_rollouts"):
        Composition([{"cures": {"max_rollouts": 1}}])
    # one rollout would be a group of one, which GRPO cannot normalise: 0 or at least 2
    for name in ("min_rollouts", "settled_rollouts", "probe_rollouts"):
        with pytest.raises(ConfigError, match=f"cures.*{name}"):
            Composition([{"cures": {name: 1}}])
    Composition([{"cures": {"min_rollouts": 0, "settled_rollouts": 2}}])  # 0 and 2 are accepted
    composition = Composition([{"cures": {"min_rollouts": 8}}])
    composition.method("cures").set_counts(torch.tensor([0, 1, 2]), torch.tensor([2.0, 1.0, 3.0]), torch.tensor([4.0, 4.0, 4.0]))
    with pytest.raises(PluginError, match="cures.*minimum"):
        composition.rollout_counts(plan(), torch.tensor([0, 1, 2]))


def test_resumed_run_plans_the_same_rounds(tmp_path):
    straight, resumed = resumed_sampler_rounds(["cures"], tmp_path, lambda r: plan(4, 24, 30, r), seed=1, resume_at=6)
    assert resumed == straight
    assert all(sum(c) == 24 for _, c in straight)

def test_a_second_prompt_sampler_is_refused_with_the_switch_to_use():
    with pytest.raises(CompositionError, match="'cures'.*'first_prompts'.*sample_prompts") as error:
        Composition(["cures", FirstPrompts()])
    assert "switch the hook off" in str(error.value)
    composition = Composition([{"cures": {"use_sampler": False}}, FirstPrompts()])
    assert composition.providers("sample_prompts") == ["first_prompts"]
