"""Trajectories stored one turn per row (verl's agent-loop rows): ``turn_row_steps`` and ``last_turn_rows``."""

import torch

from grpo_plugins.steps import last_turn_rows, turn_row_steps


def test_turn_row_steps_one_step_per_row_with_a_token():
    lengths = torch.tensor([3, 0, 2, 4])  # row 1 holds no token (no step)
    trajectory = torch.tensor([5, 5, 9, 5])
    turn = torch.tensor([0, 1, 0, 2])
    prompt_ids = torch.tensor([7, 7, 7, 7])
    steps = turn_row_steps(lengths, trajectory, turn, prompt_ids)
    assert steps.row.tolist() == [0, 2, 3] and steps.start.tolist() == [0, 0, 0] and steps.end.tolist() == [3, 2, 4]
    assert steps.trajectory.tolist() == [5, 9, 5] and steps.turn.tolist() == [0, 0, 2]
    assert steps.key.tolist() == [7, 7, -1]  # no keys: the first turn acts in the prompt's state
    assert bool(torch.isnan(steps.reward).all())
    assert steps.problems(4, 4) == []
    given = turn_row_steps(lengths, trajectory, turn, prompt_ids, reward=torch.tensor([0.5, 1.0, float("nan"), 2.0]),
                           key=torch.tensor([11, 12, -1, 13]))
    assert given.key.tolist() == [11, -1, 13]  # given keys as given (-1: unknown)
    assert given.reward[0] == 0.5 and torch.isnan(given.reward[1]) and given.reward[2] == 2.0


def test_last_turn_rows_in_order_of_first_appearance():
    # rows: trajectory b turn 1, a turn 0, b turn 0, c turn 0, a turn 2, a turn 1
    trajectory = torch.tensor([20, 10, 20, 30, 10, 10])
    turn = torch.tensor([1, 0, 0, 0, 2, 1])
    last, position = last_turn_rows(trajectory, turn)
    assert last.tolist() == [0, 4, 3]  # b first seen at row 0, a at row 1, c at row 3
    assert position.tolist() == [0, 1, 0, 2, 1, 1]
    assert torch.equal(last[position][[0, 4, 3]], torch.tensor([0, 4, 3]))
