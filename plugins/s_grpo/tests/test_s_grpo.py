"""S-GRPO: the card's worked example by hand, the suggestion gate, TRL's weighted-sum arithmetic, edge cases."""

from __future__ import annotations

import pytest
import torch

from grpo_plugins import Composition, CompositionError, GRPOBatch
from grpo_plugins.testing import method_with
from grpo_plugins.errors import BatchError, ConfigError, PluginError
from grpo_plugin_s_grpo import SGRPO

NAN = float("nan")


def batch_of(fmt, acc, sugg, labels, prompt_ids, extra: dict | None = None) -> GRPOBatch:
    columns = {"format": fmt, "accuracy": acc, "suggestion": sugg, **(extra or {})}
    comps = torch.tensor(list(zip(*columns.values())), dtype=torch.float32)
    n = comps.shape[0]
    return GRPOBatch(
        prompt_ids=torch.tensor(prompt_ids), rewards=torch.nan_to_num(comps).sum(1), reward_components=comps,
        reward_names=tuple(columns), reward_weights=torch.ones(comps.shape[1]),
        completion_mask=torch.ones(n, 3), rows=[{"label": label, "prompt": "p"} for label in labels],
    )


def run(methods, batch):
    return Composition(methods, defaults={"grpo": {"epsilon": 1e-4}}).run_advantage_stage(batch)


def card_batch():
    # a wrong action (label 0): format+accuracy+right suggestion, format+accuracy+bad suggestion, format only, nothing
    return batch_of([1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1] * 4)


def test_card_worked_example():
    out = run(["s_grpo"], card_batch())
    assert out.rewards.tolist() == [3.0, 2.0, 1.0, 0.0]
    # mean 1.5, unbiased std sqrt(5 / 3) = 1.291 -> A = [1.5, 0.5, -0.5, -1.5] / 1.2911
    assert out.advantages.tolist() == pytest.approx([1.1618, 0.3873, -0.3873, -1.1618], abs=1e-3)


def test_suggestion_counts_only_for_wrong_actions():
    # a correct action (label 1): a "matching" suggestion earns nothing -> maximum 2
    out = run(["s_grpo"], batch_of([1, 1, 0], [1, 1, 1], [1, 0, 1], [1, 1, 1], [2] * 3))
    assert out.rewards.tolist() == [2.0, 2.0, 1.0]
    # property vs GRPO on the plain sum of the three functions: there the spurious suggestion breaks the tie
    plain = run([], batch_of([1, 1, 0], [1, 1, 1], [1, 0, 1], [1, 1, 1], [2] * 3))
    assert plain.advantages[0] > plain.advantages[1]
    assert out.advantages[0] == out.advantages[1]


def test_trusting_the_suggestion_reward_and_nan_as_not_applicable():
    batch = batch_of([1, 1, 1, 1], [1, 0, 1, 0], [NAN, 1, NAN, 0], [1, 0, 1, 0], [4] * 4)
    trusted = run([{"s_grpo": {"label_column": ""}}], batch)
    assert trusted.rewards.tolist() == [2.0, 2.0, 2.0, 1.0]


