"""SALT against the card's worked example and hand-computed cases (core + torch only)."""

import dataclasses
import math

import pytest
import torch

from grpo_plugins import Composition, GRPOBatch, Steps, TrainerCapabilities
from grpo_plugins.errors import PluginError

ENV = 99  # the environment's token between two turns (not the policy's)


def batch_of(actions: list[list[list[int]]], outcomes: list[float], prompts: list[int],
             keys: list[list[int]] | None = None, one_row_per_turn: bool = False) -> GRPOBatch:
    """Trajectory ``i`` takes the actions ``actions[i]`` (each a token sequence), from the states ``keys[i]``
    (default: unknown), and earns ``outcomes[i]``. One row per trajectory (its turns separated by an
    environment token) or one row per turn (each turn row carries its trajectory's outcome)."""
    row, start, end, trajectory, turn, key, row_tokens, row_prompt, row_reward = ([] for _ in range(9))
    for i, turns in enumerate(actions):
        tokens: list[int] = []
        for t, action in enumerate(turns):
            if one_row_per_turn:
                tokens = []
            elif tokens:
                tokens.append(ENV)
            row.append(len(row_tokens))  # one row per trajectory: its row is appended after its last turn
            start.append(len(tokens))
            tokens += action
            end.append(len(tokens))
            trajectory.append(i)
            turn.append(t)
            key.append(-1 if keys is None else keys[i][t])
            if one_row_per_turn or t == len(turns) - 1:
                row_tokens.append(tokens)
                row_prompt.append(prompts[i])
                row_reward.append(outcomes[i])
    width = max(len(t) for t in row_tokens)
    ids = torch.tensor([t + [0] * (width - len(t)) for t in row_tokens])
    mask = torch.zeros(ids.shape)
    for r, a, b in zip(row, start, end):
        mask[r, a:b] = 1.0
    steps = Steps(row=torch.tensor(row), start=torch.tensor(start), end=torch.tensor(end),
                  trajectory=torch.tensor(trajectory), turn=torch.tensor(turn),
                  reward=torch.full((len(row),), float("nan")), key=torch.tensor(key))
    return GRPOBatch(prompt_ids=torch.tensor(row_prompt), rewards=torch.tensor(row_reward), completion_ids=ids,
                     completion_mask=mask, steps=steps)


A, B, C, D, E, F = [1], [2], [3], [4], [5], [6]


def card_batch(**kwargs) -> GRPOBatch:
    """The card's example: tau1 = [a, b, c] R = 1, tau2 = [a, b, d] R = 0, tau3 = [e, f] R = 0."""
    return batch_of([[A, B, C], [A, B, D], [E, F]], [1.0, 0.0, 0.0], [3, 3, 3], **kwargs)


def step_advantages(batch: GRPOBatch, **config) -> list[float]:
    """Each step's advantage, read at its first token."""
    Composition([{"salt": config}]).run_advantage_stage(batch)
    return batch.advantages[batch.steps.row, batch.steps.start].tolist()


def test_card_worked_example_prefix_keying():
    """Mean-centred A = [2/3, -1/3, -1/3]; a, b shared by tau1 and tau2 -> 1/6; the rest keep A_i."""
    expected = [1 / 6, 1 / 6, 2 / 3, 1 / 6, 1 / 6, -1 / 3, -1 / 3, -1 / 3]
    assert step_advantages(card_batch(), normalization="mean") == pytest.approx(expected, rel=1e-6)
    assert step_advantages(card_batch(one_row_per_turn=True), normalization="mean") == pytest.approx(expected, rel=1e-6)


def test_card_worked_example_with_std_and_tokens_outside_steps():
    """GRPO's A: +-(x / (std + 1e-6)) with std = sqrt(1/3); environment tokens get 0."""
    batch = card_batch()
    up = (2 / 3) / (math.sqrt(1 / 3) + 1e-6)
    down = (-1 / 3) / (math.sqrt(1 / 3) + 1e-6)
    shared = (up + down) / 2
    assert step_advantages(batch) == pytest.approx([shared, shared, up, shared, shared, down, down, down], rel=1e-6)
    assert batch.advantages[0, 1].item() == 0.0 and batch.advantages[0, 3].item() == 0.0  # ENV tokens


