"""GiGPO against the card's worked example and hand-computed cases (core + torch only)."""

import math

import pytest
import torch

from grpo_plugins import Composition, GRPOBatch, Steps
from grpo_plugins.errors import PluginError
from grpo_plugin_gigpo import discounted_returns, gigpo_step_advantages

S0, S1, S2, S3 = 100, 101, 102, 103


def card_batch(one_row_per_turn: bool = False) -> GRPOBatch:
    """The card's example: trajectory A acts in S0, S1 (rewards 0, 10); B in S0, S2, S3 (rewards 0, 0, 0).

    One row per trajectory (TRL: A's turns are tokens [0, 2) and [3, 5), B's [0, 1), [2, 3), [4, 6)), or one
    row per turn (verl)."""
    turn = torch.tensor([0, 1, 0, 1, 2])
    trajectory = torch.tensor([7, 7, 9, 9, 9])
    reward = torch.tensor([0.0, 10.0, 0.0, 0.0, 0.0])
    key = torch.tensor([S0, S1, S0, S2, S3])
    if one_row_per_turn:
        n, width = 5, 3
        row, start, end = torch.arange(5), torch.zeros(5, dtype=torch.long), torch.tensor([2, 3, 1, 3, 2])
        outcome = torch.tensor([10.0, 10.0, 0.0, 0.0, 0.0])
    else:
        n, width = 2, 6
        row, start, end = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 3, 0, 2, 4]), torch.tensor([2, 5, 1, 3, 6])
        outcome = torch.tensor([10.0, 0.0])
    mask = torch.zeros(n, width)
    for r, a, b in zip(row.tolist(), start.tolist(), end.tolist()):  # test data: every step's tokens are real
        mask[r, a:b] = 1.0
    return GRPOBatch(prompt_ids=torch.full((n,), 3), rewards=outcome, completion_mask=mask,
                     steps=Steps(row=row, start=start, end=end, trajectory=trajectory, turn=turn, reward=reward, key=key))


def advantages(batch, **config):
    Composition([{"gigpo": config}]).run_advantage_stage(batch)
    return batch.advantages


def test_card_worked_example_mean_norm():
    """gamma 0.5: returns A (5, 10), B (0, 0, 0); A_E +-5; the S0 group {5, 0} gives A_S +-2.5."""
    a = advantages(card_batch(), gamma=0.5, normalization="mean")
    assert a.tolist() == [[7.5, 7.5, 0.0, 5.0, 5.0, 0.0], [-7.5, 0.0, -5.0, 0.0, -5.0, -5.0]]


def test_card_worked_example_std_norm():
    """With std normalisation both levels are +-(x / (std + 1e-6)) with std = sqrt(2) x: +-0.707."""
    a = advantages(card_batch(), gamma=0.5, normalization="mean_std")
    z = 5.0 / (5.0 * math.sqrt(2.0) + 1e-6)
    s = 2.5 / (2.5 * math.sqrt(2.0) + 1e-6)
    assert a[0, 0].item() == pytest.approx(z + s) and a[0, 3].item() == pytest.approx(z)
    assert a[1, 0].item() == pytest.approx(-z - s) and a[1, 2].item() == pytest.approx(-z)


def test_one_row_per_turn_gives_the_same_step_advantages():
    a = advantages(card_batch(one_row_per_turn=True), gamma=0.5)
    assert a[:, 0].tolist() == [7.5, 5.0, -7.5, -5.0, -5.0]


def test_step_weight_zero_is_the_episode_advantage_and_omega_scales_the_step_part():
    batch = card_batch()
    assert advantages(batch, gamma=0.5, omega=0.0).tolist() == [[5.0, 5.0, 0.0, 5.0, 5.0, 0.0],
                                                                [-5.0, 0.0, -5.0, 0.0, -5.0, -5.0]]
    assert advantages(card_batch(), gamma=0.5, omega=2.0)[0, 0].item() == 10.0


def test_discounted_returns_follow_the_turn_order_not_the_storage_order():
    rewards = torch.tensor([1.0, 0.0, 4.0, 2.0], dtype=torch.float64)
    trajectory, turn = torch.tensor([0, 0, 0, 1]), torch.tensor([2, 0, 1, 0])
    returns = discounted_returns(rewards, trajectory, turn, 2, gamma=0.5)
    assert returns.tolist() == [1.0, 0.0 + 0.5 * 4.5, 4.0 + 0.5 * 1.0, 2.0]


def test_outcome_only_trajectories_put_the_row_reward_on_the_last_step():
    batch = card_batch()
    batch.steps = Steps(**{**vars(batch.steps), "reward": torch.full((5,), float("nan"))})
    assert advantages(batch, gamma=0.5).tolist() == [[7.5, 7.5, 0.0, 5.0, 5.0, 0.0],
                                                     [-7.5, 0.0, -5.0, 0.0, -5.0, -5.0]]


