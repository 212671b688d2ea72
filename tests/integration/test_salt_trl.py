"""SALT through the real TRL GRPOTrainer on the multi-turn corridor (``examples/multi_turn/corridor.py``): the
adapter's step records (turn spans from ``env_mask``, the cells as ``step_keys``) and the completion tokens
build the trajectory graph; every policy token gets the mean outcome advantage of the trajectories sharing
its step's edge, recomputed here by hand from the recorded batch."""

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402

from grpo_plugins.testing import BatchRecorder  # noqa: E402


def expected_step_advantages(batch, edge: str) -> tuple[list[float], int]:
    """SALT by hand, one step at a time: the trajectories' GRPO advantages and the edges as Python tuples."""
    rewards = batch.rewards.double()
    outcome = {}
    for prompt in batch.prompt_ids.unique().tolist():
        rows = (batch.prompt_ids == prompt).nonzero().flatten()
        r = rewards[rows]
        a = torch.zeros_like(r) if r.max() == r.min() else (r - r.mean()) / (r.std() + 1e-6)
        outcome.update(zip(rows.tolist(), a.tolist()))
    steps = batch.steps
    keys = []
    for s in range(steps.num_steps):
        row, turn = int(steps.row[s]), int(steps.turn[s])
        history = []
        for p in range(steps.num_steps):  # this row's steps up to this turn (prefix), or the step alone (state)
            if int(steps.row[p]) == row and (int(steps.turn[p]) <= turn if edge == "prefix" else p == s):
                tokens = batch.completion_ids[row, int(steps.start[p]):int(steps.end[p])].tolist()
                history.append((int(steps.turn[p]), int(steps.key[p]), tuple(tokens)))
        keys.append((int(batch.prompt_ids[row]), tuple(sorted(history))) if edge == "prefix"
                    else (int(batch.prompt_ids[row]), history[0][1:]))
    values = []
    for s in range(steps.num_steps):
        sharing = {int(steps.row[p]) for p in range(steps.num_steps) if keys[p] == keys[s]}
        values.append(sum(outcome[j] for j in sharing) / len(sharing))
    shared = sum(len({int(steps.row[p]) for p in range(steps.num_steps) if keys[p] == keys[s]}) > 1
                 for s in range(steps.num_steps))
    return values, shared


def check_salt(batch, edge: str) -> int:
    steps, mask = batch.steps, batch.completion_mask > 0
    assert steps is not None and int(steps.turn.max()) >= 1
    assert bool((batch.advantages[~mask] == 0).all())  # observation tokens get nothing
    expected, shared = expected_step_advantages(batch, edge)
    for s in range(steps.num_steps):  # every token of a step carries the step's value
        values = batch.advantages[steps.row[s], steps.start[s]:steps.end[s]].double()
        assert torch.allclose(values, torch.tensor(expected[s], dtype=torch.float64).expand_as(values),
                              rtol=1e-5, atol=1e-6), s
    return shared


def test_salt_assigns_the_graph_advantages_on_policy_tokens(corridor_run):
    recorder = BatchRecorder()
    trainer = corridor_run(["salt", recorder], max_steps=2)
    shared = sum(check_salt(batch, "prefix") for batch in recorder.batches)
    assert shared > 0  # trajectories of one start cell share edges (their first moves coincide)
    logs = [row for row in trainer.state.log_history if "plugins/salt/frac_shared_steps" in row]
    assert logs and any(row["plugins/salt/frac_shared_steps"] > 0 for row in logs)
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in trainer.state.log_history if "loss" in row)


def test_salt_state_keying_composed_with_sapo(corridor_run):
    recorder = BatchRecorder()
    trainer = corridor_run([{"salt": {"edge": "state"}}, "sapo", recorder], max_steps=1)
    check_salt(recorder.batches[-1], "state")
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in trainer.state.log_history if "loss" in row)
