"""NGRPO: the card's worked example by hand, edge cases and the asymmetric clip (real TRL runs and the
reduction to TRL's GRPO: tests/integration/test_round1_trl_runs.py)."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_plugins import BatchError, Composition, ConfigError, LossInputs, PluginError
from grpo_plugins.testing import make_batch
from grpo_plugin_ngrpo import asymmetric_clip_loss, ngrpo_advantages

TOL = dict(atol=1e-5, rtol=0)


def batch_of(groups: list[list[float]], num_tokens: int = 4):
    """A batch whose prompt ``10 + g`` holds the rewards ``groups[g]`` (rows shuffled by make_batch)."""
    sizes = [len(g) for g in groups]
    plain = make_batch(group_sizes=sizes, num_tokens=num_tokens, rewards=[0.0] * sum(sizes))
    # make_batch shuffles rows: give each row the next reward of its prompt's group, in order
    queues = {10 + g: list(rewards) for g, rewards in enumerate(groups)}
    plain.rewards = torch.tensor([float(queues[int(p)].pop(0)) for p in plain.prompt_ids])
    return plain


def advantages_by_group(batch) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for p, a in zip(batch.prompt_ids.tolist(), batch.advantages.tolist()):
        out.setdefault(p - 10, []).append(a)
    return out


def test_card_worked_example_advantages():
    batch = Composition(["ngrpo"]).run_advantage_stage(batch_of([[0, 0, 0, 0], [1, 0, 0, 0]]))
    got = advantages_by_group(batch)
    # all wrong: augmented [0,0,0,0,1], mu = 0.2, sigma = sqrt(0.2) = 0.4472
    assert got[0] == pytest.approx([-0.44721] * 4, abs=1e-5)
    # one right: augmented [1,0,0,0,1], mu = 0.4, sigma = sqrt(0.3) = 0.5477
    assert got[1] == pytest.approx([1.09544, -0.73030, -0.73030, -0.73030], abs=1e-5)


def test_closed_form_all_wrong_group_of_eight():
    # mu = 1/9, sigma = 1/3 -> A = -(1/9) / (1/3) = -1/3
    a = ngrpo_advantages(torch.zeros(8), torch.zeros(8, dtype=torch.long), 1)
    assert a.dtype == torch.float32 and torch.allclose(a, torch.full((8,), -1 / 3), **TOL)


def test_uneven_groups_group_of_one_and_all_correct():
    groups = [[1, 0, 0], [1], [0, 1, 1, 0], [1, 1]]
    batch = Composition(["ngrpo"]).run_advantage_stage(batch_of(groups))
    got = advantages_by_group(batch)
    # [1,0,0] + 1: mu = 0.5, var = 4 * 0.25 / 3 -> sigma = 0.57735 -> +-0.86603
    assert got[0] == pytest.approx([0.86603, -0.86603, -0.86603], abs=1e-5)
    # group of one: mu = 0, sigma = 1 -> A = r / (1 + 1e-6)
    assert got[1] == pytest.approx([1.0], abs=1e-5)
    # [0,1,1,0] + 1: mu = 0.6, var = (2 * 0.36 + 3 * 0.16) / 4 = 0.3 -> sigma = 0.54772
    assert got[2] == pytest.approx([-1.09545, 0.73030, 0.73030, -1.09545], abs=1e-5)
    # all correct with R_max: every augmented value is 1 -> sigma 0 -> A = 0
    assert got[3] == pytest.approx([0.0, 0.0], abs=1e-9)


def test_k_virtual_samples_and_r_max():
    # k = 2, R_max = 2, rewards [0, 1]: augmented [0,1,2,2], mu = 1.25,
    # var = (1.5625 + 0.0625 + 2 * 0.5625) / 3 = 0.91667, sigma = 0.95743
    a = ngrpo_advantages(torch.tensor([0.0, 1.0]), torch.zeros(2, dtype=torch.long), 1, max_reward=2.0, num_virtual=2)
    assert a.tolist() == pytest.approx([-1.30558, -0.26112], abs=1e-5)


def test_all_at_r_max_group_is_exactly_zero_at_any_r_max():
    # float32 rewards 0.1 with R_max = 0.1 (a Python float64): the augmented group is constant -> A = 0 exactly
    index = torch.tensor([0, 0, 0, 0, 1, 1])
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1, 0.0])
    a = ngrpo_advantages(rewards, index, 2, max_reward=0.1, num_virtual=1)
    assert a[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    # the other group: augmented [0.1, 0, 0.1], mu = 0.2/3, sigma = sqrt(0.01/3) -> A = [0.57735, -1.15470]
    assert a[4:].tolist() == pytest.approx([0.57735, -1.15470], abs=1e-4)
    # double precision, where the mean of 5 + 2 equal values rounds (unguarded: A = -5.6e-11), and k = 0
    value = 0.45938294312745087
    double = ngrpo_advantages(torch.full((5,), value, dtype=torch.float64), torch.zeros(5, dtype=torch.long), 1,
                              max_reward=value, num_virtual=2)
    assert double.tolist() == [0.0] * 5
    plain = ngrpo_advantages(torch.full((3,), 0.7), torch.zeros(3, dtype=torch.long), 1, num_virtual=0)
    assert plain.tolist() == [0.0, 0.0, 0.0]


def test_zero_virtual_samples_is_plain_grpo():
    rewards = [0.0, 1.0, 0.5, 1.0, 0.0, 0.2, 0.7, 0.7, 0.1, 0.9, 0.3]
    grpo = Composition([]).run_advantage_stage(make_batch((3, 2, 4, 2), rewards=rewards)).advantages
    ngrpo = Composition([{"ngrpo": {"num_virtual": 0}}]).run_advantage_stage(make_batch((3, 2, 4, 2), rewards=rewards))
    assert torch.allclose(ngrpo.advantages, grpo, atol=1e-6)


def test_distinct_from_grpo_all_wrong_groups_get_signal():
    batch = batch_of([[0, 0, 0], [0, 0, 1]])
    grpo = Composition([]).run_advantage_stage(batch_of([[0, 0, 0], [0, 0, 1]])).advantages
    comp = Composition(["ngrpo"])
    ngrpo = comp.run_advantage_stage(batch).advantages
    wrong = batch.group_index == 0
    assert torch.all(grpo[wrong] == 0)  # GRPO: no learning signal from an all-wrong group
    assert torch.all(ngrpo[wrong] < 0)  # NGRPO: pushes all of them down
    metrics = comp.pop_metrics()
    assert metrics["plugins/ngrpo/frac_uniform_groups_with_signal"] == 1.0


def test_nan_rewards_are_a_clear_error():
    batch = batch_of([[0, 1], [1, 0]])
    batch.rewards[1] = float("nan")
    with pytest.raises(BatchError, match="NaN"):
        Composition(["ngrpo"]).run_advantage_stage(batch)
    with pytest.raises(ValueError, match="NaN"):
        ngrpo_advantages(torch.tensor([0.0, float("nan")]), torch.zeros(2, dtype=torch.long), 1)


def test_card_clip_example_and_gradients():
    ratio = torch.tensor([[1.3, 0.8, 0.8, 1.3]])
    log_probs = ratio.log().requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss = asymmetric_clip_loss(log_probs, torch.zeros_like(log_probs), adv)
    # A=+1, rho=1.3 -> clipped at 1.24; A=-1, rho=0.8 -> clipped at 0.84;
    # A=+1, rho=0.8 -> lower bound does not bind (-0.8); A=-1, rho=1.3 -> upper does not bind (1.3)
    assert loss.tolist()[0] == pytest.approx([-1.24, 0.84, -0.8, 1.3], abs=1e-6)
    loss.sum().backward()
    # clipped tokens carry no gradient; unclipped ones d(-A rho)/d logp = -A rho
    assert log_probs.grad.tolist()[0] == pytest.approx([0.0, 0.0, -0.8, 1.3], abs=1e-6)


def test_surrogate_through_the_loss_stage_and_switch_off():
    log_probs = torch.tensor([[math.log(1.3), math.log(0.8)]], requires_grad=True)
    inputs = LossInputs(log_probs=log_probs, old_log_probs=torch.zeros(1, 2), advantages=torch.tensor([[1.0, -1.0]]),
                        mask=torch.ones(1, 2))
    parts = Composition(["ngrpo"]).run_loss_stage(inputs, lambda i: torch.zeros_like(i.log_probs))
    assert parts.policy.tolist()[0] == pytest.approx([-1.24, 0.84], abs=1e-6)
    off = Composition([{"ngrpo": {"asymmetric_clip": False}}])
    assert off.providers("policy_surrogate") == []
    assert torch.equal(off.run_loss_stage(inputs, lambda i: torch.full_like(i.log_probs, 7.0)).policy,
                       torch.full((1, 2), 7.0))


def test_all_correct_filter_masks_those_groups():
    comp = Composition([{"ngrpo": {"filter_all_correct": True}}])
    batch = comp.run_advantage_stage(batch_of([[1, 1], [1, 0, 0]]))
    full = batch.group_index == 0
    assert torch.all(batch.token_weights[full] == 0) and torch.all(batch.token_weights[~full] == 1)
    assert Composition(["ngrpo"]).providers("mask_tokens") == []  # off by default
    # every group all correct: nothing would be left, so nothing is filtered (every advantage is 0 anyway)
    batch = comp.run_advantage_stage(batch_of([[1, 1], [1, 1, 1]]))
    assert torch.all(batch.token_weights == 1) and torch.all(batch.advantages == 0)


def test_bad_config_is_rejected():
    with pytest.raises(ConfigError):
        Composition([{"ngrpo": {"num_virtual": -1}}])


def test_stateless_round_trip(tmp_path):
    """NGRPO keeps no state: after batches through both stages its state is still empty, the checkpoint
    holds nothing, a composition restored from it gives bit-identical advantages, token weights and loss
    to the one that ran, and state offered to it is refused."""
    config = [{"ngrpo": {"filter_all_correct": True}}]
    ran = Composition(config)
    inputs = LossInputs(log_probs=torch.tensor([[math.log(1.3), math.log(0.8)]]), old_log_probs=torch.zeros(1, 2),
                        advantages=torch.tensor([[1.0, -1.0]]), mask=torch.ones(1, 2))
    for groups in ([[0, 0, 1], [1, 1]], [[1, 0], [0, 0, 0, 1]]):
        ran.run_advantage_stage(batch_of(groups))
        ran.run_loss_stage(inputs, lambda i: torch.zeros_like(i.log_probs))
    assert ran.state_dict() == {}
    ran.save(tmp_path / "state.pt")
    assert torch.load(tmp_path / "state.pt", weights_only=True) == {}
    restored = Composition(config)
    restored.load(tmp_path / "state.pt")
    after_run = ran.run_advantage_stage(batch_of([[1, 0, 0], [1, 1], [0, 0]]))
    after_load = restored.run_advantage_stage(batch_of([[1, 0, 0], [1, 1], [0, 0]]))
    assert torch.equal(after_run.advantages, after_load.advantages)
    assert torch.equal(after_run.token_weights, after_load.token_weights)
    assert after_run.token_weights.min() == 0  # the all-correct group is filtered: the stages really ran
    surrogate = lambda i: torch.zeros_like(i.log_probs)  # noqa: E731
    assert torch.equal(ran.run_loss_stage(inputs, surrogate).policy, restored.run_loss_stage(inputs, surrogate).policy)
    with pytest.raises(PluginError, match="ngrpo.*stateless"):
        restored.load_state_dict({"ngrpo": {"step": torch.tensor(3)}})
