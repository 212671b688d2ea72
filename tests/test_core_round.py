"""Round planning with a variable number of prompts, the run length, and the batch fields methods require."""

import pytest
import torch

from grpo_plugins import Composition, CompositionError, GRPOBatch, Method, PluginError, PromptRound
from grpo_plugins.testing import make_batch, method_with as named

ROUND = PromptRound(num_prompts=4, budget=12, dataset_size=50, step=3, default_rollouts=3)


def sampler(count):
    return named("sampler", sample_prompts=lambda round, generator: torch.randint(0, 50, (count,), generator=generator))


# ---------------------------------------------------------------- sample_prompts returns P' prompts
@pytest.mark.parametrize("count", [1, 4, 6, 12])
def test_sample_prompts_may_return_from_one_to_budget_prompts(count):
    prompts = Composition([sampler(count)]).run_sample_prompts(ROUND, torch.Generator().manual_seed(0))
    assert prompts.shape == (count,) and prompts.dtype == torch.long


@pytest.mark.parametrize("count", [0, 13])
def test_sample_prompts_outside_one_to_budget_is_named(count):
    with pytest.raises(PluginError, match=rf"'sampler'.*'sample_prompts'.*shape \({count},\).*budget 12"):
        Composition([sampler(count)]).run_sample_prompts(ROUND, torch.Generator())


def test_sample_prompts_must_be_one_dimensional():
    flat = named("sampler", sample_prompts=lambda: torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(PluginError, match=r"shape \(2, 2\), expected \(P',\)"):
        Composition([flat]).run_sample_prompts(ROUND, torch.Generator())


# ---------------------------------------------------------------- default split of the budget
@pytest.mark.parametrize("count,each", [(1, 12), (4, 3), (6, 2), (12, 1)])
def test_default_counts_split_the_budget_evenly(count, each):
    counts = Composition([]).rollout_counts(ROUND, torch.arange(count))
    assert counts.tolist() == [each] * count  # 12 / P' by hand


def test_default_counts_that_cannot_split_evenly_are_a_clear_error():
    with pytest.raises(CompositionError, match=r"5 prompts \(from \['sampler'\]\).*budget of 12.*does not split evenly"):
        Composition([sampler(5)]).rollout_counts(ROUND, torch.arange(5))


def test_a_provider_decides_the_counts_of_any_number_of_prompts():
    uneven = named("alloc", allocate_rollouts=lambda prompt_ids: torch.tensor([5, 4, 3, 0, 0]))
    assert Composition([uneven]).rollout_counts(ROUND, torch.arange(5)).tolist() == [5, 4, 3, 0, 0]
    short = named("alloc", allocate_rollouts=lambda prompt_ids: torch.ones(5, dtype=torch.long))
    with pytest.raises(PluginError, match="summing to 5, expected the budget 12"):
        Composition([short]).rollout_counts(ROUND, torch.arange(5))


# ---------------------------------------------------------------- run length
def test_total_steps_is_optional_and_carried():
    assert ROUND.total_steps is None and make_batch().total_steps is None
    round = PromptRound(num_prompts=4, budget=12, dataset_size=50, step=3, default_rollouts=3, total_steps=100)
    seen = []
    reader = named("reader", augment_prompts=lambda round, prompts: seen.append(round.total_steps) or prompts)
    Composition([reader]).run_augment_prompts(round, torch.arange(1), ["p"], [{}])
    assert seen == [100]
    batch = GRPOBatch(prompt_ids=torch.tensor([0, 0]), rewards=torch.tensor([0.0, 1.0]), total_steps=7)
    assert batch.total_steps == 7


# ---------------------------------------------------------------- required batch fields
def test_required_fields_are_the_union_of_the_methods_requirements():
    assert Composition([]).required_fields() == set()
    composition = Composition([named("a", requires=["old_log_probs"]), named("b", requires=["old_log_probs", "rows"])])
    assert composition.required_fields() == {"old_log_probs", "rows"}
    assert composition.requirers("old_log_probs") == ["a", "b"] and composition.requirers("rows") == ["b"]


def test_requirements_may_follow_the_config():
    class Needs(Method):
        name = "needs"

        def __init__(self, wants: bool):
            super().__init__()
            self.wants = wants

        def requires(self):
            return {"old_log_probs"} if self.wants else set()

    assert Composition([Needs(True)]).required_fields() == {"old_log_probs"}
    assert Composition([Needs(False)]).required_fields() == set()


def test_an_unknown_required_field_is_a_start_up_error():
    with pytest.raises(CompositionError, match=r"'typo'.*requires unknown batch field\(s\) \['old_logprobs'\]"):
        Composition([named("typo", requires=["old_logprobs"])])
