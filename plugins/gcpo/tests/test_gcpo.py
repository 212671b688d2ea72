"""GCPO: the card's worked example by hand, the contrastive mask's cases, edge cases, and GRPO on the shaped reward."""

from __future__ import annotations

import pytest
import torch

from grpo_plugins import Composition, CompositionError, GRPOBatch
from grpo_plugins.testing import method_with
from grpo_plugins.errors import BatchError, ConfigError, PluginError
from grpo_plugin_gcpo import GCPO, GCPOConfig, contrastive_mask

NAMES = ("accuracy", "format", "aux")


def batch_of(components: dict, lengths, prompt_ids, width=None) -> GRPOBatch:
    """A batch whose reward components are ``components`` (name -> N values) and whose completions have ``lengths``."""
    comps = torch.tensor(list(zip(*components.values())), dtype=torch.float32)
    lengths = torch.tensor(lengths)
    width = int(lengths.max()) if width is None else width
    mask = (torch.arange(width) < lengths[:, None]).float()
    return GRPOBatch(
        prompt_ids=torch.tensor(prompt_ids),
        rewards=torch.nan_to_num(comps).sum(1),
        reward_components=comps,
        reward_names=tuple(components),
        reward_weights=torch.ones(comps.shape[1]),
        completion_ids=torch.ones(len(lengths), width, dtype=torch.long) * mask.long(),
        completion_mask=mask,
    )


def run(methods, batch):
    return Composition(methods, defaults={"grpo": {"epsilon": 1e-4}}).run_advantage_stage(batch)


def card_batch(prompt_ids=(7, 7, 7, 7)):
    return batch_of(
        {"accuracy": [1, 1, 0, 0], "format": [1, 1, 1, 1], "aux": [1, 1, 0, 1]}, [100, 200, 300, 400], list(prompt_ids)
    )


def grpo_by_hand(rewards: list[float], epsilon=1e-4) -> torch.Tensor:
    r = torch.tensor(rewards, dtype=torch.float64)
    return ((r - r.mean()) / (r.std() + epsilon)).float()


def test_card_worked_example():
    # acc_aux = 2/3 > acc_no = 0 -> m = +1; R = acc + fmt + aux + 0.5 * L / 400 * acc
    out = run(["gcpo"], card_batch())
    assert out.rewards.tolist() == pytest.approx([3.125, 3.25, 1.0, 2.0], abs=1e-6)
    # the same with L_target fixed at 400 tokens (the group's longest completion here)
    fixed = run([{"gcpo": {"target_length": 400}}], card_batch())
    assert fixed.rewards.tolist() == pytest.approx([3.125, 3.25, 1.0, 2.0], abs=1e-6)


def test_advantages_are_plain_grpo_of_the_shaped_reward():
    out = run(["gcpo"], card_batch())
    # mean 2.34375, unbiased std sqrt((0.78125^2 + 0.90625^2 + 1.34375^2 + 0.34375^2) / 3) = 1.05759
    torch.testing.assert_close(out.advantages, grpo_by_hand([3.125, 3.25, 1.0, 2.0]))
    assert out.advantages.tolist() == pytest.approx([0.7387, 0.8569, -1.2706, -0.3250], abs=1e-3)


def test_mask_charges_construction_where_it_hurts_and_ignores_one_sided_groups():
    acc = torch.tensor([0.0, 0, 1, 0, 1, 1, 0, 1, 1])
    aux = torch.tensor([1, 1, 0, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    index = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2])
    # group 0: acc_aux 0 < acc_no 0.5 -> -1; group 1: all construct -> 0; group 2: acc_aux 1 = acc_no 1 -> 0
    assert contrastive_mask(acc, aux, index, 3).tolist() == [-1.0, 0.0, 0.0]
    # eps: a gap of 0.5 within eps = 0.5 gives 0, above it the sign
    assert contrastive_mask(acc, aux, index, 3, margin=0.5).tolist() == [0.0, 0.0, 0.0]
    assert contrastive_mask(acc, aux, index, 3, margin=0.49).tolist() == [-1.0, 0.0, 0.0]


def test_hurting_group_hand_numbers_without_length_reward():
    batch = batch_of({"accuracy": [0, 0, 1, 0], "format": [1, 0, 1, 1], "aux": [1, 1, 0, 0]}, [3, 3, 3, 3], [1] * 4)
    out = run([{"gcpo": {"length_weight": 0.0}}], batch)
    # m = -1: R = acc + fmt - aux = [0, -1, 2, 1]
    assert out.rewards.tolist() == [0.0, -1.0, 2.0, 1.0]


