"""Knapsack RL, enabled by name through its installed entry point; numbers are computed by hand."""

import itertools

import pytest
import torch

from grpo_plugins import Composition, GRPOBatch, Method, PluginError, PromptRound, hookimpl
from grpo_plugins.registry import resolve
from grpo_plugin_knapsack_rl import (
    info_gain,
    item_gains,
    knapsack_allocate,
    knapsack_dp,
    knapsack_greedy,
    needed_rollouts,
    nonzero_gradient_probability,
    rollout_value,
)


def visit(composition, prompt_ids, rewards, step=1):
    """One observed step: completions of ``prompt_ids`` with ``rewards``."""
    batch = GRPOBatch(prompt_ids=torch.tensor(prompt_ids), rewards=torch.tensor(rewards, dtype=torch.float32))
    composition.run_observe(batch, step)


def allocate(composition, prompt_ids, budget, default_rollouts=8):
    round = PromptRound(num_prompts=len(prompt_ids), budget=budget, dataset_size=100, step=1, default_rollouts=default_rollouts)
    return composition.run_allocate_rollouts(round, torch.tensor(prompt_ids))


def test_discovered_from_its_distribution():
    info = resolve("knapsack_rl")
    assert info.distribution == "grpo-plugin-knapsack-rl"
    assert Composition(["knapsack_rl"]).providers("allocate_rollouts") == ["knapsack_rl"]


def test_value_of_the_worked_example():
    # p = 0.5, N = 4: P_nz = 1 - 1/16 - 1/16 = 0.875; InfoGain = 0.5 * 0.25 = 0.125; Value = 0.109375
    assert float(nonzero_gradient_probability(torch.tensor(4.0), torch.tensor(0.5))) == pytest.approx(0.875)
    assert float(info_gain(torch.tensor(0.5))) == pytest.approx(0.125)
    assert float(rollout_value(torch.tensor(4.0), torch.tensor(0.5))) == pytest.approx(0.109375)
    # InfoGain(0.9) = 0.9 * 0.01 = 0.009; InfoGain(0.1) = 0.1 * 0.81 = 0.081
    torch.testing.assert_close(info_gain(torch.tensor([0.9, 0.1], dtype=torch.float64)), torch.tensor([0.009, 0.081], dtype=torch.float64))
    # needed rollouts at p = 0.5, a = 0.9: ln(0.1) / ln(0.5) = 3.3219
    assert float(needed_rollouts(torch.tensor(0.5))) == pytest.approx(3.321928, abs=1e-6)


def test_worked_example_allocation_5_17_2():
    # p = [0.5, 0, 1], budget 24, N_low 2, N_up 8: start [2, 2, 2], 18 left; p = 0.5 needs floor(3.32) = 3 < 18,
    # so 15 go to the p = 0 prompt and the knapsack gives the 3 needed to p = 0.5 -> [5, 17, 2]
    composition = Composition([{"knapsack_rl": {"min_n": 2, "max_n": 8}}])
    visit(composition, [0] * 16 + [1] * 16 + [2] * 16, [1.0, 0.0] * 8 + [0.0] * 16 + [1.0] * 16)
    assert allocate(composition, [0, 1, 2], 24).tolist() == [5, 17, 2]
    metrics = composition.pop_metrics()
    assert metrics["plugins/knapsack_rl/fallback"] == 1.0
    assert metrics["plugins/knapsack_rl/fallback_surplus"] == 15.0


def test_robust_epoch_estimation_by_hand():
    composition = Composition(["knapsack_rl"])
    method = composition.method("knapsack_rl")
    visit(composition, [7] * 4, [1.0] * 4)  # 4 rewards: below the 8 needed, no estimate yet
    p, valid = method.estimates(torch.tensor([7]))
    assert not bool(valid[0]) and float(p[0]) == 1.0
    visit(composition, [7] * 4, [0.0] * 4)  # 8 rewards: mean of the 8 = 0.5
    p, valid = method.estimates(torch.tensor([7]))
    assert bool(valid[0]) and float(p[0]) == pytest.approx(0.5)
    visit(composition, [7] * 12, [0.0] * 12)  # history 1x4, 0x4, 0x12: the latest 16 are all 0
    assert float(method.estimates(torch.tensor([7]))[0][0]) == pytest.approx(0.0)
    visit(composition, [7] * 2, [1.0, 1.0])  # last 16 = 14 zeros + 2 ones -> 2/16
    assert float(method.estimates(torch.tensor([7]))[0][0]) == pytest.approx(2 / 16)
    visit(composition, [7] * 16, [1.0] * 4 + [0.0] * 12)  # a visit of 16: its own mean 4/16
    assert float(method.estimates(torch.tensor([7]))[0][0]) == pytest.approx(0.25)


