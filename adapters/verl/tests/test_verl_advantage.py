"""The ``grpo_plugins`` advantage estimator inside verl's own advantage code (real verl, CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from verl import DataProto
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.ray_trainer import compute_advantage
from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories

import grpo_plugins_verl
from grpo_plugins import BatchError, CompositionError, GRPOBatch, Method, PluginError, hookimpl
from grpo_plugins_verl.advantage import compute_grpo_plugins_advantage
from grpo_plugins.arithmetic import group_mean_std
from grpo_plugins_verl.loss import compute_grpo_plugins_policy_loss
from grpo_plugins_verl.testing import actor_config, verl_batch


def v1_advantage(rewards, mask, uids, estimator, norm=True, algorithm=None):
    """verl's V1 trainer call: ``compute_advantage_for_multi_trajectories`` on a DataProto."""
    data = DataProto.from_dict(
        tensors={"token_level_rewards": rewards.clone(), "response_mask": mask.clone()},
        non_tensors={"uid": uids.copy()},
    )
    sessions = {}
    keys = []
    for uid in uids:  # single-turn trajectories: one session per completion, "{uid}_{session}_{index}"
        sessions[uid] = sessions.get(uid, -1) + 1
        keys.append(f"{uid}_{sessions[uid]}_0")
    algorithm = OmegaConf.create({"norm_adv_by_std_in_grpo": norm, **(algorithm or {})})
    out = compute_advantage_for_multi_trajectories(
        data, batch_keys=keys, adv_estimator=estimator, norm_adv_by_std_in_grpo=norm, config=algorithm
    )
    return out.batch["advantages"], out.batch["returns"]


@pytest.mark.parametrize("norm", [True, False])
def test_no_method_equals_verl_grpo_bit_for_bit(norm):
    for seed in range(25):
        gen = torch.Generator().manual_seed(seed)
        sizes = torch.randint(2, 9, (int(torch.randint(1, 7, (1,), generator=gen)),), generator=gen).tolist()
        rewards, mask, uids = verl_batch(sizes, num_tokens=6, seed=seed, num_padding=seed % 3)
        expected, _ = v1_advantage(rewards, mask, uids, "grpo", norm)
        ours, returns = v1_advantage(rewards, mask, uids, "grpo_plugins", norm)
        assert torch.equal(ours, expected), (seed, sizes, (ours - expected).abs().max())
        assert torch.equal(returns, ours)
        direct, _ = compute_advantage(
            DataProto.from_dict(tensors={"token_level_rewards": rewards, "response_mask": mask}, non_tensors={"uid": uids}),
            "grpo",
            norm_adv_by_std_in_grpo=norm,
        ).batch["advantages"], None
        assert torch.equal(ours, direct)


def test_group_statistics_match_torch_per_group_calls():
    gen = torch.Generator().manual_seed(0)
    sizes = torch.tensor([2, 7, 3, 7, 1, 64, 2, 3])
    index = torch.repeat_interleave(torch.arange(len(sizes)), sizes)[torch.randperm(int(sizes.sum()), generator=gen)]
    values = torch.randn(index.numel(), generator=gen) * 3 + 0.3
    mean, std = group_mean_std(values, index, len(sizes), "verl")
    for g in range(len(sizes)):
        members = values[(index == g).nonzero().flatten()]  # batch order, as verl stacks them
        if sizes[g] > 1:
            assert torch.equal(mean[g], torch.mean(members)) and torch.equal(std[g], torch.std(members))
        else:  # verl scores a group of one against mean 0, std 1
            assert mean[g].item() == 0.0 and std[g].item() == 1.0


def test_hand_computed_grpo_advantages():
    # two prompts x 4 completions, scores [1,0,1,0 | 1,1,1,0] on the last token
    uids = np.array(["a"] * 4 + ["b"] * 4, dtype=object)
    rewards = torch.zeros(8, 3)
    rewards[:, -1] = torch.tensor([1.0, 0, 1, 0, 1, 1, 1, 0])
    mask = torch.ones(8, 3, dtype=torch.long)
    adv, _ = compute_grpo_plugins_advantage(rewards, mask, uids, OmegaConf.create({}))
    s_a, s_b = math.sqrt(1 / 3), 0.5  # unbiased std of {1,0,1,0} and {1,1,1,0}
    expected = torch.tensor([0.5 / s_a, -0.5 / s_a] * 2 + [0.25 / s_b] * 3 + [-0.75 / s_b])
    torch.testing.assert_close(adv[:, 0], expected, rtol=0, atol=1e-5)
    assert torch.equal(adv, adv[:, :1].expand(-1, 3))
    # Dr. GRPO mapping: norm_adv_by_std_in_grpo=False -> only the mean is removed
    adv, _ = compute_grpo_plugins_advantage(rewards, mask, uids, OmegaConf.create({"norm_adv_by_std_in_grpo": False}))
    torch.testing.assert_close(adv[:, 0], torch.tensor([0.5, -0.5, 0.5, -0.5, 0.25, 0.25, 0.25, -0.75]))


