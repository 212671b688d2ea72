"""BNPO: the card's worked example by hand, edge cases, and what sets it apart from GRPO."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_plugins import Composition, GRPOBatch
from grpo_plugins.errors import BatchError, ConfigError, PluginError
from grpo_plugins.registry import resolve
from grpo_plugin_bnpo import beta_density, beta_parameters


def batch_of(rewards, prompt_ids, components=None) -> GRPOBatch:
    comps = None if components is None else torch.tensor(components, dtype=torch.float32)
    return GRPOBatch(
        prompt_ids=torch.tensor(prompt_ids),
        rewards=torch.tensor(rewards, dtype=torch.float32),
        reward_components=comps,
        reward_names=() if comps is None else tuple(f"r{k}" for k in range(comps.shape[1])),
        reward_weights=None if comps is None else torch.ones(comps.shape[1]),
    )


def advantages(methods, batch):
    return Composition(methods).run_advantage_stage(batch).advantages


def beta_pdf_by_hand(p, a, b):
    return p ** (a - 1) * (1 - p) ** (b - 1) * math.gamma(a + b) / (math.gamma(a) * math.gamma(b))


def test_discovered_and_not_trl_loss_type():
    cls = resolve("bnpo").load()
    assert cls.paper == "https://arxiv.org/abs/2506.02864"
    assert "not TRL's loss_type='bnpo'" in cls.summary()


def test_card_worked_example():
    # p = .25 and .75: m = .5, v = .125, k = 1 -> alpha = beta = 7/6
    # BetaPDF(.25; 7/6, 7/6) = BetaPDF(.75) = 1.0466 -> w = .9555
    adv = advantages(["bnpo"], batch_of([1, 0, 0, 0, 1, 1, 1, 0], [0] * 4 + [1] * 4))
    w = 1 / beta_pdf_by_hand(0.25, 7 / 6, 7 / 6)
    assert beta_pdf_by_hand(0.25, 7 / 6, 7 / 6) == pytest.approx(1.0466, abs=1e-4)
    assert adv.tolist() == pytest.approx([0.75 * w, -0.25 * w, -0.25 * w, -0.25 * w, 0.25 * w, 0.25 * w, 0.25 * w, -0.75 * w], abs=1e-5)
    assert adv.tolist() == pytest.approx([0.717, -0.239, -0.239, -0.239, 0.239, 0.239, 0.239, -0.717], abs=1e-3)


def test_card_uniform_like_batch_gives_four_thirds():
    # m = .5, v = 1/12: k = .25 * 12 - 1 = 2 -> alpha = beta = 1 + 2 * .5 / 3 = 4/3
    rates = torch.tensor([0.5 - math.sqrt(1 / 12), 0.5, 0.5 + math.sqrt(1 / 12)], dtype=torch.float64)  # unbiased variance 1/12
    alpha, beta = beta_parameters(rates)
    assert alpha.item() == pytest.approx(4 / 3, abs=1e-9)
    assert beta.item() == pytest.approx(4 / 3, abs=1e-9)


def test_beta_density_matches_torch_distributions():
    p = torch.tensor([0.1, 0.25, 0.5, 0.9])
    for a, b in [(7 / 6, 7 / 6), (1.0, 2.5), (3.0, 1.4)]:
        ours = beta_density(p, torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
        reference = torch.distributions.Beta(torch.tensor(a), torch.tensor(b)).log_prob(p).exp()
        torch.testing.assert_close(ours.float(), reference, atol=1e-5, rtol=1e-5)


def test_skewed_batch_fits_skewed_beta_and_reweights_against_grpo():
    # rates .25, .25, .5 (mostly hard): m = 1/3, v = 1/48: k = (2/9) * 48 - 1 = 29/3
    # alpha = 1 + (29/3)(1/3)/3 = 1 + 29/27, beta = 1 + (29/3)(2/3)/3 = 1 + 58/27
    rewards = [1, 0, 0, 0] + [0, 0, 1, 0] + [1, 1, 0, 0]
    ids = [0] * 4 + [1] * 4 + [2] * 4
    adv = advantages(["bnpo"], batch_of(rewards, ids))
    a, b = 1 + 29 / 27, 1 + 58 / 27
    w_hard, w_mid = 1 / beta_pdf_by_hand(0.25, a, b), 1 / beta_pdf_by_hand(0.5, a, b)
    assert adv[0].item() == pytest.approx(0.75 * w_hard, abs=1e-5)
    assert adv[8].item() == pytest.approx(0.5 * w_mid, abs=1e-5)
    # the distinguishing property: GRPO's scale depends only on the group; BNPO's on the batch too —
    # the common (hard) rate is down-weighted relative to the rare (p = .5) one
    grpo = advantages([], batch_of(rewards, ids))
    assert (grpo[0] / grpo[8]).item() == pytest.approx((0.75 / 0.5) / (0.5 / 0.57735), rel=1e-3)
    assert (adv[0] / adv[8]).item() == pytest.approx(1.5 * w_hard / w_mid, rel=1e-4)
    assert w_hard < w_mid


def test_constant_groups_are_exactly_zero_even_at_clipped_weights():
    # groups at p = 0 and p = 1 have density 0 under alpha, beta > 1: weight clipped to 1e6, advantage 0
    rewards = [0, 0, 0, 1, 1, 1, 1, 0, 0, 0.3, 0.3, 0.3]
    ids = [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    adv = advantages(["bnpo"], batch_of(rewards, ids))
    assert adv[:6].tolist() == [0.0] * 6
    assert adv[9:].tolist() == [0.0] * 3
    assert torch.isfinite(adv).all()


def test_zero_variance_batch_uses_uniform_beta():
    # every group at p = .5: v = 0 -> alpha = beta = 1, weight 1: A = s - p
    adv = advantages(["bnpo"], batch_of([1, 0, 0, 1], [0, 0, 1, 1]))
    assert adv.tolist() == [0.5, -0.5, -0.5, 0.5]


def test_equal_rates_in_another_order_are_a_zero_variance_batch():
    # every group holds the same rewards (mean 2.8 / 7 = .4) in another order: all rates are equal, so
    # v = 0 and alpha = beta = 1 (weight 1), A = r - .4 -- not a float rounding residue of v that makes
    # k ~ 1e13 and the advantages ~ 1e-8
    rewards = [0.3, 0.1, 0.7, 0.9, 0.2, 0.55, 0.05]
    orders = [[0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0], [3, 0, 5, 1, 6, 2, 4],
              [2, 4, 6, 0, 1, 3, 5], [5, 3, 1, 6, 4, 0, 2], [1, 6, 0, 4, 5, 2, 3]]
    flat = [rewards[i] for order in orders for i in order]
    adv = advantages(["bnpo"], batch_of(flat, [g for g in range(6) for _ in range(7)]))
    assert adv.tolist() == pytest.approx([r - 0.4 for r in flat], abs=1e-6)


def test_single_prompt_batch_uses_m0_v1():
    # one group: m = 0, v = 1 -> k = -1, alpha = 1, beta = max(1 - 1/3, 1) = 1: weight 1
    adv = advantages(["bnpo"], batch_of([1, 0, 0, 0], [3, 3, 3, 3]))
    assert adv.tolist() == [0.75, -0.25, -0.25, -0.25]


def test_groups_of_one_and_uneven_groups_shuffled():
    # group 4: [1] alone -> p = 0 (the code's baseline); group 2: [1, 0, 0] p = 1/3; group 6: [1, 0] p = .5
    rewards = [1, 1, 0, 0, 1, 0]
    ids = [4, 2, 2, 2, 6, 6]
    order = [5, 1, 3, 0, 4, 2]
    batch = batch_of([rewards[i] for i in order], [ids[i] for i in order])
    adv = dict(zip(order, advantages(["bnpo"], batch).tolist()))
    rates = [0.0, 1 / 3, 0.5]
    m = sum(rates) / 3
    v = sum((r - m) ** 2 for r in rates) / 2
    k = m * (1 - m) / v - 1
    a, b = max(1 + k * m / 3, 1), max(1 + k * (1 - m) / 3, 1)
    assert adv[1] == pytest.approx((2 / 3) / beta_pdf_by_hand(1 / 3, a, b), abs=1e-5)
    assert adv[4] == pytest.approx(0.5 / beta_pdf_by_hand(0.5, a, b), abs=1e-5)
    # the group of one: p = 0 and BetaPDF(0; a > 1, b) = 0 -> weight clipped at max_weight
    assert a > 1
    assert adv[0] == pytest.approx(1e6)
    with pytest.raises(PluginError, match=r"bnpo.*at least 2 completions.*\[4\]"):
        advantages([{"bnpo": {"single_completion": "error"}}], batch)


def test_rewards_outside_range_are_a_clear_error_and_range_maps_them():
    with pytest.raises(PluginError, match=r"reward_min / reward_max"):
        advantages(["bnpo"], batch_of([2.0, 0.0, 1.0, 0.0], [0, 0, 1, 1]))
    # rewards in {-1, 1} with the range set: s = (r + 1) / 2
    signed = advantages([{"bnpo": {"reward_min": -1.0}}], batch_of([1, -1, -1, -1, 1, 1, 1, -1], [0] * 4 + [1] * 4))
    binary = advantages(["bnpo"], batch_of([1, 0, 0, 0, 1, 1, 1, 0], [0] * 4 + [1] * 4))
    torch.testing.assert_close(signed, binary)
    with pytest.raises(ConfigError, match="reward_max"):
        Composition([{"bnpo": {"reward_min": 1.0, "reward_max": 1.0}}])


def test_nan_rewards_are_refused():
    with pytest.raises(BatchError, match="NaN"):
        advantages(["bnpo"], batch_of([1.0, float("nan"), 0.0, 1.0], [0, 0, 1, 1]))


def test_advantage_decomposition_averages_per_component_advantages():
    # accuracy: p = .25, .75 (card: alpha = beta = 7/6); format: [1,1,0,0] and [1,0,0,0] -> p = .5, .25
    acc = [1, 0, 0, 0, 1, 1, 1, 0]
    fmt = [1, 1, 0, 0, 1, 0, 0, 0]
    ids = [0] * 4 + [1] * 4
    batch = batch_of([a + f for a, f in zip(acc, fmt)], ids, components=[[a, f] for a, f in zip(acc, fmt)])
    adv = advantages([{"bnpo": {"decompose": True}}], batch)
    a_acc = advantages(["bnpo"], batch_of(acc, ids))
    a_fmt = advantages(["bnpo"], batch_of(fmt, ids))
    torch.testing.assert_close(adv, (a_acc + a_fmt) / 2)
    # the format component by hand: rates .5, .25: m = .375, v = .03125, k = 6.5
    k = 0.375 * 0.625 / 0.03125 - 1
    a, b = 1 + k * 0.375 / 3, 1 + k * 0.625 / 3
    assert a_fmt[0].item() == pytest.approx(0.5 / beta_pdf_by_hand(0.5, a, b), abs=1e-5)


def test_decomposition_leaves_a_component_that_did_not_apply_out():
    nan = float("nan")
    # one group: r1 applies to rows 2, 3 only ([1, 0]: p = .5) and r2 = [1, 1, 0, 0] (p = .5); one prompt, so
    # m = 0, v = 1 and the weight is 1. A^(1) = [0, 0, .5, -.5] (rows 0, 1 get no r1 term, not s - p = -.25),
    # A^(2) = [.5, .5, -.5, -.5]; averaged: [.25, .25, 0, -.5]
    batch = batch_of([1, 1, 1, 0], [0] * 4, components=[[nan, 1], [nan, 1], [1, 0], [0, 0]])
    assert advantages([{"bnpo": {"decompose": True}}], batch).tolist() == [0.25, 0.25, 0.0, -0.5]
    # r1 applies to groups 0 and 1 only (the card's [1,0,0,0] and [1,1,1,0]): group 2 has no rate and stays out of
    # the Beta fit, so r1 keeps the card's alpha = beta = 7/6; r2 = 1 everywhere gives 0. A = A^(1) / 2
    r1 = [1, 0, 0, 0, 1, 1, 1, 0, nan, nan]
    batch = batch_of([1] * 10, [0] * 4 + [1] * 4 + [2] * 2, components=[[r, 1] for r in r1])
    card = [0.717, -0.239, -0.239, -0.239, 0.239, 0.239, 0.239, -0.717]
    adv = advantages([{"bnpo": {"decompose": True}}], batch)
    assert adv.tolist() == pytest.approx([a / 2 for a in card] + [0.0, 0.0], abs=1e-3)


def test_metrics_log_alpha_beta():
    comp = Composition(["bnpo"])
    comp.run_advantage_stage(batch_of([1, 0, 0, 0, 1, 1, 1, 0], [0] * 4 + [1] * 4))
    metrics = comp.pop_metrics()
    assert metrics["plugins/bnpo/alpha"] == pytest.approx(7 / 6)
    assert metrics["plugins/bnpo/beta"] == pytest.approx(7 / 6)
