"""PromptTable and the shared curriculum helpers: per-prompt state keyed by int64 prompt id, vectorised,
checkpointable; outcomes, weighted draws, and a resumed run that plans exactly what an uninterrupted one does."""

import pytest
import torch

from grpo_plugins import Composition, GRPOBatch, Method, PromptRound, PromptTable, hookimpl
from grpo_plugins.budgets import apportion
from grpo_plugins.prompt_table import draw_weighted, group_outcomes, unit_outcomes
from grpo_plugins.testing import make_batch
from grpo_plugins.validation import check_plain_state


def table() -> PromptTable:
    return PromptTable(mean=(0.5, torch.float64, ()), count=(0, torch.long, ()), hist=(-1.0, torch.float32, (2,)))


def test_unknown_prompts_read_the_defaults():
    t = table()
    assert t.get("mean", torch.tensor([3, 7])).tolist() == [0.5, 0.5]
    assert t.get("count", torch.tensor([3])).dtype == torch.long
    assert t.get("hist", torch.tensor([1, 2, 3])).tolist() == [[-1.0, -1.0]] * 3
    assert t.get("mean", torch.zeros(0, dtype=torch.long)).shape == (0,)


def test_rows_insert_in_sorted_order_and_updates_stick():
    t = table()
    big = 2**62 + 5  # a 63-bit text hash
    rows = t.rows(torch.tensor([9, big, 2, 9]))
    assert t.keys.tolist() == [2, 9, big]
    assert rows.tolist() == [1, 2, 0, 1]  # repeats share a row
    t.columns["mean"][rows[:3]] = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    t.columns["count"][rows] += 1
    assert t.get("mean", torch.tensor([2, 9, big, 4])).tolist() == [0.3, 0.1, 0.2, 0.5]
    assert t.get("count", torch.tensor([9, 2])).tolist() == [1, 1]  # duplicate index adds once
    # inserting more keeps the old rows' values with their keys
    t.rows(torch.tensor([1, 5]))
    assert t.keys.tolist() == [1, 2, 5, 9, big]
    assert t.get("mean", torch.tensor([9, 1, big])).tolist() == [0.1, 0.5, 0.2]


def test_state_round_trip_is_plain_and_weights_only(tmp_path):
    t = table()
    rows = t.rows(torch.tensor([4, 8]))
    t.columns["hist"][rows] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    state = t.state_dict()
    assert check_plain_state(state) is None
    torch.save(state, tmp_path / "table.pt")
    restored = table()
    restored.load_state_dict(torch.load(tmp_path / "table.pt", weights_only=True))
    assert restored.get("hist", torch.tensor([8, 4, 0])).tolist() == [[3.0, 4.0], [1.0, 2.0], [-1.0, -1.0]]
    t.columns["hist"][0, 0] = 99.0  # the state is a copy
    assert restored.get("hist", torch.tensor([4])).tolist() == [[1.0, 2.0]]


def test_add_accumulates_repeated_ids_and_set_overwrites():
    t = table()
    t.add("count", torch.tensor([3, 3, 5]), torch.tensor([1, 2, 4]))
    assert t.get("count", torch.tensor([3, 5, 7])).tolist() == [3, 4, 0]  # repeats accumulate, unknown = default
    t.add("mean", torch.tensor([5]), 0.25)  # a scalar adds to every id
    t.set("hist", torch.tensor([3]), torch.tensor([[7.0, 8.0]]))
    assert t.get("mean", torch.tensor([5, 3])).tolist() == [0.75, 0.5]
    assert t.get("hist", torch.tensor([3])).tolist() == [[7.0, 8.0]]
    assert len(t) == 2


def test_load_refuses_missing_or_misshapen_columns():
    t = table()
    t.rows(torch.tensor([1, 2]))
    state = t.state_dict()
    with pytest.raises(ValueError, match="lacks \\['count'\\]"):
        table().load_state_dict({k: v for k, v in state.items() if k != "count"})
    with pytest.raises(ValueError, match="column 'hist' has shape"):
        table().load_state_dict({**state, "hist": torch.zeros(2, 3)})


