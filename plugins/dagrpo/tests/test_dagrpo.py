"""DaGRPO: the card's worked example by hand, the tau = 0 cross-check against GRPO, anchors injected into
failed groups, edge cases (constant groups at any scale, groups of one, uneven groups, unscored rows,
NaN rewards) and the contrast with GRPO (torch and the core only; real TRL runs:
tests/integration/test_dagrpo_trl.py)."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_plugins import Composition, GRPOBatch, PluginError
from grpo_plugins.injection import INJECTED_KEY, append_rows, kind_code, parse_rows
from grpo_plugins.testing import make_batch
from grpo_plugin_dagrpo import DaGRPO, pair_masked_advantages

CARD_R = [1.0, 0.0, 0.0, 1.0]
CARD_S = [0.55, 0.10, 0.50, 0.90]


def scored_batch(rewards, scores, prompt_ids=None, solutions=True) -> GRPOBatch:
    rewards = torch.tensor(rewards)
    scores = torch.tensor(scores)
    prompt_ids = torch.zeros(len(rewards), dtype=torch.long) if prompt_ids is None else torch.tensor(prompt_ids)
    return GRPOBatch(prompt_ids=prompt_ids, rewards=rewards, reward_components=torch.stack([rewards, scores], 1),
                     reward_names=("accuracy", "judge"), reward_weights=torch.tensor([1.0, 0.0]),
                     rows=[{"solution": f"reference {int(p)}"} if solutions else {} for p in prompt_ids])


def advantages(batch: GRPOBatch, **config) -> torch.Tensor:
    config = {"score": "judge", **config}
    return Composition([{"dagrpo": config}]).run_advantage_stage(batch).advantages


def test_card_worked_example():
    """G = 4, r = [1, 0, 0, 1], s = [.55, .10, .50, .90], tau = .1: pair (0, 2) masked; before std scaling
    A = [.5, -.667, -.5, .667] (GRPO: [.5, -.5, -.5, .5])."""
    adv = advantages(scored_batch(CARD_R, CARD_S), tau=0.1)
    std = 0.5  # population std of r
    assert (adv * (std + 1e-6)).tolist() == pytest.approx([0.5, -2 / 3, -0.5, 2 / 3], abs=1e-6)
    centred = torch.tensor(CARD_R) - 0.5
    assert centred.tolist() == [0.5, -0.5, -0.5, 0.5]  # plain GRPO's centred rewards, same scale


def test_masked_pair_metric():
    composition = Composition([{"dagrpo": {"score": "judge"}}])
    composition.run_advantage_stage(scored_batch(CARD_R, CARD_S))
    metrics = composition.method("dagrpo").pop_metrics()
    assert metrics["masked_pair_fraction"] == pytest.approx(1 / 6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tau_zero_is_grpo_times_g_over_g_minus_one(seed):
    """Cross-check: with tau = 0 every pair counts and A = G/(G-1) * GRPO's advantage (same std and eps)."""
    batch = make_batch(group_sizes=(3, 5, 2, 4, 6), seed=seed, rewards=None, num_components=2)
    gen = torch.Generator().manual_seed(seed)
    batch.rewards = torch.rand(batch.num_completions, generator=gen)
    grpo = Composition([]).run_advantage_stage(make_copy(batch)).advantages
    dagrpo = Composition([{"dagrpo": {"tau": 0.0, "score": "reward_1", "std": "unbiased", "anchor_column": ""}}]
                         ).run_advantage_stage(make_copy(batch)).advantages
    size = batch.group_sizes.index_select(0, batch.group_index).float()
    assert torch.allclose(dagrpo, grpo * size / (size - 1), atol=1e-5)


def make_copy(batch: GRPOBatch) -> GRPOBatch:
    import dataclasses

    return dataclasses.replace(batch, rewards=batch.rewards.clone(), row_data={})


@pytest.mark.parametrize("scale", [1.0, 0.1, 1e4])
def test_constant_groups_get_exactly_zero_at_any_scale(scale):
    batch = scored_batch([0.3 * scale] * 3 + [scale, 0.0], [0.2, 0.9, 0.5, 0.1, 0.7], prompt_ids=[0, 0, 0, 1, 1])
    adv = advantages(batch, tau=0.0)
    assert adv[:3].tolist() == [0.0, 0.0, 0.0] and adv[3] > 0 > adv[4]


def test_groups_of_one_and_uneven_groups():
    batch = scored_batch([1.0, 0.0, 1.0, 0.0, 0.0], [0.9, 0.1, 0.5, 0.5, 0.2], prompt_ids=[3, 5, 5, 7, 7])
    adv = advantages(batch, tau=0.1)
    assert adv[0] == 0.0  # a group of one has no pair
    assert adv[1] < 0 < adv[2]
    assert adv[3:].tolist() == [0.0, 0.0]  # constant group