class Double(Method):
    name = "double"

    @hookimpl
    def shape_rewards(self, rewards):
        return rewards * 2


class Shift(Method):
    name = "shift"

    @hookimpl
    def adjust_advantages(self, advantages):
        return advantages + 0.5


class HalfTail(Method):
    name = "half_tail"

    @hookimpl
    def mask_tokens(self, batch: GRPOBatch):
        weights = torch.full_like(batch.token_mask, 0.5)
        weights[:, 0] = 1.0
        return weights


def test_shaping_adjusting_and_token_weights_reach_verl_advantages():
    grpo_plugins_verl.configure([Double(), Shift(), HalfTail()])
    uids = np.array(["a", "b", "a", "b"], dtype=object)
    rewards = torch.zeros(4, 3)
    rewards[:, 0] = torch.tensor([1.0, 0.0, 3.0, 2.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
    adv, returns = v1_advantage(rewards, mask, uids, "grpo_plugins")
    # shaped rewards a: {2, 6}, b: {0, 4}; each group std sqrt(8) -> A = -+1/sqrt(2); +0.5; tokens 2.. weigh 0.5
    low, high = -1 / math.sqrt(2) + 0.5, 1 / math.sqrt(2) + 0.5
    expected = torch.tensor(
        [[low, low / 2, 0.0], [low, low / 2, low / 2], [high, 0.0, 0.0], [high, high / 2, high / 2]]
    )
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-5)
    assert torch.equal(returns, adv)


def test_padding_rows_get_zero_and_stay_out_of_groups():
    rewards, mask, uids = verl_batch((3, 4), seed=3, num_padding=1)  # one padding row: a group of one
    adv, _ = compute_grpo_plugins_advantage(rewards, mask, uids, OmegaConf.create({}))
    assert torch.equal(adv[-1], torch.zeros_like(adv[-1]))
    runtime = grpo_plugins_verl.get_runtime(OmegaConf.create({}))
    assert runtime.last_batch.num_completions == 7 and sorted(runtime.last_batch.group_sizes.tolist()) == [3, 4]


def test_uids_map_to_dataset_ids_when_the_trainer_registered_them():
    rewards, mask, uids = verl_batch((2, 3), seed=1)
    runtime = grpo_plugins_verl.get_runtime(OmegaConf.create({}))
    compute_grpo_plugins_advantage(rewards, mask, uids, OmegaConf.create({}))
    first = {uid: i for i, uid in enumerate(dict.fromkeys(uids))}
    assert runtime.last_batch.prompt_ids.tolist() == [first[u] for u in uids]  # dense, first appearance
    runtime.prompt_ids.update({"uid-1-0": 41, "uid-1-1": 7})
    compute_grpo_plugins_advantage(rewards, mask, uids, OmegaConf.create({}))
    assert runtime.last_batch.prompt_ids.tolist() == [41 if u == "uid-1-0" else 7 for u in uids]
    assert runtime.last_batch.group_prompt_ids.tolist() == [7, 41]


def test_bad_batches_fail_clearly():
    rewards, mask, uids = verl_batch((2, 3), seed=2)
    rewards[0, 0] = float("nan")
    with pytest.raises(BatchError, match="NaN"):
        compute_grpo_plugins_advantage(rewards, mask, uids, OmegaConf.create({}))
    with pytest.raises(BatchError, match="uid"):
        compute_grpo_plugins_advantage(rewards, mask, None, OmegaConf.create({}))


@pytest.mark.parametrize("norm", [True, False])
def test_groups_of_one_are_scored_as_verl_grpo_scores_them(norm):
    # with no method enabled the adapter accepts what verl accepts: a group of one has mean 0, std 1
    for seed in range(5):
        rewards, mask, uids = verl_batch((1, 3, 1, 2), num_tokens=5, seed=seed, num_padding=seed % 2)
        expected, _ = v1_advantage(rewards, mask, uids, "grpo", norm)
        ours, _ = v1_advantage(rewards, mask, uids, "grpo_plugins", norm)
        assert torch.equal(ours, expected)
        single = [i for i, u in enumerate(uids) if list(uids).count(u) == 1 and not str(u).startswith("pad")]
        scale = (1 + 1e-6) if norm else 1.0
        torch.testing.assert_close(ours[single].sum(-1), rewards[single].sum(-1) / scale * mask[single].sum(-1))


@pytest.mark.parametrize("size", [2, 3, 12, 64])
@pytest.mark.parametrize("value", [7.782482, 123.4, -0.3, 1e4])
def test_constant_groups_get_exactly_zero_unlike_verl(size, value):
    # the one documented difference from verl's grpo: verl leaves its float32 mean's rounding residue
    rewards, mask, uids = verl_batch((size, 3), num_tokens=4, seed=size)
    constant = uids == uids[np.flatnonzero(np.char.endswith(uids.astype(str), "-0"))[0]]
    last = mask.sum(-1) - 1
    rewards[torch.as_tensor(constant)] = 0.0
    rewards[torch.as_tensor(constant), last[torch.as_tensor(constant)]] = value
    for norm in (True, False):
        ours, _ = v1_advantage(rewards, mask, uids, "grpo_plugins", norm)
        assert torch.equal(ours[torch.as_tensor(constant)], torch.zeros_like(ours[torch.as_tensor(constant)]))
        expected, _ = v1_advantage(rewards, mask, uids, "grpo", norm)
        other = torch.as_tensor(~constant)
        assert torch.equal(ours[other], expected[other])  # every other group stays bit-identical to verl


def test_verl_grpo_leaves_a_residue_on_constant_groups():
    rewards, mask, uids = verl_batch((12,), num_tokens=1, seed=0)
    rewards[:] = 123.4
    verl, _ = v1_advantage(rewards, mask, uids, "grpo", True)
    ours, _ = v1_advantage(rewards, mask, uids, "grpo_plugins", True)
    assert verl.abs().max() > 0.1 and torch.equal(ours, torch.zeros_like(ours))


class DropAll(Method):
    name = "drop_all"

    @hookimpl
    def mask_tokens(self, batch):
        return torch.zeros_like(batch.token_mask)


class CarriesRowData(Method):
    name = "carries_row_data"

    @hookimpl
    def adjust_advantages(self, batch, advantages):
        batch.row_data["weight"] = torch.ones(batch.num_completions)
        return advantages

    @hookimpl
    def gate_loss(self, inputs):
        return inputs.row_data["weight"][:, None]


def test_methods_the_adapter_cannot_serve_fail_clearly(caplog):
    rewards, mask, uids = verl_batch((2, 3), seed=4)
    grpo_plugins_verl.configure([DropAll()])
    with pytest.raises(BatchError, match="drop every token"):
        compute_grpo_plugins_advantage(rewards, mask, uids, OmegaConf.create({}))
    # row_data cannot reach verl's policy loss: a warning at the advantage stage, the method's error in the loss
    grpo_plugins_verl.configure([CarriesRowData()])
    with caplog.at_level("WARNING", logger="grpo_plugins_verl"):
        compute_grpo_plugins_advantage(rewards, mask, uids, OmegaConf.create({}))
    assert "row_data ['weight']" in caplog.text
    with pytest.raises(PluginError, match="carries_row_data.*gate_loss.*KeyError"):
        compute_grpo_plugins_policy_loss(
            old_log_prob=torch.zeros(2, 3), log_prob=torch.zeros(2, 3), advantages=torch.ones(2, 3),
            response_mask=torch.ones(2, 3, dtype=torch.bool), config=actor_config(),
        )


def test_estimator_is_registered_in_verl():
    assert core_algos.get_adv_estimator_fn("grpo_plugins") is compute_grpo_plugins_advantage


class Watcher(Method):
    name = "watcher"

    @hookimpl
    def observe(self, batch, step):
        pass


def test_trainer_hooks_without_the_trainer_are_an_error():
    grpo_plugins_verl.configure([Watcher()])
    rewards, mask, uids = verl_batch((2, 3), seed=6)
    with pytest.raises(CompositionError, match="trainer.v1.trainer_mode=grpo_plugins"):
        compute_grpo_plugins_advantage(rewards, mask, uids, OmegaConf.create({}))
    grpo_plugins_verl.get_runtime().trainer_attached = True
    compute_grpo_plugins_advantage(rewards, mask, uids, OmegaConf.create({}))
