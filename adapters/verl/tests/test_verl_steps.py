"""Multi-turn step records (``GRPOBatch.steps``) on verl: a row is one turn, keyed ``{uid}_{session}_{index}``.

The estimator is called through verl's own V1 advantage code (``compute_advantage_for_multi_trajectories``)
with the per-row turn data the ``grpo_plugins`` trainer fetches (:func:`grpo_plugins_verl.extras.turn_rows`).
The cross-check of the issue: ``gigpo`` with the step weight 0 equals verl's multi-trajectory GRPO (each
session's final output scored, the advantage broadcast to the session's turns).
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from verl import DataProto
from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories

import grpo_plugins_verl
from grpo_plugins import CompositionError, Method, hookimpl
from grpo_plugins_verl.capabilities import check_run, verl_capabilities
from grpo_plugins_verl.extras import TURNS, turn_rows
from grpo_plugins_verl.runtime import get_runtime
from grpo_plugins_verl.testing import run_config

pytest.importorskip("grpo_plugin_gigpo")


class Recorder(Method):
    name = "recorder"

    def __init__(self):
        super().__init__()
        self.batches = []

    @hookimpl
    def adjust_advantages(self, batch, advantages):
        self.batches.append(batch)
        return advantages


def multi_turn_batch(seed: int, prompts: int = 3, sessions: int = 4, num_tokens: int = 5, padding: int = 1):
    """verl rows of multi-turn sessions in shuffled order: ``(token_level_rewards, response_mask, uids, keys,
    extra_fields)``. Each session has 1-3 turns; every turn row carries the session's outcome on its last
    token (verl's agent loop copies the final reward to every output); odd turns carry a step key."""
    gen = torch.Generator().manual_seed(seed)
    uids, keys, outcomes, extra = [], [], [], []
    for p in range(prompts):
        for s in range(sessions):
            outcome = float(torch.randint(0, 3, (1,), generator=gen)) + float(torch.rand(1, generator=gen)) * (p == 0)
            for turn in range(int(torch.randint(1, 4, (1,), generator=gen))):
                uids.append(f"u{seed}x{p}")
                keys.append(f"u{seed}x{p}_{s}_{turn}")
                outcomes.append(outcome)
                extra.append({"step_key": 7 if turn % 2 else None})
    order = torch.randperm(len(uids), generator=gen).tolist()
    uids, keys, outcomes, extra = ([xs[i] for i in order] for xs in (uids, keys, outcomes, extra))
    n = len(uids)
    lengths = torch.randint(1, num_tokens + 1, (n,), generator=gen)
    mask = (torch.arange(num_tokens) < lengths[:, None]).long()
    rewards = torch.zeros(n, num_tokens)
    rewards[torch.arange(n), lengths - 1] = torch.tensor(outcomes)
    for i in range(padding):  # padding rows as verl's _balance_batch adds them
        uids.append("pad0123")
        keys.append(f"pad0123_{i}_0")
        extra.append({})
    rewards = torch.cat([rewards, torch.zeros(padding, num_tokens)])
    mask = torch.cat([mask, torch.zeros(padding, num_tokens, dtype=torch.long)])
    return rewards, mask, np.array(uids, dtype=object), keys, extra


def v1(rewards, mask, uids, keys, estimator: str, norm: bool) -> torch.Tensor:
    data = DataProto.from_dict(tensors={"token_level_rewards": rewards.clone(), "response_mask": mask.clone()},
                               non_tensors={"uid": uids.copy()})
    algorithm = OmegaConf.create({"norm_adv_by_std_in_grpo": norm})
    out = compute_advantage_for_multi_trajectories(data, batch_keys=keys, adv_estimator=estimator,
                                                   norm_adv_by_std_in_grpo=norm, config=algorithm)
    return out.batch["advantages"]


def attach(methods, keys, extra, norm: bool = True):
    """The runtime as the grpo_plugins trainer leaves it before verl's advantage step."""
    grpo_plugins_verl.configure(methods)
    runtime = get_runtime(OmegaConf.create({"norm_adv_by_std_in_grpo": norm}))
    runtime.trainer_attached = True
    runtime.extras = {TURNS: turn_rows(keys, extra)}
    return runtime


def test_turn_rows_read_the_trajectory_keys_and_step_fields():
    keys = ["a_0_0", "a_0_1", "a_1_0", "b-c_0_0", "pad99", "a_0_2"]
    extra = [{"step_key": 5, "step_reward": 0.5}, {}, {"step_key": 5}, {"step_key": None}, {}, {"step_reward": None}]
    turns = turn_rows(keys, extra)
    trajectory = turns["trajectory"].tolist()
    assert trajectory[0] == trajectory[1] == trajectory[5] and len({trajectory[i] for i in (0, 2, 3, 4)}) == 4
    assert turns["turn"].tolist() == [0, 1, 0, 0, 0, 2]
    assert turns["key"].tolist() == [5, -1, 5, -1, -1, -1]
    reward = turns["reward"]
    assert reward[0] == 0.5 and bool(torch.isnan(reward[1:]).all())
    plain = turn_rows(keys, None)
    assert plain["reward"] is None and plain["key"] is None
    with pytest.raises(ValueError, match="step_key"):
        turn_rows(["a_0_0"], [{"step_key": "s1"}])


@pytest.mark.parametrize("norm", [True, False])
def test_gigpo_with_step_weight_zero_is_verl_multi_trajectory_grpo(norm):
    """The issue's cross-check: episode advantages over trajectories (omega = 0) == verl's V1 GRPO over each
    session's final output, broadcast to the session's turns (1e-6: GiGPO computes in float64)."""
    for seed in range(12):
        rewards, mask, uids, keys, extra = multi_turn_batch(seed)
        expected = v1(rewards, mask, uids, keys, "grpo", norm)
        normalization = "mean_std" if norm else "mean"
        recorder = Recorder()
        runtime = attach([{"gigpo": {"omega": 0.0, "normalization": normalization}}, recorder], keys, extra, norm)
        ours = v1(rewards, mask, uids, keys, "grpo_plugins", norm)
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
        steps = recorder.batches[-1].steps
        real = [i for i, key in enumerate(keys) if not key.startswith("pad")]
        assert steps.num_steps == len(real) and steps.row.tolist() == list(range(len(real)))  # one step per real row
        assert torch.equal(steps.end, mask[real].sum(1)) and bool((steps.start == 0).all())
        runtime.extras = None


def test_gigpo_step_level_advantages_use_the_rows_step_keys():
    """With omega = 1 the turns acting in a shared state (step key 7, or the prompt at turn 0) get step-level
    advantages: the result differs from the episode part exactly where an anchor group holds differing returns."""
    rewards, mask, uids, keys, extra = multi_turn_batch(3)
    episode = v1(rewards, mask, uids, keys, "grpo", True)
    recorder = Recorder()
    attach([{"gigpo": {"omega": 1.0, "normalization": "mean_std", "gamma": 0.5}}, recorder], keys, extra)
    ours = v1(rewards, mask, uids, keys, "grpo_plugins", True)
    steps = recorder.batches[-1].steps
    assert set(steps.key.tolist()) <= {7, -1}  # given keys are used as given (-1 where absent)
    assert not torch.allclose(ours, episode)
    assert bool((ours[mask == 0] == 0).all())
    for row in range(steps.num_steps):  # one value per turn row, on its tokens
        values = ours[row][mask[row] > 0]
        assert bool((values == values[0]).all())


def test_without_keys_the_first_turn_acts_in_the_prompt_state():
    rewards, mask, uids, keys, _ = multi_turn_batch(5)
    recorder = Recorder()
    attach(["gigpo", recorder], keys, None)
    v1(rewards, mask, uids, keys, "grpo_plugins", True)
    batch = recorder.batches[-1]
    first = batch.steps.turn == 0
    assert torch.equal(batch.steps.key[first], batch.prompt_ids[batch.steps.row[first]])
    assert bool((batch.steps.key[~first] == -1).all())


def test_no_method_needing_steps_leaves_them_out():
    rewards, mask, uids, keys, extra = multi_turn_batch(1)
    recorder = Recorder()
    attach([recorder], keys, extra)
    v1(rewards, mask, uids, keys, "grpo_plugins", True)
    assert recorder.batches[-1].steps is None


def test_steps_need_the_grpo_plugins_trainer():
    grpo_plugins_verl.configure(["gigpo"])
    runtime = get_runtime(OmegaConf.create({}))
    config = run_config("trainer.n_gpus_per_node=1")
    check_run(runtime.composition, config)  # the trainer provides steps
    assert "steps" in verl_capabilities(config).batch_fields
    with pytest.raises(CompositionError, match=r"method 'gigpo' needs batch field 'steps'.*trainer_mode=grpo_plugins"):
        check_run(runtime.composition, None)  # verl's own trainer: only rewards, mask and uid
    sync = run_config("trainer.n_gpus_per_node=1", "trainer.v1.trainer_mode=colocate_async")
    with pytest.raises(CompositionError, match="steps"):
        check_run(runtime.composition, sync)


@pytest.mark.parametrize("norm", [True, False])
def test_no_method_on_multi_turn_rows_is_verl_multi_trajectory_grpo_bit_for_bit(norm):
    """Without a method needing steps, the stage scores each session's last turn and broadcasts its advantage to
    the session's turns, exactly as verl's V1 GRPO (``compute_advantage_for_multi_trajectories``)."""
    for seed in range(12):
        rewards, mask, uids, keys, extra = multi_turn_batch(seed)
        expected = v1(rewards, mask, uids, keys, "grpo", norm)
        recorder = Recorder()
        attach([recorder], keys, extra, norm)
        ours = v1(rewards, mask, uids, keys, "grpo_plugins", norm)
        assert torch.equal(ours, expected), (seed, (ours - expected).abs().max())
        finals = recorder.batches[-1]
        assert finals.steps is None and finals.rewards.numel() == 12  # 3 prompts x 4 sessions, last turns


def test_token_weights_on_multi_turn_rows_without_steps_are_refused():
    class Weigher(Method):
        name = "weigher"

        @hookimpl
        def mask_tokens(self, batch):
            return torch.ones_like(batch.completion_mask)

    rewards, mask, uids, keys, extra = multi_turn_batch(2)
    attach([Weigher()], keys, extra)
    with pytest.raises(CompositionError, match=r"multi-turn rows.*weigher.*GRPOBatch.steps|multi-turn rows.*steps"):
        v1(rewards, mask, uids, keys, "grpo_plugins", True)