def test_a_response_whose_every_partner_is_indistinguishable_gets_zero():
    batch = scored_batch([1.0, 0.0, 0.0, 1.0], [0.50, 0.52, 0.90, 0.95])
    adv = advantages(batch, tau=0.1)
    # row 0 (s=.50) is close only to row 1; row 1 is close to row 0 only; rows 2 and 3 are close to each other
    assert adv.tolist() == pytest.approx([(1 * 1 + 0) / 2 / 0.500001, -1 / 2 / 0.500001, -1 / 2 / 0.500001,
                                          (0 + 1) / 2 / 0.500001], rel=1e-6)
    batch = scored_batch([1.0, 0.0, 1.0], [0.5, 0.55, 0.52])
    assert advantages(batch, tau=0.1).tolist() == [0.0, 0.0, 0.0]  # no distinct pair at all


def test_unscored_rows_keep_their_pairs():
    rewards = torch.tensor([1.0, 0.0, 0.0])
    scores = torch.tensor([0.5, math.nan, 0.5])
    adv, masked = pair_masked_advantages(rewards, scores, torch.zeros(3, dtype=torch.long), 1, 0.1, 1e-6)
    std = float(rewards.std(unbiased=False))
    assert adv.tolist() == pytest.approx([1.0 / (std + 1e-6), -0.5 / (std + 1e-6), 0.0], rel=1e-6)
    assert masked.tolist() == [1]


def test_anchor_injected_into_failed_groups_only():
    composition = Composition([{"dagrpo": {"score": "judge"}}])
    batch = scored_batch([0.0, 0.0, 0.0, 1.0, 0.0], [0.1, 0.15, 0.3, 0.9, 0.1], prompt_ids=[4, 4, 4, 6, 6])
    rows = composition.run_inject_rows(batch)
    assert rows == [{"prompt_id": 4, "completion": "reference 4", "kind": "anchor", "reward": 1.0}]
    assert Composition([]).run_advantage_stage(make_copy(batch)).advantages[:3].eq(0).all()  # GRPO: nothing to learn
    extended = append_rows(batch, parse_rows(rows, batch.prompt_ids, ["dagrpo"]), [[7, 8, 9]])
    extended = composition.run_advantage_stage(extended)
    anchor = extended.row_data[INJECTED_KEY] == kind_code("anchor")
    assert anchor.tolist() == [False] * 5 + [True] and extended.rewards[-1] == 1.0
    adv = extended.advantages
    group = extended.prompt_ids == 4
    std = float(torch.tensor([0.0, 0.0, 0.0, 1.0]).std(unbiased=False))
    # the anchor has no score (its components are NaN): every pair with it counts; pair (0, 1) is masked
    # (|.10 - .15| < .1), so rows 0 and 1 each keep the pair with row 2 (r difference 0) and the anchor (-1)
    assert adv[-1] == pytest.approx(1.0 / (std + 1e-6))
    assert adv[:3].tolist() == pytest.approx([-1 / 2 / (std + 1e-6), -1 / 2 / (std + 1e-6), -1 / 3 / (std + 1e-6)])
    assert adv[group & ~anchor].lt(0).all()


def test_anchors_off_and_missing_solutions():
    batch = scored_batch([0.0, 0.0], [0.1, 0.9], prompt_ids=[1, 1], solutions=False)
    without = Composition([{"dagrpo": {"anchor_column": ""}}])
    assert without.run_inject_rows(batch) == [] and without.providers("inject_rows") == []
    assert "row_injection" not in without.needs()["dagrpo"].features  # the estimator alone runs on every trainer
    assert "row_injection" in Composition(["dagrpo"]).needs()["dagrpo"].features
    with pytest.raises(PluginError, match="dagrpo: prompt id 1 has no positive response.*'solution'"):
        Composition(["dagrpo"]).run_inject_rows(batch)


def test_unknown_score_component_and_nan_rewards_are_clear_errors():
    with pytest.raises(PluginError, match="score='quality' is not a reward component"):
        advantages(scored_batch(CARD_R, CARD_S), score="quality")
    batch = scored_batch(CARD_R, CARD_S)
    batch.rewards[1] = math.nan
    with pytest.raises(Exception, match="NaN|finite"):
        advantages(batch)


def test_config_cross_field_check():
    with pytest.raises(Exception, match="anchor_reward"):
        Composition([{"dagrpo": {"anchor_reward": 0.0}}])
    assert DaGRPO().config.tau == 0.1


def test_default_score_is_the_reward():
    """score='': s = r, so only pairs with different rewards count and every correct response gets +1/std."""
    adv = Composition([{"dagrpo": {"anchor_column": ""}}]).run_advantage_stage(scored_batch(CARD_R, CARD_S)).advantages
    assert adv.tolist() == pytest.approx([1 / 0.500001, -1 / 0.500001, -1 / 0.500001, 1 / 0.500001], rel=1e-6)
