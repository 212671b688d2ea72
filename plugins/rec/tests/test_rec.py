"""REC / OPMD / AsymRE: the card's numbers by hand, the clipping masks, edge cases, a finite-difference
gradient check, and the cross-check with GRPO without std (torch and the core only; verl's gpg / dro
losses: tests/integration/test_rec_trl.py)."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_plugins import Composition, ConfigError, GRPOBatch, LossInputs, RunContext
from grpo_plugins.errors import BatchError, CompositionError
from grpo_plugins.ops import segment_mean
from grpo_plugins.surrogates import ppo_clip_loss
from grpo_plugin_rec import balance_drop, group_baseline_advantages, rec_keep_mask

CARD = torch.tensor([1.0, 0.0, 0.0, 1.0])


def advantages(methods, rewards, prompt_ids, step=0):
    c = Composition(methods)
    c.run_setup(RunContext(trainer="test", seed=7))
    return c.run_advantage_stage(GRPOBatch(prompt_ids=torch.tensor(prompt_ids), rewards=rewards, step=step)).advantages


@pytest.mark.parametrize("variant, expected", [
    ("rec", [0.5, -0.5, -0.5, 0.5]),
    ("asymre", [0.6, -0.4, -0.4, 0.6]),  # b = mean - 0.1
    ("opmd", [1 - math.log((math.e + 1) / 2), -math.log((math.e + 1) / 2)] * 2),  # b = ln((e + 1) / 2) = .620
])
def test_card_baselines(variant, expected):
    out = advantages([{"rec": {"variant": variant}}], CARD, [3, 3, 3, 3])
    assert out[[0, 1]].tolist() == pytest.approx(expected[:2], abs=1e-6)
    assert out.tolist() == pytest.approx([expected[0], expected[1], expected[1], expected[0]], abs=1e-6)
    if variant == "opmd":
        assert out.tolist() == pytest.approx([0.380, -0.620, -0.620, 0.380], abs=1e-3)


def test_std_normalize_population_and_uneven_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0, 5.0])
    out = advantages([{"rec": {"std_normalize": True}}], rewards, [1, 1, 1, 2, 9])
    # group 1: mean 1/3, population std sqrt(2/9); group 2 (one completion): baseline 0, std 1
    std = math.sqrt(2 / 9)
    assert out[:3].tolist() == pytest.approx([(2 / 3) / (std + 1e-6), (-1 / 3) / (std + 1e-6)] + [(-1 / 3) / (std + 1e-6)], rel=1e-5)
    assert out[3].item() == pytest.approx(2.0 / (1 + 1e-6))
    assert out[4].item() == pytest.approx(5.0 / (1 + 1e-6))


@pytest.mark.parametrize("scale", [1.0, 1e4, 3.3e-3])
def test_constant_groups_exactly_zero(scale):
    rewards = torch.full((3,), 0.7 * scale)
    for variant in ("rec", "opmd"):
        out = advantages([{"rec": {"variant": variant, "std_normalize": True}}], rewards, [4, 4, 4])
        assert torch.equal(out, torch.zeros(3))
    asym = advantages([{"rec": {"variant": "asymre", "std_normalize": True}}], rewards, [4, 4, 4])
    assert asym.tolist() == pytest.approx([0.1] * 3)  # the shift is the whole advantage, never divided by std 0


def test_nan_reward_is_a_clear_error():
    with pytest.raises(BatchError, match="(?i)nan|finite"):
        advantages(["rec"], torch.tensor([1.0, float("nan")]), [1, 1])


def test_balance_drop_hand_example():
    # group 0: 1 positive, 3 negatives -> 2 negatives dropped; group 1: balanced -> none
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    index = torch.tensor([0, 0, 0, 0, 1, 1])
    keep = balance_drop(rewards, index, 2, torch.Generator().manual_seed(0))
    assert keep[0] and keep[4] and keep[5]
    assert int((~keep[1:4]).sum()) == 2
    # kept: 1 and one 0 -> mean 1/2
    out = group_baseline_advantages(rewards, index, 2, keep=keep)
    assert out[0].item() == pytest.approx(0.5) and out[~keep].abs().sum() == 0
    assert sorted(out[1:4].tolist()) == pytest.approx([-0.5, 0.0, 0.0])


def test_balance_drop_keeps_a_constant_group_whole():
    # six equal float32 rewards: their float mean rounds above the value, so every row looked "negative"
    value = 0.30742282
    rewards = torch.tensor([value] * 6 + [1.0, 0.0, 0.0])
    index = torch.tensor([0] * 6 + [1, 1, 1])
    assert segment_mean(rewards, index, 2)[0] > rewards[0]  # the rounding this guards against
    keep = balance_drop(rewards, index, 2, torch.Generator().manual_seed(0))
    assert keep[:7].all() and int((~keep[7:]).sum()) == 1  # group 1: 1 positive, 2 negatives -> 1 dropped
    out = group_baseline_advantages(rewards, index, 2, variant="asymre", keep=keep)
    assert out[:6].tolist() == pytest.approx([0.1] * 6)  # AsymRE's constant group: -shift each, not 0
    comp = Composition([{"rec": {"variant": "asymre", "drop": "balance"}}])
    comp.run_setup(RunContext(trainer="test", seed=7))
    adv = comp.run_advantage_stage(GRPOBatch(prompt_ids=torch.tensor([3] * 6), rewards=torch.full((6,), value))).advantages
    assert adv.tolist() == pytest.approx([0.1] * 6)
    assert comp.pop_metrics()["plugins/rec/frac_dropped"] == 0.0


def test_balance_drop_needs_a_seed_and_is_reproducible():
    a = advantages([{"rec": {"drop": "balance"}}], torch.tensor([1.0, 0, 0, 0, 0]), [1] * 5, step=3)
    b = advantages([{"rec": {"drop": "balance"}}], torch.tensor([1.0, 0, 0, 0, 0]), [1] * 5, step=3)
    assert torch.equal(a, b) and int((a == 0).sum()) == 3
    c = Composition([{"rec": {"drop": "balance"}}])
    assert "step_generator" in c.needs()["rec"].features


def test_keep_masks_card_token():
    ratio, adv = torch.tensor([[1.5, 1.5, 0.5, 1.1]]), torch.tensor([[1.0, -1.0, 1.0, 1.0]])
    assert rec_keep_mask(ratio, adv, "two-side", 0.2, 0.2, 0.6, 2.0).tolist() == [[False, False, False, True]]
    assert rec_keep_mask(ratio, adv, "one-side", 0.2, 0.2, 0.6, 2.0).tolist() == [[False, True, True, True]]
    # ring: also keeps A >= 0 with rho <= 0.4 and A <= 0 with rho >= 3
    ring = rec_keep_mask(torch.tensor([[0.3, 3.5, 0.5]]), torch.tensor([[1.0, -1.0, 1.0]]), "ring", 0.2, 0.2, 0.6, 2.0)
    assert ring.tolist() == [[True, True, False]]


def loss_inputs(log_probs, old, adv, mask):
    return LossInputs(log_probs=log_probs, old_log_probs=old, advantages=adv, mask=mask)


def token_mean(loss, mask):
    return torch.where(mask > 0, loss, 0.0).sum() / mask.sum()


def rec_loss(config, log_probs, old, adv, mask):
    parts = Composition([{"rec": config}]).run_loss_stage(loss_inputs(log_probs, old, adv, mask), None)
    return token_mean(parts.policy, mask)


def case(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    old = -torch.rand(3, 4, generator=gen, dtype=dtype) * 2
    log_probs = old + 0.3 * torch.randn(3, 4, generator=gen, dtype=dtype)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=dtype)
    adv = torch.tensor([[0.5], [-1.0], [0.25]], dtype=dtype).expand(3, 4)
    return log_probs, old, adv, mask


def test_loss_value_by_hand_card_token_dropped():
    # one token, rho = 1.5, A = 0.5 > 0: kept without clipping, dropped by two-side and one-side
    old = torch.tensor([[math.log(0.2)]])
    lp = torch.tensor([[math.log(0.3)]])
    adv, mask = torch.tensor([[0.5]]), torch.ones(1, 1)
    assert rec_loss({}, lp, old, adv, mask).item() == pytest.approx(-0.5 * math.log(0.3))
    assert rec_loss({"clip_mode": "two-side"}, lp, old, adv, mask).item() == 0.0
    assert rec_loss({"clip_mode": "one-side"}, lp, old, adv, mask).item() == 0.0
    k2 = rec_loss({"regularizer": "k2", "regularizer_coef": 0.1}, lp, old, adv, mask)
    assert k2.item() == pytest.approx(-0.5 * math.log(0.3) + 0.1 * math.log(1.5) ** 2)
    opmd = rec_loss({"variant": "opmd", "tau": 1.0}, lp, old, adv, mask)
    assert opmd.item() == pytest.approx(-0.5 * math.log(0.3) / 2)


@pytest.mark.parametrize("config", [
    {}, {"clip_mode": "one-side", "weight": "importance_sampling"}, {"weight": "advantage", "temp": 0.5},
    {"regularizer": "k2", "regularizer_coef": 0.3}, {"regularizer": "forward-kl", "regularizer_coef": 0.2},
])
def test_gradient_finite_difference(config):
    log_probs, old, adv, mask = case()
    ratio_free = config.get("weight") != "importance_sampling" and config.get("clip_mode", "none") == "none"

    def f(x):
        return rec_loss(config, x, old, adv, mask)

    x = log_probs.clone().requires_grad_(True)
    f(x).backward()
    # the ratio inside masks and IS weights carries no gradient: differentiate with it held fixed
    if not ratio_free:
        return _fd_check_fixed_ratio(config, log_probs, old, adv, mask, x.grad)
    numeric = torch.zeros_like(log_probs)
    for i, j in mask.nonzero().tolist():
        e = torch.zeros_like(log_probs)
        e[i, j] = 1e-6
        numeric[i, j] = (f(log_probs + e) - f(log_probs - e)) / 2e-6
    torch.testing.assert_close(x.grad, numeric, atol=1e-7, rtol=1e-6)


def _fd_check_fixed_ratio(config, log_probs, old, adv, mask, grad):
    # with rho detached, the gradient is -A_w keep / tokens at each kept token
    ratio = torch.exp(log_probs - old)
    keep = rec_keep_mask(ratio, adv, config.get("clip_mode", "none"), 0.2, 0.2, 0.6, 2.0).double()
    weight = adv * ratio if config.get("weight") == "importance_sampling" else adv
    torch.testing.assert_close(grad, -weight * keep * mask / mask.sum(), atol=1e-12, rtol=1e-9)


def test_cross_check_grpo_without_std_on_policy():
    """On-policy, REC (no clipping, IS weight) has GRPO's gradient with scale_rewards='none' (rho = 1)."""
    rewards, ids = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0]), [5, 5, 5, 6, 6]
    rec_adv = advantages([{"rec": {"weight": "importance_sampling"}}], rewards, ids)
    grpo_adv = advantages([{"grpo": {"scale": "none"}}], rewards, ids)
    torch.testing.assert_close(rec_adv, grpo_adv)
    log_probs = -torch.rand(5, 3, dtype=torch.float64)
    mask = torch.ones(5, 3, dtype=torch.float64)
    adv = rec_adv.double()[:, None].expand(5, 3)
    x = log_probs.clone().requires_grad_(True)
    rec_loss({"weight": "importance_sampling"}, x, log_probs, adv, mask).backward()
    y = log_probs.clone().requires_grad_(True)
    token_mean(ppo_clip_loss(torch.exp(y - log_probs), adv, 0.2, 0.2), mask).backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_differs_from_grpo_off_policy():
    """The distinguishing property: a token far off-policy (rho = 3, A > 0) still pushes under REC, while
    PPO-clip gives it no gradient."""
    old, lp = torch.tensor([[math.log(0.1)]], dtype=torch.float64), torch.tensor([[math.log(0.3)]], dtype=torch.float64)
    adv, mask = torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    x = lp.clone().requires_grad_(True)
    rec_loss({}, x, old, adv, mask).backward()
    y = lp.clone().requires_grad_(True)
    ppo_clip_loss(torch.exp(y - old), adv, 0.2, 0.2).sum().backward()
    assert x.grad.item() == pytest.approx(-1.0) and y.grad.item() == 0.0


def test_all_tokens_masked_and_nan_padding():
    log_probs, old, adv, mask = case()
    padded = torch.where(mask > 0, log_probs, float("nan")).requires_grad_(True)
    parts = Composition(["rec"]).run_loss_stage(loss_inputs(padded, old, adv, mask), None)
    loss = token_mean(parts.policy, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(padded.grad).all()
    empty = torch.zeros_like(mask)
    parts = Composition(["rec"]).run_loss_stage(loss_inputs(log_probs, old, adv, empty), None)
    assert torch.where(empty > 0, parts.policy, 0.0).sum() == 0


def test_config_domains_and_cross_field():
    with pytest.raises(ConfigError):
        Composition([{"rec": {"epsilon_low": 0.0}}])
    with pytest.raises(ConfigError):
        Composition([{"rec": {"clip_mode": "ring", "epsilon_low_prime": 0.1}}])
    with pytest.raises(CompositionError):
        Composition(["rec", "rec"])
