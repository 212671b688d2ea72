"""VAS, enabled by name; numbers hand-computed from the method card (08-mmr1-vas.md)."""

import math
from collections import Counter

import pytest
import torch

from grpo_plugins import Composition, CompositionError, ConfigError, GRPOBatch, PluginError, PromptRound
from grpo_plugins.testing import FirstPrompts, resumed_sampler_rounds
from grpo_plugin_vas import interleave, min_max_normalise, self_bleu, trajectory_diversity, variance_promotion


def plan(num_prompts=10, dataset_size=4, step=0):
    return PromptRound(num_prompts=num_prompts, budget=4 * num_prompts, dataset_size=dataset_size, step=step, default_rollouts=4)


def tokens(*rows, width=6):
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def test_discovered_with_its_hooks():
    composition = Composition(["vas"])
    assert composition.providers("sample_prompts") == ["vas"] and composition.providers("observe") == ["vas"]
    assert composition.providers("allocate_rollouts") == []
    assert Composition([{"vas": {"tds_weight": 0.2}}]).required_fields() >= {"completion_ids", "completion_mask"}


def test_card_weights():
    # p = [0, .5, .25, 1], TDS = [.2, .4, .1, 0], w = .8 / .2: OVS = [0, .25, .1875, 0]
    # VPS = [.04, .28, .17, 0] -> W = [.143, 1, .607, 0] -> P(weighted) = [.082, .572, .347, 0]
    vps = variance_promotion(torch.tensor([0.0, 0.5, 0.25, 1.0]), torch.tensor([0.2, 0.4, 0.1, 0.0]), 0.8, 0.2)
    torch.testing.assert_close(vps, torch.tensor([0.04, 0.28, 0.17, 0.0]))
    weights = min_max_normalise(vps)
    assert weights.tolist() == pytest.approx([0.04 / 0.28, 1.0, 0.17 / 0.28, 0.0], abs=1e-6)
    assert (weights / weights.sum()).tolist() == pytest.approx([0.082, 0.572, 0.347, 0.0], abs=1e-3)


def test_self_bleu_hand_computed():
    # identical pair: BLEU 1 each; disjoint pair: no unigram match -> 0;
    # [1,2,3,4] vs [1,2,3,5]: p1 = 3/4, p2 = 2/3, p3 = 1/2, BP = 1 -> (1/4)^(1/3) = 0.62996 each way
    ids, mask = tokens([1, 2, 3], [1, 2, 3], [1, 2, 3], [4, 5, 6], [1, 2, 3, 4], [1, 2, 3, 5], [7, 7])
    group = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    scores = self_bleu(ids, mask, group, 4)
    assert scores.tolist() == pytest.approx([1.0, 0.0, 0.25 ** (1 / 3), 0.0])  # a group of one: 0
    tds = trajectory_diversity(ids, mask, group, 4)
    assert tds.tolist() == pytest.approx([0.0, 1.0, 1 - 0.25 ** (1 / 3), 0.0])
    # brevity: [1,2] vs [1,2,3]: p1 = 1, p2 = 1, p3 = 0.1 / 1 (smoothed), BP = exp(1 - 3/2); [1,2,3] vs [1,2]: p1 = 2/3,
    # p2 = 1/2, p3 = 0.1 / 1, BP = 1
    ids, mask = tokens([1, 2], [1, 2, 3])
    short = math.exp(1 - 1.5) * (1 * 1 * 0.1) ** (1 / 3)
    long = (2 / 3 * 1 / 2 * 0.1) ** (1 / 3)
    assert self_bleu(ids, mask, torch.tensor([0, 0]), 1).tolist() == pytest.approx([(short + long) / 2])


def _reference_bleu(refs, hyp, max_order=3):
    """Plain-Python sentence BLEU (NLTK's definition, smoothing method 1) for the cross-check."""
    nums, dens = [], []
    for n in range(1, max_order + 1):
        counts = Counter(tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1))
        best = Counter()
        for ref in refs:
            ref_counts = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
            for gram in counts:
                best[gram] = max(best[gram], ref_counts[gram])
        nums.append(sum(min(c, best[g]) for g, c in counts.items()))
        dens.append(max(1, sum(counts.values())))
    if nums[0] == 0:
        return 0.0
    c = len(hyp)
    r = min((len(ref) for ref in refs), key=lambda length: (abs(length - c), length))
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return bp * math.exp(sum(math.log((num if num else 0.1) / den) / max_order for num, den in zip(nums, dens)))


def test_self_bleu_matches_a_plain_reference_on_random_groups_and_ignores_padding():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        sizes = torch.randint(1, 6, (4,), generator=gen)
        n, width = int(sizes.sum()), 9
        ids = torch.randint(0, 4, (n, width), generator=gen)
        lengths = torch.randint(0, width + 1, (n,), generator=gen)
        mask = (torch.arange(width) < lengths[:, None]).float()
        group = torch.repeat_interleave(torch.arange(4), sizes)[torch.randperm(n, generator=gen)]
        got = self_bleu(ids, mask, group, 4)
        seqs = [ids[i, : lengths[i]].tolist() for i in range(n)]
        for k in range(4):
            members = [seqs[i] for i in range(n) if group[i] == k]
            expected = 0.0 if len(members) < 2 else sum(
                _reference_bleu(members[:i] + members[i + 1 :], s) for i, s in enumerate(members)
            ) / len(members)
            assert float(got[k]) == pytest.approx(expected, abs=1e-12)
        noisy = torch.where(mask > 0, ids, torch.randint(50, 60, ids.shape, generator=gen))  # padding is ignored
        torch.testing.assert_close(self_bleu(noisy, mask, group, 4), got)


