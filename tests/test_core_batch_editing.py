"""Batch editing in the core (torch + pluggy + the core only): which groups dynamic sampling drops, whole-group
keep masks, and the refill bookkeeping (rounds, bound, surplus, the exhausted behaviour, what it cost)."""

import pytest
import torch

from grpo_plugins import GRPOBatch
from grpo_plugins.batch_editing import (
    RefillExhausted,
    RefillPlan,
    filter_groups_keep,
    filter_metric,
    informative_groups,
    kept_groups,
)


def batch(rewards, prompt_ids, components=None, names=()):
    return GRPOBatch(prompt_ids=torch.tensor(prompt_ids), rewards=torch.tensor(rewards, dtype=torch.float32),
                     reward_components=None if components is None else torch.tensor(components, dtype=torch.float32),
                     reward_names=tuple(names))


def test_design_example_drops_the_constant_group():
    # docs/design.md: rewards [1, 1, 0, 1] in groups [a, a, b, b] keep [False, False, True, True]
    assert filter_groups_keep(batch([1, 1, 0, 1], [7, 7, 9, 9])).tolist() == [False, False, True, True]


def test_verl_rule_groups_of_one_kept_and_exact_at_any_scale():
    # verl drops a group when len > 1 and std == 0; a group of one is kept
    values = torch.tensor([0.1, 0.1, 0.1, 5.0, 1e4 + 0.1, 1e4 + 0.1, 3.0, 3.0 + 1e-3])
    index = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3])
    assert informative_groups(values, index, 4).tolist() == [False, True, False, True]


def test_metric_names_a_reward_component():
    # rewards differ in group a through the second component only; the first component is constant there
    b = batch([1.0, 2.0, 0.0, 1.0], [1, 1, 2, 2], components=[[1, 0], [1, 1], [0, 0], [1, 0]], names=("acc", "fmt"))
    assert filter_groups_keep(b, "acc").tolist() == [False, False, True, True]
    assert filter_groups_keep(b, "reward").tolist() == [True, True, True, True]
    with pytest.raises(ValueError, match="filter_groups_metric='score' is neither 'reward' nor a reward function"):
        filter_metric(b, "score")
    nan = batch([1.0, 2.0], [1, 1], components=[[float("nan"), 0], [1, 1]], names=("acc", "fmt"))
    with pytest.raises(ValueError, match=r"gave no value \(NaN\) for completions \[0\]"):
        filter_metric(nan, "acc")


def test_whole_groups_only():
    index = torch.tensor([0, 0, 1, 1, 2])
    assert kept_groups(torch.tensor([True, True, False, False, True]), index, 3).tolist() == [True, False, True]
    with pytest.raises(ValueError, match=r"my_method kept some rows of group\(s\) \[1\]"):
        kept_groups(torch.tensor([True, True, True, False, True]), index, 3, who="my_method")


def sizes(*values):
    return torch.tensor(values)


def test_refill_until_full_then_surplus_discarded():
    plan = RefillPlan(target_rows=8, max_num_gen_batches=10)
    plan.add_round(sizes(4, 4), torch.tensor([10, 11]), torch.tensor([False, True]))
    assert plan.missing_rows == 4 and plan.may_generate()
    plan.add_round(sizes(4, 4), torch.tensor([12, 13]), torch.tensor([True, True]))
    assert plan.missing_rows == 0 and not plan.may_generate()
    assert plan.select() == [(0, 1), (1, 0)]
    assert plan.metrics() == {
        "generation_rounds": 2.0, "refill_rounds": 1.0, "rollouts": 16.0, "refill_rollouts": 8.0,
        "dropped_groups": 1.0, "repeated_groups": 0.0, "discarded_surplus_groups": 1.0, "filled_with_dropped_groups": 0.0,
    }


def test_bound_counts_the_first_round_and_zero_means_no_limit():
    plan = RefillPlan(target_rows=4, max_num_gen_batches=2)
    for _ in range(2):
        plan.add_round(sizes(4), torch.tensor([len(plan.rounds)]), torch.tensor([False]))
    assert not plan.may_generate()  # two rounds, the first included
    unlimited = RefillPlan(target_rows=4, max_num_gen_batches=0)
    for r in range(50):
        unlimited.add_round(sizes(4), torch.tensor([r]), torch.tensor([False]))
    assert unlimited.may_generate()


def test_exhausted_error_or_keep_dropped():
    def short(exhausted):
        plan = RefillPlan(target_rows=8, max_num_gen_batches=2, exhausted=exhausted)
        plan.add_round(sizes(4, 4), torch.tensor([1, 2]), torch.tensor([False, False]))
        plan.add_round(sizes(4, 4), torch.tensor([3, 4]), torch.tensor([False, True]))
        return plan

    with pytest.raises(RefillExhausted, match=r"kept 4 of the 8 rows .* after 2 generation round\(s\) \(max_num_gen_batches=2\)"):
        short("error").select()
    plan = short("keep_dropped")
    assert plan.select() == [(0, 0), (1, 1)]  # the earliest dropped group completes the batch, generation order kept
    assert plan.metrics()["filled_with_dropped_groups"] == 1.0
    with pytest.raises(ValueError, match="exhausted must be one of"):
        RefillPlan(target_rows=8, exhausted="pad")


def test_a_prompt_kept_earlier_is_not_kept_twice():
    plan = RefillPlan(target_rows=8)
    plan.add_round(sizes(4, 4), torch.tensor([5, 6]), torch.tensor([True, False]))
    plan.add_round(sizes(4, 4), torch.tensor([5, 7]), torch.tensor([True, True]))  # prompt 5 again
    assert plan.select() == [(0, 0), (1, 1)]
    assert plan.metrics()["repeated_groups"] == 1.0


def test_uneven_groups_first_fit():
    plan = RefillPlan(target_rows=6, exhausted="error")
    plan.add_round(sizes(4, 3, 2), torch.tensor([1, 2, 3]), torch.tensor([True, True, True]))
    assert plan.select() == [(0, 0), (0, 2)]  # 4 + 2: the group of 3 does not fit after the first