def test_state_keying_merges_a_state_action_pair_at_any_depth_and_prefix_does_not():
    """tau1 = [(s0, a), (s1, b)] R = 1, tau2 = [(s0, c), (s1, b)] R = 0: the histories part at once."""
    def batch():
        return batch_of([[A, B], [C, B]], [1.0, 0.0], [0, 0], keys=[[10, 11], [10, 11]])

    assert step_advantages(batch(), normalization="mean", edge="prefix") == [0.5, 0.5, -0.5, -0.5]
    assert step_advantages(batch(), normalization="mean", edge="state") == [0.5, 0.0, -0.5, 0.0]


def test_unknown_states_never_merge_under_state_keying():
    batch = batch_of([[A, B], [C, B]], [1.0, 0.0], [0, 0])
    assert step_advantages(batch, normalization="mean", edge="state") == [0.5, 0.5, -0.5, -0.5]


def test_prefix_keying_parts_histories_whose_known_observations_differ():
    """Same actions, but the environment answered differently before the second step: only step 0 merges."""
    batch = batch_of([[A, B], [A, B]], [1.0, 0.0], [0, 0], keys=[[-1, 20], [-1, 21]])
    assert step_advantages(batch, normalization="mean") == [0.0, 0.5, 0.0, -0.5]


def test_a_trajectory_through_an_edge_twice_counts_once():
    """State keying, tau1 = [(s, a), (s, a)] R = 1, tau2 = [(s, a)] R = 0: S(e) = {tau1, tau2} -> 0 (not 1/6)."""
    batch = batch_of([[A, A], [A]], [1.0, 0.0], [0, 0], keys=[[7, 7], [7]])
    assert step_advantages(batch, normalization="mean", edge="state") == [0.0, 0.0, 0.0]


def test_degenerate_graph_is_grpo_over_trajectories_broadcast_to_turns():
    """No shared edge: SALT's step advantage is the trajectory's GRPO advantage (the core's grpo in verl
    arithmetic on one row per trajectory), on every turn; with turn-row statistics it is GRPO on turn rows."""
    actions = [[[1], [2, 3]], [[4]], [[5], [6], [7]], [[8, 9]], [[10], [11]], [[12]]]
    outcomes, prompts = [0.3, 1.1, 0.0, 0.7, 2.0, 0.5], [4, 4, 4, 4, 5, 5]
    rows = GRPOBatch(prompt_ids=torch.tensor(prompts), rewards=torch.tensor(outcomes))
    Composition([{"grpo": {"arithmetic": "verl", "epsilon": 1e-6}}]).run_advantage_stage(rows)
    expected = [rows.advantages[i].item() for i, turns in enumerate(actions) for _ in turns]
    for edge in ("prefix", "state"):
        assert step_advantages(batch_of(actions, outcomes, prompts), edge=edge) == pytest.approx(expected, rel=1e-6)
    turn_rows = batch_of(actions, outcomes, prompts, one_row_per_turn=True)
    Composition([{"grpo": {"arithmetic": "verl", "epsilon": 1e-6}}]).run_advantage_stage(turn_rows)
    got = step_advantages(batch_of(actions, outcomes, prompts), episode_weighting="step")
    assert got == pytest.approx(turn_rows.advantages.tolist(), rel=1e-6)


def test_edges_never_join_two_prompts_and_uneven_groups():
    """Prompt 0: three trajectories, two open with a; prompt 1: two trajectories that also open with a."""
    batch = batch_of([[A, B], [A, C], [D], [A, B], [A]], [3.0, 0.0, 0.0, 1.0, 0.0], [0, 0, 0, 1, 1])
    assert step_advantages(batch, normalization="mean") == pytest.approx([0.5, 2.0, 0.5, -1.0, -1.0, 0.0, 0.5, 0.0])


