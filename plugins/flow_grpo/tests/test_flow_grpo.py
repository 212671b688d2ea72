"""Flow-GRPO against the card's worked example and hand-computed cases (core + torch only)."""

import dataclasses
import math

import pytest
import torch

from grpo_plugins import Composition, GRPOBatch, LossInputs, Method, Steps, TrainerCapabilities, hookimpl
from grpo_plugins.aggregation import aggregate_policy_loss
from grpo_plugins.errors import PluginError

CARD_A = 0.5 / (math.sqrt(1.0 / 3.0) + 1e-6)  # R = [1, 0, 0, 1]: mean .5, unbiased std sqrt(1/3) -> .866


def batch_of(turn_lengths: list[list[int]], outcomes: list[float], prompts: list[int], one_row_per_turn: bool = False,
             step_rewards: list[list[float]] | None = None, keys: list[list[int]] | None = None) -> GRPOBatch:
    """Trajectory ``i`` has turns of ``turn_lengths[i]`` tokens and outcome ``outcomes[i]``.

    One row per trajectory (TRL: its turns separated by one environment token) or one row per turn (verl:
    every turn row carries its trajectory's outcome)."""
    row, start, end, trajectory, turn, reward, key, rows_prompt, rows_reward, widths = ([] for _ in range(10))
    for i, lengths in enumerate(turn_lengths):
        position = 0
        for t, length in enumerate(lengths):
            if one_row_per_turn:
                row.append(len(rows_prompt))
                rows_prompt.append(prompts[i])
                rows_reward.append(outcomes[i])
                widths.append(length)
                position = 0
            else:
                row.append(i)
            start.append(position)
            end.append(position + length)
            position += length + 1
            trajectory.append(10 + i)
            turn.append(t)
            reward.append(float("nan") if step_rewards is None else step_rewards[i][t])
            key.append(-1 if keys is None else keys[i][t])
        if not one_row_per_turn:
            rows_prompt.append(prompts[i])
            rows_reward.append(outcomes[i])
            widths.append(position - 1)
    mask = torch.zeros(len(rows_prompt), max(widths))
    for r, a, b in zip(row, start, end):  # test data: every step's tokens are real, environment tokens are not
        mask[r, a:b] = 1.0
    steps = Steps(row=torch.tensor(row), start=torch.tensor(start), end=torch.tensor(end),
                  trajectory=torch.tensor(trajectory), turn=torch.tensor(turn), reward=torch.tensor(reward),
                  key=torch.tensor(key))
    return GRPOBatch(prompt_ids=torch.tensor(rows_prompt), rewards=torch.tensor(rows_reward), completion_mask=mask,
                     steps=steps)


def card_batch(one_row_per_turn: bool = False) -> GRPOBatch:
    """The card's example: R = [1, 0, 0, 1] with [3, 1, 2, 2] turns (of 2, 1, 2 / 3 / 1, 1 / 2, 2 tokens)."""
    return batch_of([[2, 1, 2], [3], [1, 1], [2, 2]], [1.0, 0.0, 0.0, 1.0], [5, 5, 5, 5], one_row_per_turn)


def advantages(batch: GRPOBatch, **config) -> torch.Tensor:
    Composition([{"flow_grpo": config}]).run_advantage_stage(batch)
    return batch.advantages


def step_values(batch: GRPOBatch) -> list[float]:
    """Each step's advantage (read at its first token)."""
    return batch.advantages[batch.steps.row, batch.steps.start].tolist()


def test_card_worked_example_broadcasts_the_trajectory_advantage_to_every_turn():
    a = advantages(card_batch())
    signs = [1, 1, 1, -1, -1, -1, 1, 1]
    assert step_values(card_batch_with(a)) == pytest.approx([s * CARD_A for s in signs], rel=1e-6)
    assert CARD_A == pytest.approx(0.866, abs=1e-3)
    # environment tokens (between turns) get nothing; every token of a turn gets its trajectory's value
    assert a[0].tolist() == pytest.approx([CARD_A, CARD_A, 0.0, CARD_A, 0.0, CARD_A, CARD_A])
    assert a[1].tolist() == pytest.approx([-CARD_A] * 3 + [0.0] * 4)


def card_batch_with(a: torch.Tensor) -> GRPOBatch:
    batch = card_batch()
    batch.advantages = a
    return batch


