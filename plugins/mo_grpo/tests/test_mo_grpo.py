"""MO-GRPO: the card's worked example by hand, TRL's weighted-sum arithmetic, edge cases and metrics."""

from __future__ import annotations

import pytest
import torch

from grpo_plugins import Composition, CompositionError, GRPOBatch, ParallelContext
from grpo_plugins.testing import method_with
from grpo_plugins.errors import BatchError, ConfigError, PluginError
from grpo_plugin_mo_grpo import MOGRPO, global_correlation

CARD_SCORES = [[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
ASPECTS = ("safety", "helpfulness", "truthfulness")


def batch_of(scores, prompt_ids, names=ASPECTS, trainer_weights=None, lengths=None) -> GRPOBatch:
    comps = torch.tensor(scores, dtype=torch.float32)
    w = torch.ones(comps.shape[1]) if trainer_weights is None else torch.tensor(trainer_weights, dtype=torch.float32)
    n = comps.shape[0]
    lengths = torch.tensor(lengths or [3] * n)
    mask = (torch.arange(int(lengths.max())) < lengths[:, None]).float()
    return GRPOBatch(
        prompt_ids=torch.tensor(prompt_ids), rewards=(torch.nan_to_num(comps) * w).sum(1), reward_components=comps,
        reward_names=tuple(names), reward_weights=w, completion_mask=mask,
    )


def run(methods, batch):
    return Composition(methods, defaults={"grpo": {"epsilon": 1e-4}}).run_advantage_stage(batch)


def test_card_worked_example_equal_weights():
    out = run(["mo_grpo"], batch_of(CARD_SCORES, [1] * 4))
    assert out.rewards.tolist() == pytest.approx([0.5, 0.5, 1.0, 0.0], abs=1e-7)
    # mean 0.5, unbiased std sqrt(0.5 / 3) = 0.40825 -> A = [0, 0, 0.5, -0.5] / (0.40825 + 1e-4)
    assert out.advantages.tolist() == pytest.approx([0.0, 0.0, 1.2244, -1.2244], abs=1e-4)


def test_card_weights_make_the_safer_answer_win():
    out = run([{"mo_grpo": {"weights": [2, 1, 1]}}], batch_of(CARD_SCORES, [1] * 4))
    assert out.rewards.tolist() == pytest.approx([0.625, 0.375, 1.0, 0.0], abs=1e-7)
    assert out.advantages[0] > out.advantages[1]
    # the property that sets it apart from GRPO on the unweighted sum: there answers 1 and 2 tie
    plain = run([], batch_of(CARD_SCORES, [1] * 4))
    assert plain.advantages[0] == plain.advantages[1]
    raw = run([{"mo_grpo": {"weights": [2, 1, 1], "normalize_weights": False}}], batch_of(CARD_SCORES, [1] * 4))
    assert raw.rewards.tolist() == pytest.approx([2.5, 1.5, 4.0, 0.0])


def test_equals_trl_weighted_sum_arithmetic_exactly():
    """TRL sums its reward functions as (rewards_per_func * reward_weights).nansum(dim=1); with the
    normalised weights as TRL's reward_weights the two rewards are bit-identical."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(64, 3, generator=gen)
    ids = torch.arange(64) // 8
    batch = batch_of(scores.tolist(), ids.tolist())
    out = run([{"mo_grpo": {"weights": [3, 1, 4]}}], batch)
    trl_weights = torch.tensor([3.0, 1.0, 4.0]) / 8.0
    trl_rewards = (scores * trl_weights.unsqueeze(0)).nansum(dim=1)
    assert torch.equal(out.rewards, trl_rewards)


def test_named_aspects_uneven_shuffled_groups_and_clipping():
    # components (format, harm, help); aspects (help, harm) weights (3, 1) -> 0.75 help + 0.25 harm
    names = ("format", "harm", "help")
    scores = [[1, 0.2, 1.4], [0, 1.0, 0.0], [1, -0.5, 0.5], [1, 0.0, 1.0], [0, 0.4, 0.8]]
    ids = [4, 9, 4, 4, 9]
    conf = {"aspects": ["help", "harm"], "weights": [3, 1], "clip_range": [0, 1], "other_rewards": "ignore"}
    out = run([{"mo_grpo": conf}], batch_of(scores, ids, names))
    # clipped (help, harm): (1, .2) (0, 1) (.5, 0) (1, 0) (.8, .4)
    assert out.rewards.tolist() == pytest.approx([0.8, 0.25, 0.375, 0.75, 0.7], abs=1e-6)
    # group 4: [0.8, 0.375, 0.75], group 9: [0.25, 0.7] -> +-0.7071
    assert out.advantages[[1, 4]].tolist() == pytest.approx([-0.7070, 0.7070], abs=1e-3)
    g4 = torch.tensor([0.8, 0.375, 0.75], dtype=torch.float64)
    assert out.advantages[[0, 2, 3]].tolist() == pytest.approx(((g4 - g4.mean()) / (g4.std() + 1e-4)).tolist(), abs=1e-5)
    # shared with later estimators: the aspects' normalised weights, 0 for the ignored component, clipped scores
    assert out.reward_weights.tolist() == [0.0, 0.25, 0.75]
    assert out.reward_components[2].tolist() == [1.0, 0.0, 0.5]


def test_other_rewards_policies():
    names = ("safety", "format")
    scores = [[1, 1], [0, 1], [1, 0], [0.5, 0]]
    with pytest.raises(PluginError, match=r"also has reward\(s\) \['format'\]"):
        run([{"mo_grpo": {"aspects": ["safety"]}}], batch_of(scores, [1] * 4, names))
    added = run([{"mo_grpo": {"aspects": ["safety"], "other_rewards": "add"}}],
                batch_of(scores, [1] * 4, names, trainer_weights=[1.0, 0.5]))
    assert added.rewards.tolist() == [1.5, 0.5, 1.0, 0.5]
    assert added.reward_weights.tolist() == [1.0, 0.5]


def test_missing_aspect_and_weight_mismatch_are_clear_errors():
    with pytest.raises(PluginError, match=r"mo_grpo reads the aspect score\(s\) \['honesty'\].*Add a reward function"):
        run([{"mo_grpo": {"aspects": ["safety", "honesty"]}}], batch_of(CARD_SCORES, [1] * 4))
    with pytest.raises(PluginError, match=r"2 weights .* for the 3 reward components"):
        run([{"mo_grpo": {"weights": [1, 1]}}], batch_of(CARD_SCORES, [1] * 4))
    lonely = GRPOBatch(prompt_ids=torch.tensor([1, 1]), rewards=torch.tensor([1.0, 0.0]))
    with pytest.raises(PluginError, match="no reward components"):
        run(["mo_grpo"], lonely)


def test_missing_scores_error_or_zero_and_nan_rewards():
    nan = float("nan")
    scores = [[1, nan, 0.5], [0, 1, 0.5], [1, 1, 1], [0, 0, 0]]
    with pytest.raises(PluginError, match=r"\['helpfulness'\] are missing.*\[0\].*missing_score='zero'"):
        run(["mo_grpo"], batch_of(scores, [1] * 4))
    zero = run([{"mo_grpo": {"missing_score": "zero"}}], batch_of(scores, [1] * 4))
    assert zero.rewards.tolist() == pytest.approx([0.5, 0.5, 1.0, 0.0])
    bad = batch_of(CARD_SCORES, [1] * 4)
    bad.rewards = torch.tensor([nan, 0.0, 1.0, 0.0])
    with pytest.raises(BatchError, match="NaN"):
        run(["mo_grpo"], bad)


def test_constant_groups_zero_and_group_of_one():
    out = run(["mo_grpo"], batch_of([[0.3, 0.7, 0.1]] * 3 + [[1e5, 2e5, 3e5]] * 2, [1, 1, 1, 2, 2]))
    assert out.advantages.tolist() == [0.0] * 5
    shaped = MOGRPO().shape_rewards(batch=batch_of([[1, 0, 0.5], [0, 1, 1]], [1, 2]))
    assert shaped.tolist() == pytest.approx([0.5, 2 / 3])
    with pytest.raises(PluginError, match="at least 2 completions"):
        run(["mo_grpo"], batch_of([[1, 0, 0.5], [0, 1, 1]], [1, 2]))


def test_observe_logs_per_aspect_means_and_advantage_correlation():
    comp = Composition(["mo_grpo"], defaults={"grpo": {"epsilon": 1e-4}})
    batch = comp.run_advantage_stage(batch_of(CARD_SCORES, [1] * 4))
    metrics = comp.pop_metrics()
    assert metrics["plugins/mo_grpo/mean_safety"] == 0.5
    assert metrics["plugins/mo_grpo/mean_truthfulness"] == 0.5
    comp.run_observe(batch, step=1)
    metrics = comp.pop_metrics()
    # A = [0, 0, a, -a]: corr(safety [1, 0, 1, 0]) = (a / 4) / (0.5 * a sqrt(1/2)) = 0.7071; truthfulness is
    # an exact affine map of A's order here -> 1
    assert metrics["plugins/mo_grpo/adv_corr_safety"] == pytest.approx(0.7071, abs=1e-4)
    assert metrics["plugins/mo_grpo/adv_corr_helpfulness"] == pytest.approx(0.7071, abs=1e-4)
    assert metrics["plugins/mo_grpo/adv_corr_truthfulness"] == pytest.approx(1.0, abs=1e-5)


def test_correlation_ignores_nan_in_padding_of_per_token_advantages():
    batch = batch_of(CARD_SCORES, [1] * 4, lengths=[1, 2, 3, 2])
    per_token = torch.tensor([[0.0], [0.0], [1.0], [-1.0]]).expand(4, 3).clone()
    batch.advantages = torch.where(batch.completion_mask > 0, per_token, torch.full_like(per_token, float("nan")))
    method = MOGRPO()
    method.observe(batch=batch)
    assert method.pop_metrics()["adv_corr_truthfulness"] == pytest.approx(1.0, abs=1e-5)
    # no spread -> 0, not NaN
    flat = global_correlation(torch.ones(4, 2), torch.tensor([1.0, 2, 3, 4]), ParallelContext())
    assert flat.tolist() == [0.0, 0.0]


def test_config_domains():
    with pytest.raises(ConfigError, match="weights"):
        Composition([{"mo_grpo": {"weights": [1, -1, 1]}}])
    with pytest.raises(ConfigError, match="one entry per aspect"):
        Composition([{"mo_grpo": {"aspects": ["a", "b"], "weights": [1]}}])
    with pytest.raises(ConfigError, match="positive sum"):
        Composition([{"mo_grpo": {"weights": [0, 0]}}])
    with pytest.raises(ConfigError, match="low < high"):
        Composition([{"mo_grpo": {"clip_range": [1, 0]}}])


def test_a_reward_shaper_listed_before_it_is_refused_at_start_up():
    """It rebuilds the reward from the components: an earlier shaping would be lost (Needs.runs_first)."""
    shaper = method_with("earlier_shaper", shape_rewards=lambda rewards: rewards + 1)
    with pytest.raises(CompositionError, match=r"'mo_grpo' must run first among the methods implementing hook "
                                               r"'shape_rewards'.*method 'earlier_shaper' is listed before it"):
        Composition([shaper, "mo_grpo"])
    assert Composition(["mo_grpo", shaper]).providers("shape_rewards") == ["mo_grpo", "earlier_shaper"]