def test_property_distinguishing_gcpo_from_grpo_with_an_aux_reward():
    """Where construction hurts, GRPO with an unconditional aux reward ranks a wrong constructing answer
    above a wrong plain one; GCPO ranks it below. Without any aux reward both tie."""
    comps = {"accuracy": [0, 0, 1, 0], "format": [1, 1, 1, 1], "aux": [1, 1, 0, 0]}
    gcpo = run([{"gcpo": {"length_weight": 0.0}}], batch_of(comps, [4] * 4, [3] * 4)).advantages
    grpo_aux = run([{"gcpo": {"length_weight": 0.0, "aux_mode": "unconditional"}}], batch_of(comps, [4] * 4, [3] * 4)).advantages
    no_aux = run([{"gcpo": {"length_weight": 0.0, "aux_mode": "none"}}], batch_of(comps, [4] * 4, [3] * 4)).advantages
    assert gcpo[0] < gcpo[3] and grpo_aux[0] > grpo_aux[3]
    assert no_aux[0] == no_aux[3]


def test_uneven_shuffled_groups_hand_numbers():
    # prompt 5 (size 3): acc [1, 0, 1], aux [1, 0, 0] -> acc_aux 1 > acc_no 0.5 -> +1; lengths 2, 4, 4 (max 4)
    #   R = [1 + 1 + 0.25, 0, 1 + 0.5] = [2.25, 0, 1.5]
    # prompt 9 (size 2): acc [0, 1], aux [1, 0] -> -1; lengths 1, 2 -> R = [-1, 1 + 0.5] = [-1, 1.5]
    acc, aux, lengths, ids = [1, 0, 1, 0, 1], [1, 0, 0, 1, 0], [2, 4, 4, 1, 2], [5, 5, 5, 9, 9]
    expected = [2.25, 0.0, 1.5, -1.0, 1.5]
    order = [3, 0, 4, 2, 1]
    pick = lambda xs: [xs[i] for i in order]  # noqa: E731
    batch = batch_of(
        {"accuracy": pick(acc), "format": [0] * 5, "aux": pick(aux)}, pick(lengths), pick(ids)
    )
    out = run(["gcpo"], batch)
    assert out.rewards.tolist() == pytest.approx(pick(expected), abs=1e-6)
    by_hand = {5: grpo_by_hand(expected[:3]), 9: grpo_by_hand(expected[3:])}
    want = [by_hand[ids[i]][[0, 1, 2, 0, 1][i]].item() for i in order]
    assert out.advantages.tolist() == pytest.approx(want, abs=1e-5)


def test_constant_groups_give_exactly_zero_advantage():
    # every completion correct, constructing, formatted and of equal length: R constant -> A = 0 exactly
    batch = batch_of({"accuracy": [1, 1, 1, 0, 0], "format": [1, 1, 1, 1, 1], "aux": [1, 1, 1, 0, 0]},
                     [7, 7, 7, 3, 5], [1, 1, 1, 2, 2])
    out = run(["gcpo"], batch)
    assert out.advantages[:3].tolist() == [0.0, 0.0, 0.0]
    assert out.advantages[3:].tolist() == [0.0, 0.0]  # wrong answers earn no length reward: constant too
    big = batch_of({"accuracy": [1e6] * 3, "format": [0.1] * 3, "aux": [1] * 3}, [5, 5, 5], [4, 4, 4])
    assert run(["gcpo"], big).advantages.tolist() == [0.0, 0.0, 0.0]


def test_group_of_one_and_empty_completion():
    # a group of one has one subset only -> m = 0; its length ratio is 1 (its own longest)
    batch = batch_of({"accuracy": [1, 0, 1], "format": [1, 1, 0], "aux": [1, 0, 0]}, [4, 0, 2], [1, 2, 2], width=4)
    shaped = GCPO().shape_rewards(batch=batch)
    # prompt 1: 1 + 1 + 0 + 0.5 = 2.5; prompt 2: m = 0 (no construction); the empty completion earns no length reward
    assert shaped.tolist() == [2.5, 1.0, 1.5]
    with pytest.raises(PluginError, match=r"at least 2 completions"):
        run(["gcpo"], batch)  # GRPO itself needs two completions per prompt