def test_one_row_per_turn_gives_the_same_turn_advantages():
    batch = card_batch(one_row_per_turn=True)
    advantages(batch)
    assert step_values(batch) == pytest.approx([CARD_A] * 3 + [-CARD_A] * 3 + [CARD_A] * 2, rel=1e-6)


def test_mean_normalization_only_centres():
    batch = card_batch()
    advantages(batch, normalization="mean")
    assert step_values(batch) == [0.5, 0.5, 0.5, -0.5, -0.5, -0.5, 0.5, 0.5]


def test_episode_weighting_by_turns_counts_a_trajectory_once_per_turn():
    """Turn rows (1, 1, 1, 0, 0, 0, 1, 1): mean 5/8, unbiased std sqrt(1.875 / 7)."""
    batch = card_batch()
    advantages(batch, episode_weighting="step")
    std = math.sqrt(1.875 / 7)
    up, down = 0.375 / (std + 1e-6), -0.625 / (std + 1e-6)
    assert step_values(batch) == pytest.approx([up, up, up, down, down, down, up, up], rel=1e-6)


def test_against_grpo_over_turn_rows_with_the_outcome_broadcast():
    """The released code's estimator: verl's GRPO on one row per turn, each carrying its trajectory's outcome
    (the core's ``grpo`` in verl arithmetic), equals ``episode_weighting='step'`` on either layout."""
    lengths = [[2, 1, 2], [3], [1, 1], [2, 2], [1], [2, 1, 1], [3]]
    outcomes, prompts = [0.3, 0.7, 0.7, 0.0, 1.9, 0.4, 2.0], [1, 1, 1, 1, 2, 2, 3]
    turn_rows = batch_of(lengths, outcomes, prompts, one_row_per_turn=True)
    Composition([{"grpo": {"arithmetic": "verl", "epsilon": 1e-6}}]).run_advantage_stage(turn_rows)
    expected = turn_rows.advantages.tolist()
    for one_row_per_turn in (False, True):
        batch = batch_of(lengths, outcomes, prompts, one_row_per_turn)
        advantages(batch, episode_weighting="step")
        assert step_values(batch) == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_against_grpo_over_trajectories_broadcast_to_turns():
    """The paper's estimator: GRPO over the query's trajectories (one row each), copied to every turn."""
    lengths = [[2, 1, 2], [3], [1, 1], [2, 2], [1], [2, 1, 1], [3]]
    outcomes, prompts = [0.3, 0.7, 0.7, 0.0, 1.9, 0.4, 2.0], [1, 1, 1, 1, 2, 2, 3]
    rows = GRPOBatch(prompt_ids=torch.tensor(prompts), rewards=torch.tensor(outcomes))
    Composition([{"grpo": {"arithmetic": "verl", "epsilon": 1e-6}}]).run_advantage_stage(rows)
    expected = [rows.advantages[i].item() for i, turns in enumerate(lengths) for _ in turns]
    batch = batch_of(lengths, outcomes, prompts)
    advantages(batch)
    assert step_values(batch) == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_uneven_groups_are_normalised_within_each_prompt():
    batch = batch_of([[1, 1], [2], [1], [1, 2, 1], [3]], [1.0, 0.0, 0.0, 4.0, 2.0], [7, 7, 7, 8, 8])
    advantages(batch, normalization="mean")
    assert step_values(batch) == pytest.approx([2 / 3, 2 / 3, -1 / 3, -1 / 3, 1.0, 1.0, 1.0, -1.0])


def test_constant_groups_are_exactly_zero_at_any_scale():
    for scale in (1.0, 0.1, 1e-3, 7.3e4):
        for config in ({}, {"normalization": "mean"}, {"episode_weighting": "step"}):
            batch = batch_of([[1, 2], [2], [1, 1, 1]], [0.1 * scale] * 3, [4, 4, 4])
            assert bool((advantages(batch, **config) == 0).all()), (scale, config)


def test_a_query_with_one_trajectory_scores_its_outcome_as_verl_does():
    """Trajectory statistics: mean 0, std 1 -> A = R / (1 + eps) on both turns. Turn statistics: its two turn rows are a
    constant group -> exactly 0 (verl gives the same on two equal rows); a one-turn trajectory -> R."""
    batch = batch_of([[1, 2]], [0.75], [3])
    advantages(batch)
    assert step_values(batch) == pytest.approx([0.75 / (1 + 1e-6)] * 2, rel=1e-7)
    batch = batch_of([[1, 2]], [0.75], [3])
    advantages(batch, episode_weighting="step")
    assert step_values(batch) == [0.0, 0.0]
    batch = batch_of([[2]], [0.75], [3])
    advantages(batch, episode_weighting="step")
    assert step_values(batch) == pytest.approx([0.75 / (1 + 1e-6)], rel=1e-7)