def test_mixture_draws_weighted_and_uniform_interleaved():
    assert interleave(torch.tensor([1, 2, 3]), torch.tensor([7])).tolist() == [1, 7, 2, 3]
    composition = Composition(["vas"])
    method = composition.method("vas")
    method.table.set("weight", torch.arange(4), torch.tensor([0.143, 1.0, 0.607, 0.0]))
    generator = torch.Generator().manual_seed(0)
    rounds = [composition.run_sample_prompts(plan(10, 4), generator) for _ in range(200)]
    weighted = torch.cat([r[0::2] for r in rounds])  # B = 10, lambda = .5: 5 weighted at even positions
    uniform = torch.cat([r[1::2] for r in rounds])
    assert 3 not in weighted.tolist()  # W = 0 never appears in the weighted half
    freq = torch.bincount(weighted, minlength=4).double() / weighted.numel()
    assert freq.tolist() == pytest.approx([0.082, 0.572, 0.347, 0.0], abs=0.03)
    assert all(set(r[1::2].tolist()) == {0, 1, 2, 3} for r in rounds)  # the uniform half reads the whole pool
    assert uniform.numel() == 1000


def test_refresh_every_k_steps_from_training_rollouts():
    composition = Composition([{"vas": {"update_every": 2}}])
    method = composition.method("vas")
    batch = GRPOBatch(prompt_ids=torch.tensor([0, 0, 1, 1, 2, 2]), rewards=torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0]))
    composition.run_observe(batch, 1)
    assert method.weights(torch.tensor([0, 1, 5])).tolist() == [1.0, 1.0, 1.0]  # not refreshed yet; unseen = 1
    composition.run_observe(batch, 2)
    # OVS = [.25, 0, .25] -> W = [1, 0, 1] (min-max); prompt 5 never seen keeps the unseen weight
    assert method.weights(torch.tensor([0, 1, 2, 5])).tolist() == pytest.approx([1.0, 0.0, 1.0, 1.0], abs=1e-6)


def test_property_vs_uniform_mixed_prompts_drawn_more():
    composition = Composition([{"vas": {"update_every": 1, "unseen_weight": 0.0}}])
    ids = torch.arange(20)
    rewards = torch.where(ids < 5, 1.0, 0.0)  # prompts 0..4: p = 0.5 (one right, one wrong); others all wrong
    prompt_ids = ids.repeat_interleave(2)
    composition.run_observe(GRPOBatch(prompt_ids=prompt_ids, rewards=torch.stack([rewards, torch.zeros(20)], 1).reshape(-1)), 1)
    generator = torch.Generator().manual_seed(0)
    drawn = torch.cat([composition.run_sample_prompts(plan(8, 20), generator) for _ in range(100)])
    assert float((drawn < 5).double().mean()) == pytest.approx(0.5 + 0.5 * 0.25, abs=0.03)  # uniform: 0.25


def test_edge_cases():
    with pytest.raises(PluginError, match="vas.*NaN"):
        Composition(["vas"]).run_observe(GRPOBatch(prompt_ids=torch.tensor([0, 0]), rewards=torch.tensor([1.0, float("nan")])), 1)
    with pytest.raises(PluginError, match="tds_weight"):
        Composition([{"vas": {"tds_weight": 0.2}}]).run_observe(GRPOBatch(prompt_ids=torch.tensor([0]), rewards=torch.tensor([1.0])), 1)
    with pytest.raises(ConfigError, match="mixture_ratio"):
        Composition([{"vas": {"mixture_ratio": 1.5}}])
    with pytest.raises(ConfigError, match="at least one"):
        Composition([{"vas": {"ovs_weight": 0.0}}])
    # all weights 0 -> the weighted half is uniform
    composition = Composition([{"vas": {"unseen_weight": 0.0}}])
    assert composition.run_sample_prompts(plan(4, 3), torch.Generator().manual_seed(0)).numel() == 4


def test_resumed_run_plans_the_same_rounds(tmp_path):
    straight, resumed = resumed_sampler_rounds([{"vas": {"update_every": 2, "tds_weight": 0.2, "ovs_weight": 0.8}}], tmp_path, lambda r: plan(4, 30, r), seed=2, resume_at=5)
    assert resumed == straight
    assert len({tuple(ids) for ids, _ in straight}) > 1  # the sampler moved over the rounds

def test_a_second_prompt_sampler_is_refused_with_the_switch_to_use():
    with pytest.raises(CompositionError, match="'vas'.*'first_prompts'.*sample_prompts") as error:
        Composition(["vas", FirstPrompts()])
    assert "switch the hook off" in str(error.value)
