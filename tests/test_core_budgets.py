"""Exact rollout budgets: water-filling quotas, largest-remainder rounding, bounds, even spreads."""

import pytest
import torch

from grpo_plugins.budgets import apportion, check_budget, proportional_quotas, round_to_total, spread_evenly


def test_cures_card_example():
    # sigma = [0.5, sqrt(0.25 * 0.75) = 0.4330, 0], budget 16 -> quotas 16 sigma / 0.933 = [8.574, 7.426, 0] -> [9, 7, 0]
    sigma = torch.tensor([0.5, (0.25 * 0.75) ** 0.5, 0.0])
    torch.testing.assert_close(proportional_quotas(sigma, 16), torch.tensor([8.5744, 7.4256, 0.0], dtype=torch.float64), atol=1e-4, rtol=0)
    assert apportion(sigma, 16).tolist() == [9, 7, 0]


def test_gdro_card_square_root_rule():
    # q = [.8, .2], sigma^2 = .3 in both bins, 4 prompts each, budget 64, n in [1, 64]:
    # n ∝ sqrt(q sigma^2) -> 10.667 and 5.333 -> the 4 extra units go to the larger remainders -> [11, 5]
    weights = torch.tensor([(0.8 * 0.3) ** 0.5] * 4 + [(0.2 * 0.3) ** 0.5] * 4)
    quotas = proportional_quotas(weights, 64, 1, 64)
    torch.testing.assert_close(quotas, torch.tensor([32 / 3] * 4 + [16 / 3] * 4, dtype=torch.float64))
    assert apportion(weights, 64, 1, 64).tolist() == [11] * 4 + [5] * 4


def test_bounds_are_water_filled():
    # weight 10 wants 10 of 12 but is capped at 6; the other two share the remaining 6 equally
    assert apportion(torch.tensor([10.0, 1.0, 1.0]), 12, 2, 6).tolist() == [6, 3, 3]
    # a minimum lifts a small weight; the rest stays proportional among the others
    torch.testing.assert_close(proportional_quotas(torch.tensor([1.0, 1.0, 0.01]), 10, 2), torch.tensor([4.0, 4.0, 2.0], dtype=torch.float64))
    # per-prompt bounds as tensors
    counts = apportion(torch.tensor([1.0, 1.0, 1.0]), 9, torch.tensor([0, 0, 5]), torch.tensor([9, 1, 9]))
    assert counts.tolist() == [3, 1, 5]


def test_even_split_and_ties_go_to_the_earlier_prompt():
    assert apportion(torch.ones(5), 12).tolist() == [3, 3, 2, 2, 2]
    assert apportion(torch.zeros(3), 7, 1, 5).tolist() == [3, 2, 2]  # no weight: the rest is split evenly
    members = torch.tensor([True, False, True, True, False])
    assert spread_evenly(torch.zeros(5, dtype=torch.long), members, 7).tolist() == [3, 0, 2, 2, 0]
    assert spread_evenly(torch.ones(3, dtype=torch.long), torch.zeros(3, dtype=torch.bool), 4).tolist() == [1, 1, 1]


def test_zero_weight_prompts_get_zero_and_totals_are_exact():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        num = int(torch.randint(1, 40, (1,), generator=gen))
        weights = torch.rand(num, generator=gen) * (torch.rand(num, generator=gen) > 0.3)
        high = int(torch.randint(1, 10, (1,), generator=gen))
        total = int(torch.randint(0, num * high + 1, (1,), generator=gen))
        counts = apportion(weights, total, 0, high)
        assert counts.dtype == torch.int64 and int(counts.sum()) == total
        assert bool((counts >= 0).all()) and bool((counts <= high).all())
        if total <= int(((weights > 0).sum()) * high) and bool((weights > 0).any()):
            assert bool((counts[weights == 0] == 0).all())  # a prompt without weight is dropped cleanly
        quotas = proportional_quotas(weights, total, 0, high)
        assert bool(((counts.double() - quotas).abs() < 1).all())  # rounding moves each by less than one


def test_round_to_total_takes_back_float_slop():
    assert round_to_total(torch.tensor([2.5, 2.5, 1.0000000001]), 6).tolist() == [3, 2, 1]
    assert round_to_total(torch.tensor([3.6, 3.6]), 7).tolist() == [4, 3]


def test_infeasible_budgets_are_refused_with_numbers():
    with pytest.raises(ValueError, match="cannot give 3 prompts their minimum"):
        apportion(torch.ones(3), 5, 2)
    with pytest.raises(ValueError, match="exceeds what 2 prompts may take"):
        apportion(torch.ones(2), 9, 0, 4)
    with pytest.raises(ValueError, match="finite"):
        apportion(torch.tensor([1.0, float("nan")]), 4)
    lo, hi = check_budget(2, 8, 1, None)
    assert lo.tolist() == [1.0, 1.0] and hi.tolist() == [8.0, 8.0]


def test_scale_is_vectorised():
    # 10^5 prompts, budgets up to 64 per prompt: the totals hold (speed is in benchmarks/curricula.py)
    weights = torch.rand(100_000, generator=torch.Generator().manual_seed(1))
    counts = apportion(weights, 800_000, 0, 64)
    assert int(counts.sum()) == 800_000 and int(counts.max()) <= 64