def test_one_step_trajectories_are_plain_grpo():
    outcomes = [0.2, 1.0, 0.0, 3.0, 1.5]
    batch = batch_of([[3], [2], [1], [2], [3]], outcomes, [1, 1, 1, 2, 2])
    rows = GRPOBatch(prompt_ids=torch.tensor([1, 1, 1, 2, 2]), rewards=torch.tensor(outcomes))
    Composition([{"grpo": {"epsilon": 1e-6}}]).run_advantage_stage(rows)
    advantages(batch)
    assert step_values(batch) == pytest.approx(rows.advantages.tolist(), rel=1e-6)


def test_step_rewards_are_ignored_the_outcome_is_copied_to_every_turn():
    """The card: one final reward per trajectory. Outcomes [1, 0, 0] with explicit zero step rewards: mean 1/3,
    std sqrt(1/3) -> A = (2/3) / sqrt(1/3) = 1.1547 and -0.5774 (the step rewards once replaced the outcome)."""
    zeros = batch_of([[1], [1], [1]], [1.0, 0.0, 0.0], [2, 2, 2], step_rewards=[[0.0], [0.0], [0.0]])
    advantages(zeros)
    assert step_values(zeros) == pytest.approx([1.1547, -0.57735, -0.57735], abs=1e-4)
    # step rewards (.5, .5) with outcome 1 and (3) with outcome 0: the outcomes alone decide, R = [1, 0]
    batch = batch_of([[1, 1], [2]], [1.0, 0.0], [2, 2], step_rewards=[[0.5, 0.5], [3.0]])
    advantages(batch, normalization="mean")
    assert step_values(batch) == [0.5, 0.5, -0.5]
    keyed = batch_of([[1, 1], [2]], [1.0, 0.0], [2, 2], keys=[[4, 5], [4]])
    unknown = batch_of([[1, 1], [2]], [1.0, 0.0], [2, 2])
    assert torch.equal(advantages(keyed), advantages(unknown))


class AddTwoToTheFirstRow(Method):
    """A reward shaper for the test: +2 on row 0."""

    name = "add_two_to_the_first_row"

    @hookimpl
    def shape_rewards(self, batch: GRPOBatch, rewards: torch.Tensor) -> torch.Tensor:
        return rewards + torch.nn.functional.one_hot(torch.tensor(0), rewards.numel()).to(rewards.dtype) * 2


def test_shaped_rewards_are_the_outcome_even_with_step_rewards():
    """Outcomes [1, 0] shaped to [3, 0] (step rewards given): mean-centred A = [1.5, 1.5, -1.5]."""
    batch = batch_of([[1, 1], [2]], [1.0, 0.0], [2, 2], step_rewards=[[0.0, 0.0], [0.0]])
    Composition([AddTwoToTheFirstRow(), {"flow_grpo": {"normalization": "mean"}}]).run_advantage_stage(batch)
    assert step_values(batch) == [1.5, 1.5, -1.5]


def test_padding_gets_zero_and_nan_there_is_ignored():
    batch = card_batch()
    batch.completion_mask[0, 6] = 0.0  # the last token of trajectory 1's last turn is padding
    batch.steps = dataclasses.replace(batch.steps, reward=torch.full((8,), float("nan")))
    a = advantages(batch, turn_weighting="nested")
    assert a[0, 6].item() == 0.0 and a[0, 5].item() == pytest.approx(CARD_A)
    weight = batch.row_data["flow_grpo_turn_weight"]
    assert weight[0, 6].item() == 0.0 and weight[0, 5].item() == pytest.approx(1 / (3 * 1))  # |a| = 1 real token


