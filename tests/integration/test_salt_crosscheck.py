"""SALT against verl's own GRPO estimator (``compute_grpo_outcome_advantage``): on a degenerate graph (no edge
shared by two trajectories) SALT is verl's multi-trajectory GRPO -- over one row per turn carrying the
trajectory's outcome (``episode_weighting='step'``) or over one row per trajectory copied to its turns
(``'trajectory'``); with shared edges each step gets the mean of verl's trajectory advantages over the
trajectories through its edge."""

import pytest

pytest.importorskip("verl")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage  # noqa: E402

from grpo_plugins import Composition, GRPOBatch, Steps  # noqa: E402


def random_trajectories(seed: int, distinct: bool):
    """Queries with 1 to 5 trajectories of 1 to 4 one-token actions; outcomes in {0, 0.5, 1, 2}. ``distinct``:
    every action differs (no shared edge); else actions drawn from {1, 2}, so histories coincide often."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [5, 4, 1, 3, 2]
    prompts = [p for p, size in enumerate(sizes) for _ in range(size)]
    turns = torch.randint(1, 5, (len(prompts),), generator=gen).tolist()
    outcomes = torch.tensor([0.0, 0.5, 1.0, 2.0])[torch.randint(0, 4, (len(prompts),), generator=gen)].tolist()
    total = sum(turns)
    tokens = (torch.arange(total) + 10) if distinct else torch.randint(1, 3, (total,), generator=gen)
    actions, k = [], 0
    for n in turns:
        actions.append(tokens[k:k + n].tolist())
        k += n
    return prompts, actions, outcomes


def step_batch(prompts, actions, outcomes, one_row_per_turn: bool) -> GRPOBatch:
    """Rows = trajectories (turns separated by an environment token 99) or rows = turns."""
    row, start, end, trajectory, turn, row_prompt, row_reward, row_ids = ([] for _ in range(8))
    for i, taken in enumerate(actions):
        ids = []
        for t, action in enumerate(taken):
            if one_row_per_turn:
                ids = []
            row.append(len(row_prompt))
            start.append(len(ids))
            ids += [action]
            end.append(len(ids))
            ids += [] if one_row_per_turn else [99]
            trajectory.append(i)
            turn.append(t)
            if one_row_per_turn or t == len(taken) - 1:
                row_prompt.append(prompts[i])
                row_reward.append(outcomes[i])
                row_ids.append(ids)
    width = max(len(ids) for ids in row_ids)
    completion_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids in row_ids])
    mask = torch.zeros(completion_ids.shape)
    for r, a, b in zip(row, start, end):
        mask[r, a:b] = 1.0
    s = len(row)
    steps = Steps(row=torch.tensor(row), start=torch.tensor(start), end=torch.tensor(end),
                  trajectory=torch.tensor(trajectory), turn=torch.tensor(turn), reward=torch.full((s,), float("nan")),
                  key=torch.full((s,), -1))
    return GRPOBatch(prompt_ids=torch.tensor(row_prompt), rewards=torch.tensor(row_reward),
                     completion_ids=completion_ids, completion_mask=mask, steps=steps)


def verl_grpo(prompts, rewards) -> torch.Tensor:
    scores = torch.zeros(len(rewards), 3)
    scores[:, -1] = torch.tensor(rewards)
    advantages, _ = compute_grpo_outcome_advantage(scores, torch.ones(len(rewards), 3), np.array(prompts), epsilon=1e-6)
    return advantages[:, 0]


def salt(batch: GRPOBatch, **config) -> torch.Tensor:
    Composition([{"salt": config}]).run_advantage_stage(batch)
    return batch.advantages[batch.steps.row, batch.steps.start]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_degenerate_graph_is_verl_multi_trajectory_grpo(seed):
    prompts, actions, outcomes = random_trajectories(seed, distinct=True)
    turn_rows = verl_grpo([prompts[i] for i, a in enumerate(actions) for _ in a],
                          [outcomes[i] for i, a in enumerate(actions) for _ in a])
    copied = torch.cat([verl_grpo(prompts, outcomes)[i].expand(len(a)) for i, a in enumerate(actions)])
    for one_row_per_turn in (False, True):
        for edge in ("prefix", "state"):
            batch = step_batch(prompts, actions, outcomes, one_row_per_turn)
            torch.testing.assert_close(salt(batch, edge=edge), copied, rtol=1e-6, atol=1e-6)
            batch = step_batch(prompts, actions, outcomes, one_row_per_turn)
            got = salt(batch, edge=edge, episode_weighting="step")
            torch.testing.assert_close(got, turn_rows, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_shared_prefixes_average_verl_trajectory_advantages(seed):
    prompts, actions, outcomes = random_trajectories(seed, distinct=False)
    base = verl_grpo(prompts, outcomes)
    expected = []
    for i, taken in enumerate(actions):
        for t in range(len(taken)):
            through = [j for j, other in enumerate(actions)
                       if prompts[j] == prompts[i] and other[:t + 1] == taken[:t + 1]]
            expected.append(base[through].double().mean().item())
    batch = step_batch(prompts, actions, outcomes, one_row_per_turn=False)
    got = salt(batch)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, torch.cat([base[i].expand(len(a)) for i, a in enumerate(actions)]))