def test_estimate_without_robust_buffer_is_the_latest_visit():
    composition = Composition([{"knapsack_rl": {"robust_epoch_estimation": False}}])
    visit(composition, [3] * 8, [1.0] * 8)
    visit(composition, [3] * 4, [1.0, 0.0, 0.0, 0.0])
    assert float(composition.method("knapsack_rl").estimates(torch.tensor([3]))[0][0]) == pytest.approx(0.25)


def test_uneven_groups_and_groups_of_one_update_every_prompt():
    composition = Composition([{"knapsack_rl": {"min_rewards": 1}}])
    # group sizes 3, 1, 4, 2 in shuffled order
    ids = [11, 10, 12, 10, 12, 13, 12, 10, 13, 12]
    rewards = [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    visit(composition, ids, rewards)
    p, valid = composition.method("knapsack_rl").estimates(torch.tensor([10, 11, 12, 13]))
    torch.testing.assert_close(p, torch.tensor([2 / 3, 0.0, 3 / 4, 1 / 2], dtype=torch.float64))
    assert valid.all()


def test_unseen_prompts_get_the_default_and_the_result_sums_to_the_budget():
    composition = Composition(["knapsack_rl"])
    counts = allocate(composition, [0, 1, 2, 3], 32)
    assert counts.tolist() == [8, 8, 8, 8]  # identical to plain GRPO until estimates exist


def test_no_knapsack_prompt_sends_the_rest_to_unsolved_prompts():
    composition = Composition(["knapsack_rl"])
    visit(composition, [0] * 8 + [1] * 8 + [2] * 8, [1.0] * 16 + [0.0] * 8)
    # p = [1, 1, 0]: start [2, 2, 2], remaining 18 -> all to the p = 0 prompt
    assert allocate(composition, [0, 1, 2], 24).tolist() == [2, 2, 20]
    # all solved and nothing unsolved: everyone gets the budget evenly
    assert allocate(composition, [0, 1], 16).tolist() == [8, 8]


def test_fallback_candidates():
    p = torch.tensor([0.5, 0.0, 0.0])
    valid = torch.tensor([True, False, True])  # the middle prompt has no estimate yet
    # start [2, 8, 2], budget 30 -> 18 left; p = 0.5 needs 3, so 15 are surplus.
    # released-code reading: the unseen prompt counts as unsolved -> 15 over 2 prompts = 8 + 7 -> [5, 16, 9]
    counts, _ = knapsack_allocate(p, valid, 30, n_default=8, min_n=2, max_n=8)
    assert counts.tolist() == [5, 16, 9]
    # card reading: p = 0 prompts only -> [5, 8, 17]
    counts, _ = knapsack_allocate(p, valid, 30, n_default=8, min_n=2, max_n=8, unseen_count_as_unsolved=False)
    assert counts.tolist() == [5, 8, 17]
    # no unsolved prompt: the surplus goes to the other non-knapsack prompts (here p = 1): 12 left, 9 surplus
    counts, _ = knapsack_allocate(torch.tensor([0.5, 1.0]), torch.tensor([True, True]), 16, n_default=8, max_n=8)
    assert counts.tolist() == [5, 11]
    # every prompt in the knapsack: no candidate, the knapsack places all it can (2 x 6), the rest is spread
    counts, info = knapsack_allocate(torch.tensor([0.5, 0.5]), torch.tensor([True, True]), 24, n_default=8, max_n=8)
    assert counts.tolist() == [12, 12] and info["fallback"] == 0.0


def test_leftover_budget_is_spread_over_knapsack_prompts():
    # two p = 0.5 prompts, N_up 4: the knapsack places 2 + 2; the other 16 are spread evenly -> 12 each
    counts, _ = knapsack_allocate(torch.tensor([0.5, 0.5]), torch.tensor([True, True]), 24, n_default=8, min_n=2, max_n=4)
    assert counts.tolist() == [12, 12]
    # odd leftover: the first knapsack prompt gets the extra one
    counts, _ = knapsack_allocate(torch.tensor([0.5, 0.5]), torch.tensor([True, True]), 25, n_default=8, min_n=2, max_n=4)
    assert counts.tolist() == [13, 12]


def test_paper_objective_versus_released_code_quirk():
    # p = [0.5, 0.1], N_low 2, two extra rollouts, no fallback.
    # paper: marginal gains dV(2) = p^2 q^3 -> 0.03125 (p=.5), 0.00729 (p=.1); dV(3) at p=.5 = 0.125 * (1/16 + 1/16)
    # = 0.015625 > 0.00729, so p = 0.5 takes both -> [4, 2].
    # released code (k = 0 scored 0): [4, 2] is worth V(4, .5) = 0.109375, [3, 3] V(3,.5) + V(3,.1) = 0.09375 + 0.02187
    # = 0.11562 -> [3, 3].
    p, valid = torch.tensor([0.5, 0.1]), torch.tensor([True, True])
    paper, _ = knapsack_allocate(p, valid, 6, n_default=8, min_n=2, max_n=8, allow_fallback=False)
    quirk, _ = knapsack_allocate(p, valid, 6, n_default=8, min_n=2, max_n=8, allow_fallback=False, zero_extra="released_code")
    assert paper.tolist() == [4, 2]
    assert quirk.tolist() == [3, 3]
    for solver in ("greedy", "dp"):
        for zero_extra, expected in (("paper", [4, 2]), ("released_code", [3, 3])):
            counts, _ = knapsack_allocate(
                p, valid, 6, n_default=8, min_n=2, max_n=8, allow_fallback=False, zero_extra=zero_extra, solver=solver
            )
            assert counts.tolist() == expected


@pytest.mark.parametrize("zero_extra", ["paper", "released_code"])
def test_greedy_and_dynamic_programme_reach_the_brute_force_optimum(zero_extra):
    gen = torch.Generator().manual_seed(0)
    for trial in range(60):
        items = int(torch.randint(1, 5, (1,), generator=gen))
        extra = int(torch.randint(0, 5, (1,), generator=gen))
        p = torch.rand(items, generator=gen) if trial % 3 else torch.full((items,), 0.5)  # ties every third trial
        budget = int(torch.randint(0, items * extra + 3, (1,), generator=gen))
        gains = item_gains(p, 2, extra, zero_extra)
        used = min(budget, items * extra)
        best = max(
            sum(float(gains[i, k[i]]) for i in range(items))
            for k in itertools.product(range(extra + 1), repeat=items)
            if sum(k) == used
        )
        for solve in (knapsack_dp, knapsack_greedy):
            units = solve(gains, budget)
            assert int(units.sum()) == used
            assert float(gains.gather(1, units[:, None]).sum()) == pytest.approx(best, abs=1e-12)


def test_prefers_hard_but_solvable_prompts_unlike_uniform_grpo():
    composition = Composition([{"knapsack_rl": {"allow_fallback": False, "max_n": 32}}])
    visit(composition, [0] * 10 + [1] * 10, [1.0] * 9 + [0.0] + [1.0] + [0.0] * 9)  # p = 0.9, p = 0.1
    counts = allocate(composition, [0, 1], 16)
    assert int(counts.sum()) == 16 and counts[1] > counts[0]  # GRPO would give [8, 8]


def test_allocation_is_deterministic():
    gen = torch.Generator().manual_seed(1)
    p = torch.rand(500, generator=gen).round(decimals=1)  # many exact ties, some 0 and 1
    valid = torch.rand(500, generator=gen) > 0.1
    first, _ = knapsack_allocate(p, valid, 4000, n_default=8, max_n=64)
    second, _ = knapsack_allocate(p.clone(), valid.clone(), 4000, n_default=8, max_n=64)
    assert torch.equal(first, second) and int(first.sum()) == 4000


def test_budget_below_the_minimum_is_a_clear_error():
    composition = Composition(["knapsack_rl"])
    visit(composition, [0] * 8 + [1] * 8, [1.0, 0.0] * 8)
    with pytest.raises(PluginError, match="knapsack_rl.*budget 3 is below the minimum allocation 4"):
        allocate(composition, [0, 1], 3)


def test_nan_rewards_are_a_clear_error():
    composition = Composition(["knapsack_rl"])
    batch = GRPOBatch(prompt_ids=torch.tensor([0, 0]), rewards=torch.tensor([1.0, float("nan")]))
    with pytest.raises(Exception, match="NaN"):
        composition.run_advantage_stage(batch)
    with pytest.raises(PluginError, match="knapsack_rl.*observe.*NaN"):
        composition.run_observe(batch, 1)


def test_state_round_trip(tmp_path):
    composition = Composition(["knapsack_rl"])
    visit(composition, [0] * 8 + [1] * 8 + [2] * 16, [1.0, 0.0, 0.0, 0.0] * 4 + [0.0] * 16)
    before = allocate(composition, [0, 1, 2], 30)
    composition.save(tmp_path / "state.pt")
    restored = Composition(["knapsack_rl"])
    restored.load(tmp_path / "state.pt")
    assert torch.equal(allocate(restored, [0, 1, 2], 30), before)
    state = restored.state_dict()["knapsack_rl"]
    assert set(state) == {"keys", "success_rate", "reward_count", "buffer"}
    # continuing from the restored state matches continuing from the original
    visit(composition, [0] * 2, [1.0, 1.0])
    visit(restored, [0] * 2, [1.0, 1.0])
    assert torch.equal(allocate(restored, [0, 1, 2], 30), allocate(composition, [0, 1, 2], 30))


def test_large_allocation_is_optimal():
    """10 000 prompts, a budget of 8 per prompt, N_up = 64 (the round the speed benchmark times:
    benchmarks/methods/): the greedy allocation uses the whole budget within [min_n, max_n], and it is an
    optimal knapsack: no exchange of one rollout between two prompts raises the total value (for concave
    gains this exchange condition is sufficient), and it matches the dynamic programme on a slice."""
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(10_000, generator=gen) * 0.98 + 0.01
    counts, info = knapsack_allocate(p, torch.ones(10_000, dtype=torch.bool), 80_000, n_default=8, max_n=64)
    assert int(counts.sum()) == 80_000 and int(counts.min()) >= 2 and int(counts.max()) <= 64
    assert info["fallback"] == 0.0 and info["num_knapsack_prompts"] == 10_000
    # value of one more rollout (where below N_up) and of the last one given (where above N_low)
    n, q = counts.double(), p.double()
    gain_up = torch.where(counts < 64, rollout_value(n + 1, q) - rollout_value(n, q), float("-inf"))
    loss_down = torch.where(counts > 2, rollout_value(n, q) - rollout_value(n - 1, q), float("inf"))
    assert float(gain_up.max()) <= float(loss_down.min()) + 1e-15
    # on a slice (300 prompts, the same budget per prompt) the exact dynamic programme agrees on the value
    gains = item_gains(p[:300], 2, 62)
    greedy, dp = knapsack_greedy(gains, 1_800), knapsack_dp(gains, 1_800)
    value = lambda units: float(gains.gather(1, units[:, None]).sum())  # noqa: E731
    assert int(greedy.sum()) == int(dp.sum()) == 1_800
    assert value(greedy) == pytest.approx(value(dp), abs=1e-12)


class LowerTheLikelyCorrect(Method):
    """A shaper for the tests (like unlikeliness): correct completions of reward 1 drop to 0.891."""

    name = "lower_the_likely_correct"

    @hookimpl
    def shape_rewards(self, batch: GRPOBatch, rewards: torch.Tensor) -> torch.Tensor:
        return torch.where(rewards >= 1, torch.full_like(rewards, 0.891), rewards)


def test_success_rates_are_read_before_reward_shaping():
    """8/8 correct with a shaper: p = 1 (the card's binary rewards), not 0.891; 2/4 correct: p = 0.5."""
    composition = Composition([LowerTheLikelyCorrect(), {"knapsack_rl": {"robust_epoch_estimation": False}}])
    batch = GRPOBatch(prompt_ids=torch.tensor([3] * 8 + [4] * 4),
                      rewards=torch.tensor([1.0] * 8 + [1.0, 1.0, 0.0, 0.0]))
    composition.run_advantage_stage(batch)
    composition.run_observe(batch, 1)
    assert batch.rewards[0].item() == pytest.approx(0.891)
    p, valid = composition.method("knapsack_rl").estimates(torch.tensor([3, 4]))
    assert p.tolist() == [1.0, 0.5]