def effective_token_weights(batch: GRPOBatch, loss_mask: torch.Tensor) -> torch.Tensor:
    """d loss / d (per-token loss) under the trainer's sequence-mean aggregation with flow_grpo's gate."""
    composition = Composition([{"flow_grpo": {"turn_weighting": "nested"}}])
    composition.run_advantage_stage(batch)
    per_token = torch.zeros(loss_mask.shape, requires_grad=True)
    inputs = LossInputs(log_probs=per_token, old_log_probs=per_token.detach(), advantages=batch.advantages,
                        mask=loss_mask, row_data=dict(batch.row_data))
    parts = composition.run_loss_stage(inputs, lambda x: x.log_probs)
    aggregate_policy_loss(parts.policy, loss_mask, "sequence_mean").backward()
    return per_token.grad


def test_card_turn_weight_is_one_over_g_turns_tokens():
    """G = 2: a 2-turn trajectory with a 4-token first turn (and 2-token second), a 1-turn one of 3 tokens:
    weights 1/(2*2*4) = 1/16, 1/(2*2*2) = 1/8, 1/(2*1*3) = 1/6; each trajectory sums to 1/G."""
    batch = batch_of([[4, 2], [3]], [1.0, 0.0], [0, 0])
    w = effective_token_weights(batch, batch.completion_mask.clone())
    assert w[0].tolist() == pytest.approx([1 / 16] * 4 + [0.0] + [1 / 8] * 2)
    assert w[1].tolist() == pytest.approx([1 / 6] * 3 + [0.0] * 4)
    # a loss mask that also counts the environment token changes nothing: the gate uses the trainer's count
    batch = batch_of([[4, 2], [3]], [1.0, 0.0], [0, 0])
    loss_mask = batch.completion_mask.clone()
    loss_mask[0, 4] = 1.0
    assert effective_token_weights(batch, loss_mask)[0].tolist() == pytest.approx([1 / 16] * 4 + [0.0] + [1 / 8] * 2)


def test_turn_weight_on_rows_that_are_turns():
    """verl's layout: 3 turn rows of 2 trajectories; the same 1/16, 1/8, 1/6."""
    batch = batch_of([[4, 2], [3]], [1.0, 0.0], [0, 0], one_row_per_turn=True)
    w = effective_token_weights(batch, batch.completion_mask.clone())
    assert w[0].tolist() == pytest.approx([1 / 16] * 4)
    assert w[1].tolist() == pytest.approx([1 / 8] * 2 + [0.0] * 2)
    assert w[2].tolist() == pytest.approx([1 / 6] * 3 + [0.0])


def test_trainer_weighting_has_no_loss_hook_and_nested_needs_a_sequence_mean():
    assert not Composition(["flow_grpo"]).has_loss_hooks
    assert Composition([{"flow_grpo": {"turn_weighting": "nested"}}]).has_loss_hooks
    with_steps = TrainerCapabilities.standard("TRL GRPOTrainer", settings={"loss_aggregation": "token_mean"},
                                              setting_names={"loss_aggregation": "loss_type"})
    with_steps = dataclasses.replace(with_steps, batch_fields=with_steps.batch_fields | {"steps"})
    assert Composition(["flow_grpo"]).capability_problems(with_steps) == []
    problems = Composition([{"flow_grpo": {"turn_weighting": "nested"}}]).capability_problems(with_steps)
    assert any("flow_grpo" in p and "loss_type" in p for p in problems), problems


def test_rows_with_tokens_but_no_step_are_an_error():
    batch = card_batch()
    batch.completion_mask = torch.cat([batch.completion_mask, torch.ones(1, 7)])
    batch.prompt_ids, batch.rewards = torch.full((5,), 5), torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    with pytest.raises(PluginError, match=r"flow_grpo.*row\(s\) \[4\] hold tokens but no step"):
        advantages(batch)


def test_a_trajectory_spanning_two_prompts_is_an_error():
    batch = card_batch(one_row_per_turn=True)
    batch.prompt_ids = torch.tensor([5, 5, 6, 5, 5, 5, 5, 5])
    with pytest.raises(PluginError, match="flow_grpo.*rows of different prompts"):
        advantages(batch)


def test_nan_rewards_are_refused_by_the_core():
    batch = card_batch()
    batch.rewards = torch.tensor([float("nan"), 0.0, 0.0, 1.0])
    with pytest.raises(Exception, match="NaN"):
        advantages(batch)


def test_without_step_records_the_capability_check_names_the_method_and_field():
    problems = Composition(["flow_grpo"]).capability_problems(TrainerCapabilities.standard("verl"))
    assert any("flow_grpo" in p and "'steps'" in p for p in problems), problems
