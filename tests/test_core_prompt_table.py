"""PromptTable: per-prompt state keyed by int64 prompt id, vectorised, checkpointable."""

import torch

from grpo_plugins import PromptTable
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
