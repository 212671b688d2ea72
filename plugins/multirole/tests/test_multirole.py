"""MultiRole-R1: the card's worked example by hand, distinct-n edge cases, GRPO on the shaped reward."""

from __future__ import annotations

import pytest
import torch

from grpo_plugins import Composition, CompositionError, GRPOBatch
from grpo_plugins.testing import method_with
from grpo_plugins.errors import BatchError, ConfigError, PluginError
from grpo_plugin_multirole import MultiRole, distinct_ngram_ratio

A, B, C, D = 11, 12, 13, 14  # token ids of the words "a", "b", "c", "d"
PAD = 0


def batch_of(texts, accuracy, roles, prompt_ids, extra: dict | None = None) -> GRPOBatch:
    """Completions given as token-id lists (right-padded), with accuracy and role-count components."""
    width = max(len(t) for t in texts)
    ids = torch.tensor([t + [PAD] * (width - len(t)) for t in texts])
    mask = torch.tensor([[1.0] * len(t) + [0.0] * (width - len(t)) for t in texts])
    columns = {"accuracy": accuracy, "roles": roles, **(extra or {})}
    comps = torch.tensor(list(zip(*columns.values())), dtype=torch.float32)
    return GRPOBatch(
        prompt_ids=torch.tensor(prompt_ids), rewards=torch.nan_to_num(comps).sum(1), reward_components=comps,
        reward_names=tuple(columns), reward_weights=torch.ones(comps.shape[1]), completion_ids=ids,
        completion_mask=mask,
    )


def run(methods, batch):
    return Composition(methods, defaults={"grpo": {"epsilon": 1e-4}}).run_advantage_stage(batch)


def test_card_worked_example():
    # "a b a b": bigrams ab, ba, ab -> D_lex = 2/3; roles {parent, teacher} -> D_per = 2/4; correct
    shaped = MultiRole().shape_rewards(batch=batch_of([[A, B, A, B]], [1.0], [2.0], [1]))
    assert shaped.tolist() == pytest.approx([1 + 0.5 * 0.5 + 0.5 * 2 / 3], abs=1e-6)
    assert shaped.item() == pytest.approx(1.583, abs=1e-3)