def test_episode_weighting_by_steps_counts_a_trajectory_once_per_step():
    """Step rows of returns (10, 10, 0, 0, 0): mean 4, so A_E = 6 and -4 (not +-5)."""
    a = advantages(card_batch(), gamma=0.5, omega=0.0, episode_weighting="step")
    assert a[0, 0].item() == pytest.approx(6.0) and a[1, 0].item() == pytest.approx(-4.0)


def test_constant_group_is_exactly_zero_at_any_scale():
    """Two trajectories through S0 then S1 with rewards (0, 123.4): equal returns at every level."""
    steps = Steps(row=torch.tensor([0, 0, 1, 1]), start=torch.tensor([0, 2, 0, 1]), end=torch.tensor([2, 3, 1, 3]),
                  trajectory=torch.tensor([0, 0, 1, 1]), turn=torch.tensor([0, 1, 0, 1]),
                  reward=torch.tensor([0.0, 123.4, 0.0, 123.4]), key=torch.tensor([S0, S1, S0, S1]))
    batch = GRPOBatch(prompt_ids=torch.tensor([3, 3]), rewards=torch.tensor([0.0, 0.0]), completion_mask=torch.ones(2, 3),
                      steps=steps)
    for normalization in ("mean", "mean_std"):
        assert bool((advantages(batch, gamma=0.3, normalization=normalization) == 0).all())


def test_a_task_with_one_trajectory_scores_its_return_and_lonely_steps_get_no_step_advantage():
    steps = Steps(row=torch.tensor([0, 0]), start=torch.tensor([0, 1]), end=torch.tensor([1, 2]),
                  trajectory=torch.tensor([0, 0]), turn=torch.tensor([0, 1]), reward=torch.tensor([1.0, 2.0]),
                  key=torch.tensor([5, 6]))
    advantage, a_step, shared = gigpo_step_advantages(steps, torch.tensor([0, 0]), torch.tensor([3.0]), 0.9, 1.0,
                                                      False, "trajectory")
    assert advantage.tolist() == [3.0, 3.0] and a_step.tolist() == [0.0, 0.0] and not bool(shared.any())


def test_a_state_revisited_within_one_trajectory_joins_its_own_anchor_group():
    steps = Steps(row=torch.tensor([0, 0]), start=torch.tensor([0, 1]), end=torch.tensor([1, 2]),
                  trajectory=torch.tensor([0, 0]), turn=torch.tensor([0, 1]), reward=torch.tensor([0.0, 2.0]),
                  key=torch.tensor([5, 5]))
    _, a_step, shared = gigpo_step_advantages(steps, torch.tensor([0, 0]), torch.tensor([2.0]), 0.5, 1.0, False,
                                              "trajectory")
    assert a_step.tolist() == [-0.5, 0.5] and bool(shared.all())  # returns (1, 2) around their mean 1.5


def test_unknown_states_are_never_anchored_together():
    batch = card_batch()
    batch.steps = Steps(**{**vars(batch.steps), "key": torch.full((5,), -1)})
    assert advantages(batch, gamma=0.5).tolist() == [[5.0, 5.0, 0.0, 5.0, 5.0, 0.0],
                                                     [-5.0, 0.0, -5.0, 0.0, -5.0, -5.0]]


def test_nan_in_padding_is_ignored_and_padding_gets_zero():
    batch = card_batch()
    batch.completion_mask[1, 5] = 0.0  # the last token of B's last step is padding: no advantage there
    a = advantages(batch, gamma=0.5)
    assert a[1, 5].item() == 0.0 and a[1, 4].item() == -5.0


def test_rows_with_tokens_but_no_step_are_an_error():
    batch = card_batch()
    batch.completion_mask = torch.cat([batch.completion_mask, torch.ones(1, 6)])
    batch.prompt_ids, batch.rewards = torch.full((3,), 3), torch.tensor([10.0, 0.0, 1.0])
    with pytest.raises(PluginError, match=r"row\(s\) \[2\] hold tokens but no step"):
        advantages(batch)


def test_a_trajectory_spanning_two_prompts_is_an_error():
    batch = card_batch(one_row_per_turn=True)
    batch.prompt_ids = torch.tensor([3, 3, 3, 4, 3])
    with pytest.raises(PluginError, match="rows of different prompts"):
        advantages(batch)


def test_nan_rewards_are_refused_by_the_core():
    batch = card_batch()
    batch.rewards = torch.tensor([float("nan"), 0.0])
    with pytest.raises(Exception, match="NaN"):
        advantages(batch)


def test_without_step_records_the_capability_check_names_the_field():
    from grpo_plugins import TrainerCapabilities

    problems = Composition(["gigpo"]).capability_problems(TrainerCapabilities.standard("TRL GRPOTrainer"))
    assert any("gigpo" in p and "'steps'" in p for p in problems), problems