def test_one_step_trajectories_with_the_same_action_share_their_mean():
    batch = batch_of([[A], [A], [B]], [1.0, 0.0, 2.0], [0, 0, 0])
    assert step_advantages(batch, normalization="mean") == pytest.approx([-0.5, -0.5, 1.0])


def test_constant_groups_are_exactly_zero_at_any_scale():
    for scale in (1.0, 0.1, 1e-3, 7.3e4):
        for config in ({}, {"normalization": "mean"}, {"edge": "state"}, {"episode_weighting": "step"}):
            batch = batch_of([[A, B], [A, C], [D]], [0.1 * scale] * 3, [2, 2, 2], keys=[[1, 2], [1, 3], [1]])
            Composition([{"salt": config}]).run_advantage_stage(batch)
            assert bool((batch.advantages == 0).all()), (scale, config)


def test_a_prompt_with_one_trajectory_scores_its_outcome_as_verl_does():
    assert step_advantages(batch_of([[A, B]], [0.75], [0])) == pytest.approx([0.75 / (1 + 1e-6)] * 2, rel=1e-7)


def test_padding_neither_keys_the_action_nor_gets_an_advantage():
    """Two one-step trajectories whose steps differ only in padded positions are the same action."""
    batch = batch_of([[[1, 2, 3]], [[1, 2, 4]], [[5]]], [1.0, 0.0, 2.0], [0, 0, 0])
    batch.completion_mask[:2, 2] = 0.0  # the third token of both is padding: [1, 2] and [1, 2]
    assert step_advantages(batch, normalization="mean") == pytest.approx([-0.5, -0.5, 1.0])
    assert batch.advantages[0, 2].item() == 0.0


def test_shared_early_steps_are_no_longer_penalised_in_failures():
    """The property that tells SALT from trajectory-level GRPO: tau2's shared first step is credited with the
    success it shares it with (+), where GRPO gives the whole failed trajectory -1/3."""
    values = step_advantages(card_batch(), normalization="mean")
    assert values[3] > 0 > values[5]
    assert torch.tensor(values).var() < torch.tensor([2 / 3] * 3 + [-1 / 3] * 5).var()


def test_metrics_are_logged():
    composition = Composition(["salt"])
    composition.run_advantage_stage(card_batch())
    metrics = composition.method("salt").pop_metrics()
    assert metrics["frac_shared_steps"] == pytest.approx(4 / 8)
    assert metrics["mean_abs_shift"] > 0


def test_rows_with_tokens_but_no_step_are_an_error():
    batch = card_batch()
    batch.steps = batch.steps.rows_of(torch.tensor([0, 1]), 3)
    with pytest.raises(PluginError, match=r"salt.*row\(s\) \[2\] hold tokens but no step"):
        step_advantages(batch)


def test_a_trajectory_spanning_two_prompts_is_an_error():
    batch = card_batch(one_row_per_turn=True)
    batch.prompt_ids = torch.tensor([3, 3, 3, 3, 4, 3, 3, 3])
    with pytest.raises(PluginError, match="salt.*rows of different prompts"):
        step_advantages(batch)


def test_nan_rewards_are_refused_by_the_core():
    batch = card_batch()
    batch.rewards = torch.tensor([float("nan"), 0.0, 0.0])
    with pytest.raises(Exception, match="NaN"):
        step_advantages(batch)


def test_without_step_records_the_capability_check_names_the_method_and_field():
    problems = Composition(["salt"]).capability_problems(TrainerCapabilities.standard("verl"))
    assert any("salt" in p and "'steps'" in p for p in problems), problems
    with_steps = TrainerCapabilities.standard("TRL GRPOTrainer")
    with_steps = dataclasses.replace(with_steps, batch_fields=with_steps.batch_fields | {"steps"})
    assert Composition(["salt"]).capability_problems(with_steps) == []