def test_distinct_ngrams_by_hand():
    ids = torch.tensor([[A, B, A, B], [A, A, A, A], [A, B, C, D], [A, 99, 99, 99], [99, 99, 99, 99]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float32)
    # bigrams: [ab ba ab] 2/3; [aa aa aa] 1/3; [ab bc cd] 1; one token -> no bigram -> 0; all masked -> 0
    assert distinct_ngram_ratio(ids, mask, 2).tolist() == pytest.approx([2 / 3, 1 / 3, 1.0, 0.0, 0.0])
    # unigrams: 2/4, 1/4, 4/4, 1/1, 0; trigrams: [aba bab] 1, [aaa aaa] 1/2, [abc bcd] 1, 0, 0
    assert distinct_ngram_ratio(ids, mask, 1).tolist() == pytest.approx([0.5, 0.25, 1.0, 1.0, 0.0])
    assert distinct_ngram_ratio(ids, mask, 3).tolist() == pytest.approx([1.0, 0.5, 1.0, 0.0, 0.0])
    # a hole in the mask: only windows of real tokens count ([a b] . [a b] -> ab, ab -> 1/2)
    holed = torch.tensor([[1, 1, 0, 1, 1]], dtype=torch.float32)
    assert distinct_ngram_ratio(torch.tensor([[A, B, C, A, B]]), holed, 2).tolist() == [0.5]
    # shorter than n over the whole width
    assert distinct_ngram_ratio(torch.tensor([[A]]), torch.ones(1, 1), 2).tolist() == [0.0]


def test_padding_content_is_ignored():
    clean = batch_of([[A, B, A, B], [A, B], [C, D, C]], [1, 0, 1], [1, 3, 0], [5, 5, 5])
    noisy = batch_of([[A, B, A, B], [A, B], [C, D, C]], [1, 0, 1], [1, 3, 0], [5, 5, 5])
    noisy.completion_ids = torch.where(noisy.completion_mask > 0, noisy.completion_ids, torch.full_like(noisy.completion_ids, 10**6))
    noisy.old_log_probs = torch.where(noisy.completion_mask > 0, torch.zeros(3, 4), torch.full((3, 4), float("nan")))
    assert torch.equal(run(["multirole"], clean).advantages, run(["multirole"], noisy).advantages)


def test_uneven_shuffled_groups_and_advantages_are_grpo_of_the_shaped_reward():
    # prompt 3: [a b c d] acc 1 roles 5 -> 1 + .5*1 + .5*1 = 2; [a a a] acc 0 roles 1 -> .125 + .25 = .375;
    #           [a b] acc 1 roles 0 -> 1 + .5 = 1.5
    # prompt 8: [a b a b] acc 0 roles 2 -> .25 + 1/3 = .5833; [c c] acc 1 roles 4 -> 1 + .5 + .5 (cc: 1/1) = 2
    texts = [[A, B, C, D], [A, A, A], [A, B], [A, B, A, B], [C, C]]
    acc, roles, ids = [1, 0, 1, 0, 1], [5, 1, 0, 2, 4], [3, 3, 3, 8, 8]
    expected = [2.0, 0.375, 1.5, 0.25 + 1 / 3, 2.0]
    order = [4, 1, 3, 0, 2]
    pick = lambda xs: [xs[i] for i in order]  # noqa: E731
    out = run(["multirole"], batch_of(pick(texts), pick(acc), pick(roles), pick(ids)))
    assert out.rewards.tolist() == pytest.approx(pick(expected), abs=1e-6)
    g3, g8 = torch.tensor(expected[:3], dtype=torch.float64), torch.tensor(expected[3:], dtype=torch.float64)
    hand = torch.cat([(g3 - g3.mean()) / (g3.std() + 1e-4), (g8 - g8.mean()) / (g8.std() + 1e-4)])
    assert out.advantages.tolist() == pytest.approx(pick(hand.tolist()), abs=1e-5)


def test_property_diverse_correct_answer_beats_repetitive_one():
    """GRPO on accuracy ties two correct answers; MultiRole-R1 prefers the one with more roles and fewer repeats."""
    batch = batch_of([[A, A, A, A], [A, B, C, D], [A, B, A, B]], [1, 1, 0], [1, 3, 1], [2, 2, 2])
    plain = run([], batch_of([[A, A, A, A], [A, B, C, D], [A, B, A, B]], [1, 1, 0], [0, 0, 0], [2, 2, 2],))
    out = run(["multirole"], batch)
    assert out.advantages[1] > out.advantages[0]
    assert plain.advantages[0] == plain.advantages[1]  # reward = accuracy + roles (all 0 roles)


def test_gate_and_role_cap():
    batch = batch_of([[A, B, C], [A, B, C]], [0, 1], [9, 9], [1, 1])
    gated = MultiRole(MultiRole.Config(gate_on_accuracy=True)).shape_rewards(batch=batch)
    # roles capped at 4 -> D_per 1; distinct-2 = 1: ungated bonus 1, gated only for the correct answer
    assert gated.tolist() == [0.0, 2.0]
    assert MultiRole().shape_rewards(batch=batch).tolist() == [1.0, 2.0]
    no_roles = MultiRole(MultiRole.Config(roles_reward="", other_rewards="ignore")).shape_rewards(batch=batch)
    assert no_roles.tolist() == [0.5, 1.5]


def test_constant_groups_zero_group_of_one_error():
    out = run(["multirole"], batch_of([[A, B]] * 3 + [[C, C, C]] * 2, [1, 1, 1, 0, 0], [2, 2, 2, 7, 7], [1, 1, 1, 2, 2]))
    assert out.advantages.tolist() == [0.0] * 5
    with pytest.raises(PluginError, match="at least 2 completions"):
        run(["multirole"], batch_of([[A, B], [A, C]], [1, 0], [1, 1], [1, 2]))


def test_missing_and_bad_rewards_are_clear_errors():
    batch = batch_of([[A, B], [A, C]], [1, 0], [1, 1], [1, 1])
    batch.reward_names = ("accuracy", "stakeholders")
    with pytest.raises(PluginError, match=r"multirole reads the reward 'roles'.*\['accuracy', 'stakeholders'\].*set roles_reward"):
        run(["multirole"], batch)
    with pytest.raises(PluginError, match=r"'accuracy'.*missing.*\[1\]"):
        run(["multirole"], batch_of([[A, B], [A, C]], [1, float("nan")], [1, 1], [1, 1]))
    with pytest.raises(PluginError, match=">= 0"):
        run(["multirole"], batch_of([[A, B], [A, C]], [1, 0], [-1, 1], [1, 1]))
    bad = batch_of([[A, B], [A, C]], [1, 0], [1, 1], [1, 1])
    bad.rewards = torch.tensor([float("nan"), 0.0])
    with pytest.raises(BatchError, match="NaN"):
        run(["multirole"], bad)


def test_other_rewards_and_metrics():
    batch = batch_of([[A, B], [A, A]], [1, 0], [0, 0], [1, 1], extra={"format": [1, 0]})
    with pytest.raises(PluginError, match=r"also has reward\(s\) \['format'\]"):
        run(["multirole"], batch)
    comp = Composition([{"multirole": {"other_rewards": "add"}}])
    out = comp.run_advantage_stage(batch_of([[A, B], [A, A]], [1, 0], [0, 0], [1, 1], extra={"format": [1, 0]}))
    assert out.rewards.tolist() == [2.5, 0.5]
    metrics = comp.pop_metrics()
    assert metrics["plugins/multirole/distinct_2"] == 1.0
    assert metrics["plugins/multirole/accuracy"] == 0.5
    assert metrics["plugins/multirole/mean_length"] == 2.0


def test_large_token_ids_every_n_of_the_domain():
    # Qwen's special tokens (ids ~151k) sit inside the mask; no n of the domain may overflow
    E, S, F = 151643, 151644, 151645
    ids = torch.tensor([[E, S, F, E, S], [E, E, E, E, E], [2**40, 2**40 + 1, 2**40, 2**40 + 1, 7]])
    mask = torch.ones(3, 5)
    # unigrams 3/5, 1/5, 3/5; bigrams [ES SF FE ES] 3/4, 1/4, [ab ba ab b7] 3/4
    assert distinct_ngram_ratio(ids, mask, 1).tolist() == pytest.approx([3 / 5, 1 / 5, 3 / 5])
    assert distinct_ngram_ratio(ids, mask, 2).tolist() == pytest.approx([3 / 4, 1 / 4, 3 / 4])
    # trigrams [ESF SFE FES] 1, [EEE x3] 1/3, [aba bab ab7] 1; 4-grams [ESFE SFES] 1, 1/2, 1
    assert distinct_ngram_ratio(ids, mask, 3).tolist() == pytest.approx([1.0, 1 / 3, 1.0])
    assert distinct_ngram_ratio(ids, mask, 4).tolist() == pytest.approx([1.0, 1 / 2, 1.0])
    # the same n-gram in two rows counts in each row (ids are per row, not shared)
    same = torch.tensor([[E, S, E, S], [E, S, E, S]])
    assert distinct_ngram_ratio(same, torch.ones(2, 4), 4).tolist() == [1.0, 1.0]
    assert distinct_ngram_ratio(same, torch.ones(2, 4), 2).tolist() == pytest.approx([2 / 3, 2 / 3])


def test_config_domains():
    with pytest.raises(ConfigError, match="ngram"):
        Composition([{"multirole": {"ngram": 5}}])
    with pytest.raises(ConfigError, match="max_roles"):
        Composition([{"multirole": {"max_roles": 0}}])
    with pytest.raises(ConfigError, match="lexical_weight"):
        Composition([{"multirole": {"lexical_weight": -1.0}}])


def test_a_reward_shaper_listed_before_it_is_refused_at_start_up():
    """It rebuilds the reward from the components: an earlier shaping would be lost (Needs.runs_first)."""
    shaper = method_with("earlier_shaper", shape_rewards=lambda rewards: rewards + 1)
    with pytest.raises(CompositionError, match=r"'multirole' must run first among the methods implementing hook "
                                               r"'shape_rewards'.*method 'earlier_shaper' is listed before it"):
        Composition([shaper, "multirole"])
    assert Composition(["multirole", shaper]).providers("shape_rewards") == ["multirole", "earlier_shaper"]