def test_nan_and_missing_rewards_are_clear_errors():
    nan = float("nan")
    batch = batch_of({"accuracy": [1, nan, 0, 0], "format": [1] * 4, "aux": [1, 1, 0, 1]}, [1, 2, 3, 4], [7] * 4)
    with pytest.raises(PluginError, match=r"gcpo.*'accuracy'.*missing.*\[1\]"):
        run(["gcpo"], batch)
    no_aux = batch_of({"accuracy": [1, 0], "format": [1, 1]}, [1, 2], [7, 7])
    with pytest.raises(PluginError, match=r"gcpo.*'aux'.*\['accuracy', 'format'\].*reward function named 'aux'"):
        run(["gcpo"], no_aux)
    bad = card_batch()
    bad.rewards = torch.tensor([1.0, nan, 0.0, 0.0])
    with pytest.raises(BatchError, match="NaN"):
        run(["gcpo"], bad)


def test_nan_in_padding_is_ignored():
    clean = card_batch()
    padded = card_batch()
    padded.old_log_probs = torch.where(padded.completion_mask > 0, torch.zeros(4, 400), torch.full((4, 400), float("nan")))
    assert torch.equal(run(["gcpo"], clean).advantages, run(["gcpo"], padded).advantages)


def test_other_reward_components():
    comps = {"accuracy": [1, 0, 1, 0], "format": [1, 1, 1, 1], "aux": [0, 0, 1, 1], "brevity": [0.5, 0.0, 0.0, 0.25]}
    with pytest.raises(PluginError, match=r"also has reward\(s\) \['brevity'\].*other_rewards='add'"):
        run(["gcpo"], batch_of(comps, [2] * 4, [1] * 4))
    batch = batch_of(comps, [2] * 4, [1] * 4)
    batch.reward_weights = torch.tensor([1.0, 1.0, 1.0, 2.0])
    added = run([{"gcpo": {"other_rewards": "add", "length_weight": 0.0}}], batch).rewards
    ignored = run([{"gcpo": {"other_rewards": "ignore", "length_weight": 0.0}}], batch_of(comps, [2] * 4, [1] * 4)).rewards
    # acc_aux 0.5 = acc_no 0.5 -> m = 0: R = acc + fmt (+ 2 x brevity)
    assert ignored.tolist() == [2.0, 1.0, 2.0, 1.0]
    assert added.tolist() == [3.0, 1.0, 2.0, 1.5]


def test_without_format_reward_and_metrics():
    comp = Composition([{"gcpo": {"format_reward": ""}}])
    batch = batch_of({"accuracy": [1, 1, 0, 0], "aux": [1, 1, 0, 1]}, [100, 200, 300, 400], [7] * 4)
    comp.run_advantage_stage(batch)
    assert batch.rewards.tolist() == pytest.approx([2.125, 2.25, 0.0, 1.0])
    metrics = comp.pop_metrics()
    assert metrics["plugins/gcpo/aux_rate"] == 0.75
    assert metrics["plugins/gcpo/groups_aux_helps"] == 1.0
    assert metrics["plugins/gcpo/groups_aux_hurts"] == 0.0


def test_config_domains_and_names():
    with pytest.raises(ConfigError, match="margin"):
        Composition([{"gcpo": {"margin": -0.1}}])
    with pytest.raises(ConfigError, match="must differ"):
        Composition([{"gcpo": {"format_reward": "accuracy"}}])
    with pytest.raises(ConfigError, match="aux_reward"):
        Composition([{"gcpo": {"aux_reward": ""}}])
    assert GCPOConfig(aux_reward="", aux_mode="none").aux_mode == "none"


def test_gdpo_is_refused_at_start_up():
    """GDPO would drop the shaped reward (contrastive mask, length reward): the run is refused, naming both."""
    from grpo_plugins.needs import relation_problems

    problems = relation_problems({"gcpo": GCPO().needs()}, ["gcpo", "gdpo"])
    assert len(problems) == 1
    assert "method 'gcpo' cannot run together with method 'gdpo'" in problems[0] and "shaped reward" in problems[0]
    assert relation_problems({"gcpo": GCPO().needs()}, ["gcpo", "grpo"]) == []


def test_a_reward_shaper_listed_before_it_is_refused_at_start_up():
    """It rebuilds the reward from the components: an earlier shaping would be lost (Needs.runs_first)."""
    shaper = method_with("earlier_shaper", shape_rewards=lambda rewards: rewards + 1)
    with pytest.raises(CompositionError, match=r"'gcpo' must run first among the methods implementing hook "
                                               r"'shape_rewards'.*method 'earlier_shaper' is listed before it"):
        Composition([shaper, "gcpo"])
    assert Composition(["gcpo", shaper]).providers("shape_rewards") == ["gcpo", "earlier_shaper"]