def test_outcomes_map_threshold_and_refuse_nan():
    rewards = torch.tensor([-1.0, 0.0, 0.5, 1.0, 3.0])
    assert unit_outcomes(rewards, (-1.0, 1.0)).tolist() == [0.0, 0.5, 0.75, 1.0, 1.0]
    assert unit_outcomes(rewards, threshold=0.5).tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="NaN"):
        unit_outcomes(torch.tensor([1.0, float("nan")]))
    batch = make_batch(group_sizes=(3, 1, 2), rewards=[1.0, 0.0, 1.0, 1.0, 0.0, 0.0], shuffle=False)
    ids, successes, trials = group_outcomes(batch, unit_outcomes(batch.rewards))
    assert ids.tolist() == [10, 11, 12] and successes.tolist() == [2.0, 1.0, 0.0] and trials.tolist() == [3.0, 1.0, 2.0]


def test_draw_weighted_is_seeded_and_respects_zero_weights():
    weights = torch.tensor([0.0, 1.0, 3.0, 0.0])
    first = draw_weighted(weights, 2, torch.Generator().manual_seed(5))
    assert sorted(first.tolist()) == [1, 2]  # without replacement while enough prompts have weight
    again = draw_weighted(weights, 2, torch.Generator().manual_seed(5))
    assert first.tolist() == again.tolist()
    many = draw_weighted(weights, 400, torch.Generator().manual_seed(0))  # more than the weighted prompts: replacement
    assert set(many.tolist()) == {1, 2} and abs(float((many == 2).double().mean()) - 0.75) < 0.08
    assert draw_weighted(torch.zeros(3), 3, torch.Generator().manual_seed(0)).sort().values.tolist() == [0, 1, 2]


class _PassRateSampler(Method):
    """A minimal curriculum on the core's shared parts: counts in a PromptTable, weighted draws."""

    name = "pass_rate_sampler"

    def __init__(self, config=None):
        super().__init__(config)
        self.table = PromptTable(successes=(0.0, torch.float64, ()), trials=(0.0, torch.float64, ()))

    @hookimpl
    def sample_prompts(self, round, generator):
        ids = torch.arange(round.dataset_size)
        p = (self.table.get("successes", ids) + 1) / (self.table.get("trials", ids) + 2)
        return draw_weighted(p * (1 - p), round.num_prompts, generator)

    @hookimpl
    def allocate_rollouts(self, round, prompt_ids):
        p = (self.table.get("successes", prompt_ids) + 1) / (self.table.get("trials", prompt_ids) + 2)
        return apportion(torch.sqrt(p * (1 - p)), round.budget, 2, 16)

    @hookimpl
    def observe(self, batch):
        ids, successes, trials = group_outcomes(batch, unit_outcomes(batch.rewards))
        self.table.add("successes", ids, successes)
        self.table.add("trials", ids, trials)

    def state_dict(self):
        return self.table.state_dict()

    def load_state_dict(self, state):
        self.table.load_state_dict(state)


def _play(composition, generator, rounds, start=0):
    """Plan ``rounds`` rounds, answer each with deterministic rewards, observe; the planned (ids, counts)."""
    planned = []
    for r in range(start, start + rounds):
        plan = PromptRound(num_prompts=4, budget=24, dataset_size=30, step=r, default_rollouts=6)
        ids = composition.run_sample_prompts(plan, generator)
        counts = composition.rollout_counts(plan, ids)
        planned.append((ids.tolist(), counts.tolist()))
        prompt_ids = torch.repeat_interleave(ids, counts)
        rewards = ((prompt_ids * 7 + torch.arange(prompt_ids.numel())) % 3 == 0).float()
        composition.run_observe(GRPOBatch(prompt_ids=prompt_ids, rewards=rewards), r + 1)
    return planned


def test_resumed_run_draws_what_an_uninterrupted_run_draws(tmp_path):
    straight = Composition([_PassRateSampler()])
    uninterrupted = _play(straight, torch.Generator().manual_seed(3), 8)
    first = Composition([_PassRateSampler()])
    generator = torch.Generator().manual_seed(3)
    head = _play(first, generator, 5)
    first.save(tmp_path / "state.pt")
    generator_state = generator.get_state()
    resumed = Composition([_PassRateSampler()])
    resumed.load(tmp_path / "state.pt")
    tail = _play(resumed, torch.Generator().set_state(generator_state), 3, start=5)
    assert head + tail == uninterrupted
    assert all(sum(counts) == 24 for _, counts in uninterrupted)
