"""COPO: the card's worked example by hand, the released code's blend, edge cases, and the contrast with GRPO."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from grpo_plugins import Composition, GRPOBatch
from grpo_plugins.errors import BatchError, CompositionError, ConfigError, PluginError
from grpo_plugins.registry import resolve

CARD = {"copo": {"sharpness": 10.0, "threshold": 0.3, "entropy_unit": "nats", "blend": "soft"}}


def batch_of(rewards, prompt_ids, completions=None) -> GRPOBatch:
    return GRPOBatch(
        prompt_ids=torch.tensor(prompt_ids),
        rewards=torch.tensor(rewards, dtype=torch.float32),
        completions=completions,
    )


def advantages(methods, batch):
    return Composition(methods).run_advantage_stage(batch).advantages


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_discovered():
    assert resolve("copo").load().paper == "https://arxiv.org/abs/2508.04138"


def test_card_worked_example():
    # q0 all correct (H = 0), q1 = [1, 0, 1, 0] (H = ln 2); c = [1, .5] -> A_glob = [+.7071, -.7071]
    # w0 = sigmoid(10 (0 - .3)) = .0474; w1 = sigmoid(10 (ln 2 - .3)) = .9808; local q1 = +-.8660
    adv = advantages([CARD], batch_of([1, 1, 1, 1, 1, 0, 1, 0], [0] * 4 + [1] * 4))
    g = 0.25 / math.sqrt(0.125)  # (1 - .75) / unbiased std of (1, .5)
    w0, w1 = sigmoid(-3.0), sigmoid(10 * (math.log(2) - 0.3))
    local = 0.5 / math.sqrt(1 / 3)
    assert adv[:4].tolist() == pytest.approx([(1 - w0) * g] * 4, abs=1e-5)
    assert adv[4:].tolist() == pytest.approx(
        [w1 * local - (1 - w1) * g, -w1 * local - (1 - w1) * g] * 2, abs=1e-5
    )
    assert adv.tolist() == pytest.approx([0.674] * 4 + [0.836, -0.863, 0.836, -0.863], abs=1e-3)  # the card's numbers


def test_released_default_blend_soft_with_zero_in_bits():
    # defaults: k = 5, b = 1 bit, completions with reward 0 take only the global advantage
    adv = advantages(["copo"], batch_of([1, 1, 1, 1, 1, 0, 1, 0], [0] * 4 + [1] * 4))
    g = 0.25 / math.sqrt(0.125)
    w0, w1 = sigmoid(5 * (0 - 1)), sigmoid(5 * (1 - 1))  # H in bits: 0 and 1
    local = 0.5 / math.sqrt(1 / 3)
    assert adv[:4].tolist() == pytest.approx([(1 - w0) * g] * 4, abs=1e-5)
    assert adv[4].item() == pytest.approx(w1 * local - (1 - w1) * g, abs=1e-5)
    assert adv[5].item() == pytest.approx(-g, abs=1e-5)  # reward 0: weight 0, global only


def test_uniform_groups_keep_signal_unlike_grpo():
    rewards = [1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 1]
    ids = [0] * 4 + [1] * 4 + [2] * 4
    grpo = advantages([], batch_of(rewards, ids))
    copo = advantages(["copo"], batch_of(rewards, ids))
    assert grpo[:8].tolist() == [0.0] * 8
    assert bool((copo[:4] > 0.5).all()) and bool((copo[4:8] < -0.5).all())


def test_constant_batch_is_exactly_zero_at_any_scale():
    for value in (0.1, 7.3, 1e6):
        adv = advantages([CARD], batch_of([value] * 6, [0, 0, 0, 1, 1, 1]))
        assert adv.tolist() == [0.0] * 6


def test_groups_with_equal_means_in_another_order_have_no_global_advantage():
    # both groups hold .1, .1, .1, .7, .7, .7 (c = .4 each): A_glob = 0 exactly, not a float32 rounding
    # residue of c divided by std c + 1e-6. Local: +-.3 / (.3 sqrt(6/5)) = +-sqrt(5/6); H = 1 bit, so
    # w = sigmoid(5 (1 - 1)) = .5 and A = +-.5 sqrt(5/6) = +-.45644
    rewards = [0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.1, 0.1, 0.7, 0.7, 0.1, 0.7]
    adv = advantages(["copo"], batch_of(rewards, [0] * 6 + [1] * 6))
    half = 0.5 * math.sqrt(5 / 6)
    assert adv.tolist() == pytest.approx([half if r > 0.5 else -half for r in rewards], abs=1e-5)


def test_constant_group_local_advantage_is_exactly_zero():
    # group 0 constant at 0.1 (local 0 exactly), group 1 varies: only the global term reaches group 0
    adv = advantages([CARD], batch_of([0.1, 0.1, 1.0, 0.0], [0, 0, 1, 1]))
    c = torch.tensor([0.1, 0.5])
    g = ((c - c.mean()) / (c.std() + 1e-6)).tolist()
    w0 = sigmoid(-3.0)  # one answer: H = 0
    assert adv[:2].tolist() == pytest.approx([(1 - w0) * g[0]] * 2, abs=1e-5)


def test_groups_of_one_and_uneven_groups_shuffled():
    # group 3: [1] alone (local 0, H = 0); group 8: [1, 0, 0] (H = entropy of (1/3, 2/3)); group 5: [0, 0]
    rewards = [1, 1, 0, 0, 0, 0]
    ids = [3, 8, 8, 8, 5, 5]
    order = [4, 1, 5, 3, 0, 2]
    adv = dict(zip(order, advantages([CARD], batch_of([rewards[i] for i in order], [ids[i] for i in order])).tolist()))
    c = torch.tensor([1.0, 0.0, 1 / 3])  # prompts 3, 5, 8: each prompt counts once in the global statistics
    g = ((c - c.mean()) / (c.std() + 1e-6)).tolist()
    h8 = -(1 / 3) * math.log(1 / 3) - (2 / 3) * math.log(2 / 3)
    w8, w0 = sigmoid(10 * (h8 - 0.3)), sigmoid(-3.0)
    local8 = (2 / 3) / math.sqrt(1 / 3)  # r - mean = 2/3, unbiased std of (1, 0, 0) = sqrt(1/3)
    assert adv[0] == pytest.approx((1 - w0) * g[0], abs=1e-5)
    assert adv[4] == pytest.approx((1 - w0) * g[1], abs=1e-5)
    assert adv[1] == pytest.approx(w8 * local8 + (1 - w8) * g[2], abs=1e-5)


def test_answers_from_completions_and_from_a_function():
    rewards = [1, 1, 1, 1, 1, 0, 0, 0]
    ids = [0] * 4 + [1] * 4
    same = ["x = 4", "x  =  4", "x = 4", "x = 4"]
    texts = same + ["7", "8", "9", "10"]
    by_text = advantages([{"copo": {**CARD["copo"], "answers": "completion"}}], batch_of(rewards, ids, texts))
    by_reward = advantages([CARD], batch_of(rewards, ids, texts))
    # group 0 is one answer either way; group 1 has 4 distinct texts (H = ln 4) but only 2 reward values
    torch.testing.assert_close(by_text[:4], by_reward[:4])
    w_text, w_reward = sigmoid(10 * (math.log(4) - 0.3)), sigmoid(10 * (-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) - 0.3))
    assert w_text > w_reward
    # a 'module:function' extractor: builtins:len classes the texts by length (1, 1, 1, 2 characters)
    by_len = advantages([{"copo": {**CARD["copo"], "answers": "builtins:len"}}], batch_of(rewards, ids, texts))
    torch.testing.assert_close(by_len, by_reward)  # shares (1/4, 3/4) like the rewards: same entropy
    with pytest.raises(PluginError, match="needs the decoded completions"):
        advantages([{"copo": {"answers": "completion"}}], batch_of(rewards, ids))
    assert Composition([{"copo": {"answers": "completion"}}]).required_fields() == {"completions"}


def test_bad_config_is_refused():
    with pytest.raises(ConfigError, match="answers"):
        Composition([{"copo": {"answers": "text"}}])
    with pytest.raises(CompositionError, match="failed to start"):
        Composition([{"copo": {"answers": "no_such_module_xyz:f"}}])
    with pytest.raises(ConfigError, match="sharpness"):
        Composition([{"copo": {"sharpness": 0.0}}])


def test_nan_rewards_are_refused_and_metrics_logged():
    with pytest.raises(BatchError, match="NaN"):
        advantages(["copo"], batch_of([1.0, float("nan"), 0.0, 1.0], [0, 0, 1, 1]))
    comp = Composition(["copo"])
    comp.run_advantage_stage(batch_of([1, 1, 0, 0, 1, 0], [0, 0, 1, 1, 2, 2]))
    metrics = comp.pop_metrics()
    assert 0 < metrics["plugins/copo/mean_local_weight"] < 1
    # c = (1, 0, .5): prompt 2 sits at the batch mean, so its reward-0 completion (global only) gets 0
    assert metrics["plugins/copo/frac_zero_advantage"] == pytest.approx(1 / 6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_flat_batch_test_is_global_across_two_gloo_ranks(tmp_path, monkeypatch):
    # four constant groups (local 0, H = 0 so w = sigmoid(5 (0 - 1))): c = [.6, .6] on rank 0, [.25, .75] on
    # rank 1. Globally c has mean .55 and unbiased std sqrt(.135 / 3), so rank 0's prompts are not "all equal":
    # A_glob = [.05, .05, -.3, .2] / .212132 = [.2357, .2357, -1.4142, .9428] on both ranks together.
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    from copo_gloo_rank import rank_main  # importable by the spawned processes

    shards = [
        (torch.tensor([0, 0, 1, 1]), torch.tensor([0.6, 0.6, 0.6, 0.6], dtype=torch.float64)),
        (torch.tensor([2, 2, 3, 3]), torch.tensor([0.25, 0.25, 0.75, 0.75], dtype=torch.float64)),
    ]
    mp.spawn(rank_main, args=(2, _free_port(), shards, str(tmp_path)), nprocs=2, join=True)
    got = torch.cat([torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)])
    glob = [0.05 / math.sqrt(0.045)] * 2 + [-0.3 / math.sqrt(0.045), 0.2 / math.sqrt(0.045)]
    expected = [(1 - sigmoid(-5.0)) * g for g in glob for _ in range(2)]
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    whole = advantages(["copo"], GRPOBatch(prompt_ids=torch.cat([s[0] for s in shards]),
                                           rewards=torch.cat([s[1] for s in shards])))
    torch.testing.assert_close(got, whole)


def test_float64_rewards_keep_their_precision():
    # rewards 1e6 and 1e6 + .01 differ below float32's precision (its step at 1e6 is .0625): a float32 copy
    # makes the group constant (A = 0). Kept in float64: local = +-.005 / (std + 1e-6) = +-.8659, H = 1 bit
    # so w = sigmoid(0) = .5, one prompt so A_glob = 0: A = +-.4329, the built-in GRPO's +-.8659 halved.
    rewards = torch.tensor([1e6, 1e6 + 0.01, 1e6, 1e6 + 0.01], dtype=torch.float64)
    adv = Composition(["copo"]).run_advantage_stage(GRPOBatch(prompt_ids=torch.zeros(4, dtype=torch.long),
                                                              rewards=rewards)).advantages
    assert adv.dtype == torch.float64
    half = 0.5 * 0.005 / (math.sqrt(0.01**2 / 3) + 1e-6)
    assert adv.tolist() == pytest.approx([-half, half, -half, half], abs=1e-6)