def test_equals_trl_weighted_sum_arithmetic_exactly():
    """TRL sums (rewards_per_func * reward_weights).nansum(dim=1); with the suggestion reward 0 (or None) for
    correct actions, S-GRPO's reward is bit-identical."""
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 2, (48,), generator=gen)
    fmt, acc = torch.randint(0, 2, (2, 48), generator=gen).float()
    sugg = torch.where(labels == 1, torch.full((48,), NAN), torch.randint(0, 2, (48,), generator=gen).float())
    weights = (0.5, 2.0, 1.5)
    batch = batch_of(fmt.tolist(), acc.tolist(), sugg.tolist(), labels.tolist(), (torch.arange(48) // 6).tolist())
    out = run([{"s_grpo": dict(zip(("format_weight", "accuracy_weight", "suggestion_weight"), weights))}], batch)
    trl = (torch.stack([fmt, acc, sugg], 1) * torch.tensor(weights).unsqueeze(0)).nansum(dim=1)
    assert torch.equal(out.rewards, trl)


def test_the_trainer_reward_weights_are_used_by_default():
    # trainer weights (0.5, 2, 1.5), wrong action: [1,1,1] -> 0.5+2+1.5 = 4, [1,1,0] -> 2.5, [1,0,NaN] -> 0.5, 0
    batch = batch_of([1, 1, 1, 0], [1, 1, 0, 0], [1, 0, NAN, 0], [0, 0, 0, 0], [1] * 4)
    batch.reward_weights = torch.tensor([0.5, 2.0, 1.5])
    out = run(["s_grpo"], batch)
    assert out.rewards.tolist() == [4.0, 2.5, 0.5, 0.0]
    assert out.reward_weights.tolist() == [0.5, 2.0, 1.5]
    # a config weight agreeing with the trainer's, or replacing a trainer weight of 1, is used
    batch.reward_weights = torch.tensor([0.5, 1.0, 1.5])
    out = run([{"s_grpo": {"format_weight": 0.5, "accuracy_weight": 3.0}}], batch)
    assert out.rewards.tolist() == [5.0, 3.5, 0.5, 0.0]
    assert out.reward_weights.tolist() == [0.5, 3.0, 1.5]


def test_a_config_weight_disagreeing_with_the_trainer_is_refused():
    batch = card_batch()
    batch.reward_weights = torch.tensor([1.0, 2.0, 1.0])
    with pytest.raises(PluginError, match=r"s_grpo: accuracy_weight=3, but the trainer weighs the reward 'accuracy' "
                                          r"by 2; .*leave accuracy_weight unset"):
        run([{"s_grpo": {"accuracy_weight": 3.0}}], batch)


def test_uneven_shuffled_groups_hand_numbers():
    # prompt 6 (wrong action, size 3): R = [1+1+1, 1+0+0, 0+1+0] = [3, 1, 1]; prompt 2 (right action, size 2):
    # R = [1+1+0 (suggestion gated), 1+0] = [2, 1]
    fmt, acc, sugg = [1, 1, 0, 1, 1], [1, 0, 1, 1, 0], [1, 0, 0, 1, 0]
    labels, ids = [0, 0, 0, 1, 1], [6, 6, 6, 2, 2]
    order = [3, 0, 4, 2, 1]
    pick = lambda xs: [xs[i] for i in order]  # noqa: E731
    out = run(["s_grpo"], batch_of(pick(fmt), pick(acc), pick(sugg), pick(labels), pick(ids)))
    assert out.rewards.tolist() == pick([3.0, 1.0, 1.0, 2.0, 1.0])
    # prompt 6: mean 5/3, std 1.1547 -> [1.1547, -0.5773, -0.5773]; prompt 2: +-0.7071
    assert out.advantages.tolist() == pytest.approx(pick([1.1546, -0.5773, -0.5773, 0.7070, -0.7070]), abs=1e-3)


def test_shared_weights_and_gated_components():
    out = run([{"s_grpo": {"suggestion_weight": 2.0}}], batch_of([1, 0], [1, 1], [1, 1], [1, 0], [3, 3]))
    assert out.reward_weights.tolist() == [1.0, 1.0, 2.0]
    assert out.reward_components[:, 2].tolist() == [0.0, 1.0]  # the correct action's suggestion is gated off
    assert out.rewards.tolist() == [2.0, 3.0]


def test_constant_groups_zero_and_group_of_one():
    out = run(["s_grpo"], batch_of([1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 1], [1, 1, 1, 2, 2]))
    assert out.advantages.tolist() == [0.0] * 5
    assert SGRPO().shape_rewards(batch=batch_of([1], [1], [1], [0], [9])).tolist() == [3.0]
    with pytest.raises(PluginError, match="at least 2 completions"):
        run(["s_grpo"], batch_of([1, 1], [1, 1], [1, 1], [0, 0], [1, 2]))


def test_nan_in_padding_is_ignored():
    clean = card_batch()
    padded = card_batch()
    padded.completion_mask = torch.tensor([[1.0, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]])
    padded.old_log_probs = torch.where(padded.completion_mask > 0, torch.zeros(4, 3), torch.full((4, 3), NAN))
    assert torch.equal(run(["s_grpo"], clean).advantages, run(["s_grpo"], padded).advantages)


def test_missing_inputs_are_clear_errors():
    batch = card_batch()
    batch.reward_names = ("format", "accuracy", "match")
    with pytest.raises(PluginError, match=r"s_grpo reads the reward 'suggestion'.*reward function named 'suggestion'"):
        run(["s_grpo"], batch)
    nolabel = card_batch()
    nolabel.rows = [{"prompt": "p"}] * 4
    with pytest.raises(PluginError, match=r"gold label column 'label'.*\['prompt'\].*label_column=''"):
        run(["s_grpo"], nolabel)
    norows = card_batch()
    norows.rows = None
    with pytest.raises(PluginError, match="no dataset rows"):
        run(["s_grpo"], norows)
    with pytest.raises(PluginError, match=r"s_grpo: the gold labels in 'label' \(config 'label_column'\) must be 0 or 1.*got 2$"):
        run(["s_grpo"], batch_of([1, 1], [1, 0], [0, 0], [2, 1], [1, 1]))
    for label in (None, "wrong"):  # not numbers: the same message, not a bare TypeError / ValueError of float()
        with pytest.raises(PluginError, match=rf"s_grpo: the gold labels in 'label' .*must be 0 or 1.*got {label!r}$"):
            run(["s_grpo"], batch_of([1, 1], [1, 0], [0, 0], [label, 0], [1, 1]))
    with pytest.raises(PluginError, match=r"'accuracy'.*missing.*\[0\]"):
        run(["s_grpo"], batch_of([1, 1], [NAN, 0], [0, 0], [0, 0], [1, 1]))
    bad = card_batch()
    bad.rewards = torch.tensor([NAN, 0.0, 1.0, 0.0])
    with pytest.raises(BatchError, match="NaN"):
        run(["s_grpo"], bad)


def test_other_rewards_and_metrics():
    extra = {"length": [0.5, 0.0, 0.0, 0.0]}
    with pytest.raises(PluginError, match=r"also has reward\(s\) \['length'\]"):
        run(["s_grpo"], batch_of([1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1] * 4, extra))
    comp = Composition([{"s_grpo": {"other_rewards": "add"}}])
    out = comp.run_advantage_stage(batch_of([1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1] * 4, extra))
    assert out.rewards.tolist() == [3.5, 2.0, 1.0, 0.0]
    metrics = comp.pop_metrics()
    assert metrics["plugins/s_grpo/critic_accuracy"] == 0.5
    assert metrics["plugins/s_grpo/suggestion_accuracy"] == 0.25
    assert metrics["plugins/s_grpo/format_rate"] == 0.75


def test_config_domains():
    with pytest.raises(ConfigError, match="suggestion_weight"):
        Composition([{"s_grpo": {"suggestion_weight": -1.0}}])
    with pytest.raises(ConfigError, match="three distinct names"):
        Composition([{"s_grpo": {"suggestion_reward": "format"}}])
    assert SGRPO(SGRPO.Config(label_column="")).requires() == set()
    assert SGRPO().requires() == {"rows"}


def test_a_reward_shaper_listed_before_it_is_refused_at_start_up():
    """It rebuilds the reward from the components: an earlier shaping would be lost (Needs.runs_first)."""
    shaper = method_with("earlier_shaper", shape_rewards=lambda rewards: rewards + 1)
    with pytest.raises(CompositionError, match=r"'s_grpo' must run first among the methods implementing hook "
                                               r"'shape_rewards'.*method 'earlier_shaper' is listed before it"):
        Composition([shaper, "s_grpo"])
    assert Composition(["s_grpo", shaper]).providers("shape_rewards") == ["s_grpo", "earlier_shaper"]
