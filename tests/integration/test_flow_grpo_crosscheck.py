"""Flow-GRPO against verl's own GRPO estimator (``compute_grpo_outcome_advantage``): the released AgentFlow code
gives verl one row per turn, each carrying its trajectory's outcome, grouped by query (``episode_weighting=
'step'``); the paper's formula is verl's GRPO over one row per trajectory, copied to the turns
(``'trajectory'``). Both layouts of the step records (rows = trajectories as on TRL, rows = turns as on
verl) give the same numbers."""

import pytest

pytest.importorskip("verl")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage  # noqa: E402

from grpo_plugins import Composition, GRPOBatch, Steps  # noqa: E402


def random_trajectories(seed: int):
    """Queries with 1 to 5 trajectories of 1 to 4 turns; outcomes in {0, 0.5, 1, 2} (ties, a constant query)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [5, 4, 1, 3, 2]
    prompts = [p for p, size in enumerate(sizes) for _ in range(size)]
    turns = torch.randint(1, 5, (len(prompts),), generator=gen).tolist()
    outcomes = torch.tensor([0.0, 0.5, 1.0, 2.0])[torch.randint(0, 4, (len(prompts),), generator=gen)]
    outcomes[sizes[0]:sizes[0] + sizes[1]] = 1.0  # query 1: all equal
    return prompts, turns, outcomes.tolist()


def step_batch(prompts, turns, outcomes, one_row_per_turn: bool) -> GRPOBatch:
    row, start, end, trajectory, turn, row_prompt, row_reward = ([] for _ in range(7))
    for i, count in enumerate(turns):
        for t in range(count):
            row.append(len(row_prompt) if one_row_per_turn else i)
            start.append(0 if one_row_per_turn else 3 * t)
            end.append(2 if one_row_per_turn else 3 * t + 2)
            trajectory.append(i)
            turn.append(t)
            if one_row_per_turn:
                row_prompt.append(prompts[i])
                row_reward.append(outcomes[i])
        if not one_row_per_turn:
            row_prompt.append(prompts[i])
            row_reward.append(outcomes[i])
    width = max(end)
    mask = torch.zeros(len(row_prompt), width)
    for r, a, b in zip(row, start, end):
        mask[r, a:b] = 1.0
    s = len(row)
    steps = Steps(row=torch.tensor(row), start=torch.tensor(start), end=torch.tensor(end),
                  trajectory=torch.tensor(trajectory), turn=torch.tensor(turn), reward=torch.full((s,), float("nan")),
                  key=torch.full((s,), -1))
    return GRPOBatch(prompt_ids=torch.tensor(row_prompt), rewards=torch.tensor(row_reward), completion_mask=mask,
                     steps=steps)


def verl_grpo(prompts, rewards, norm_by_std: bool = True) -> torch.Tensor:
    """verl's GRPO advantage of rows with outcome ``rewards`` on their last token, grouped by ``prompts``."""
    scores = torch.zeros(len(rewards), 3)
    scores[:, -1] = torch.tensor(rewards)
    advantages, _ = compute_grpo_outcome_advantage(scores, torch.ones(len(rewards), 3), np.array(prompts),
                                                   epsilon=1e-6, norm_adv_by_std_in_grpo=norm_by_std)
    return advantages[:, 0]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("normalization", ["mean_std", "mean"])
def test_against_verl_grpo_on_turn_rows_and_on_trajectory_rows(seed, normalization):
    prompts, turns, outcomes = random_trajectories(seed)
    by_std = normalization == "mean_std"
    turn_rows = verl_grpo([prompts[i] for i, n in enumerate(turns) for _ in range(n)],
                          [outcomes[i] for i, n in enumerate(turns) for _ in range(n)], by_std)
    trajectory_rows = verl_grpo(prompts, outcomes, by_std)
    copied = torch.cat([trajectory_rows[i].expand(n) for i, n in enumerate(turns)])
    for one_row_per_turn in (False, True):
        for weighting, expected in (("step", turn_rows), ("trajectory", copied)):
            batch = step_batch(prompts, turns, outcomes, one_row_per_turn)
            Composition([{"flow_grpo": {"episode_weighting": weighting, "normalization": normalization}}]
                        ).run_advantage_stage(batch)
            got = batch.advantages[batch.steps.row, batch.steps.start]
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
