"""TW-GRPO on the core alone: the card's worked example, the reference code's formula on whole tensors,
the soft reward, edge cases and the property against GRPO. The old policy is the core's reference model
(:class:`grpo_plugins.probe.LinearProbe`) or a hand-built probe chunk."""

import math

import pytest
import torch

from grpo_plugins import BatchError, Composition, CompositionError, GRPOBatch, TrainerCapabilities
from grpo_plugins.probe import LinearProbe, OldPolicyProbe, ProbeChunk
from grpo_plugin_tw_grpo import (
    PROBE, answer_options, chunk_token_weights, group_divergence, member_divergence, partial_credit, position_weights,
)

CARD_PROBS = torch.tensor([[[0.5, 0.5], [0.9, 0.1]], [[0.5, 0.5], [0.1, 0.9]]])  # (G=2, T=2, V=2)


def card_chunk(mask=None, logits_budget=2**24):
    # identity head: the hidden states are the logits; log-probs of the card's distributions
    mask = torch.ones(2, 2) if mask is None else mask
    return ProbeChunk(rows=torch.arange(2), completion_ids=torch.zeros(2, 2, dtype=torch.long), completion_mask=mask,
                      group_index=torch.zeros(2, dtype=torch.long), num_groups=1, hidden_states=CARD_PROBS.log(),
                      head_weight=torch.eye(2), logits_budget=logits_budget)


def card_batch(rewards=(1.0, 0.0), **chunk):
    batch = GRPOBatch(prompt_ids=torch.tensor([7, 7]), rewards=torch.tensor(rewards), completion_mask=torch.ones(2, 2),
                      completion_ids=torch.zeros(2, 2, dtype=torch.long))
    batch.probes[PROBE] = OldPolicyProbe(PROBE, 2, [torch.arange(2)], lambda rows: card_chunk(**chunk))
    return batch


def test_card_worked_example_divergence_and_weights():
    d = member_divergence(CARD_PROBS.log(), torch.ones(2, 2, dtype=torch.bool), torch.zeros(2, dtype=torch.long), 1)
    expected = (1 / 3 + math.log(3) - 1) + (3 - math.log(3) - 1)  # 4/3, the card's value
    torch.testing.assert_close(d, torch.tensor([[0.0, expected], [0.0, expected]]))
    big_d = group_divergence(d, torch.zeros(2, dtype=torch.long), 1)
    torch.testing.assert_close(big_d, torch.tensor([[0.0, 4 / 3]]))
    weights = position_weights(big_d, torch.ones(1, 2, dtype=torch.bool), 1.7)
    torch.testing.assert_close(weights, torch.tensor([[1.0, 1.7 - 0.7 * 1e-8 / (4 / 3 + 1e-8)]]))


def test_card_example_through_the_stage():
    batch = Composition(["tw_grpo"]).run_advantage_stage(card_batch())
    torch.testing.assert_close(batch.token_weights, torch.tensor([[1.0, 1.7], [1.0, 1.7]]))


def test_uneven_lengths_use_the_uniform_distribution_past_the_end():
    # member 1 ends after position 0; at position 1 it counts as uniform [.5, .5] against [.9, .1]
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    out = chunk_token_weights(card_chunk(mask), alpha=1.7, clamp=11.0)
    mean = [(math.log(0.9) + math.log(0.5)) / 2, (math.log(0.1) + math.log(0.5)) / 2]

    def k3(member):
        return sum(math.exp(m - math.log(x)) - (m - math.log(x)) - 1 for m, x in zip(mean, member))

    d1 = (k3([0.9, 0.1]) + k3([0.5, 0.5])) / 2
    torch.testing.assert_close(out["divergence"], torch.tensor([[0.0, d1], [0.0, 0.0]]))
    torch.testing.assert_close(out["weights"], torch.tensor([[1.0, 1.7 - 0.7 * 1e-8 / (d1 + 1e-8)], [1.0, 0.0]]))


def test_position_blocks_do_not_change_the_weights():
    one_position = chunk_token_weights(card_chunk(logits_budget=1), 1.7, 11.0)
    whole = chunk_token_weights(card_chunk(), 1.7, 11.0)
    assert len(card_chunk(logits_budget=1).position_blocks()) == 2
    torch.testing.assert_close(one_position["weights"], whole["weights"], rtol=0, atol=0)


def random_batch(seed=0, sizes=(3, 5, 2, 4), width=6, nan_padding=False):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.repeat_interleave(torch.arange(len(sizes)) * 3 + 1, torch.tensor(sizes))
    order = torch.randperm(ids.numel(), generator=gen)
    ids = ids[order]
    n = ids.numel()
    lengths = torch.randint(1, width + 1, (n,), generator=gen)
    lengths[0] = width
    mask = (torch.arange(width) < lengths[:, None]).float()
    tokens = torch.randint(0, 40, (n, width), generator=gen)
    if nan_padding:
        tokens = torch.where(mask > 0, tokens, 63)  # junk ids past the end
    rewards = torch.randint(0, 2, (n,), generator=gen).float()
    old = torch.where(mask > 0, -torch.rand(n, width, generator=gen), float("nan") if nan_padding else 0.0)
    return GRPOBatch(prompt_ids=ids, rewards=rewards, completion_ids=tokens, completion_mask=mask, old_log_probs=old)


def run(batch, config=None, rows=4):
    composition = Composition([{"tw_grpo": config or {}}])
    request = composition.needs()["tw_grpo"].probes[PROBE]
    LinearProbe(max_positions=16).attach(batch, {PROBE: request}, default_rows=rows)
    return composition.run_advantage_stage(batch), composition


def reference_weights(batch, alpha=1.7):
    """The reference code's formula on whole ``(G, T, V)`` tensors, group by group."""
    model = LinearProbe(max_positions=16)
    logps = torch.log_softmax(model.hidden_states(batch.prompt_ids, batch.completion_ids) @ model.head.T, dim=-1)
    mask = batch.completion_mask > 0
    out = torch.zeros_like(batch.completion_mask)
    for g in range(batch.num_groups):
        rows = (batch.group_index == g).nonzero().flatten()
        filled = torch.where(mask[rows, :, None], logps[rows], -math.log(logps.shape[-1]))
        diff = (filled.mean(0, keepdim=True) - filled).clamp(-11, 11)
        divergence = (torch.exp(diff) - diff - 1).sum(-1).mean(0)
        real = mask[rows].any(0)
        low, high = divergence[real].min(), divergence[real].max()
        weights = 1 + (alpha - 1) * (divergence - low) / (high - low + 1e-8)
        out[rows] = torch.where(mask[rows], weights, 0.0)
    return out


@pytest.mark.parametrize("rows", [1, 4, 64])
def test_chunked_weights_equal_the_reference_formula(rows):
    batch = random_batch()
    staged, _ = run(batch, rows=rows)
    torch.testing.assert_close(staged.token_weights, reference_weights(random_batch()))


def test_nan_and_junk_in_padding_are_ignored():
    clean, _ = run(random_batch(seed=2))
    padded, _ = run(random_batch(seed=2, nan_padding=True))
    keep = clean.completion_mask > 0
    torch.testing.assert_close(padded.token_weights[keep], clean.token_weights[keep])
    assert bool(torch.isfinite(padded.token_weights).all())


def test_group_of_one_and_identical_members_weigh_one():
    batch = random_batch(sizes=(1, 3))
    members = batch.group_index == 1
    batch.completion_ids[members] = batch.completion_ids[members][0]  # identical completions: D = 0 everywhere
    batch.completion_mask[members] = batch.completion_mask[members][0]
    staged, _ = run_single_groups(batch)
    keep = staged.completion_mask > 0
    assert bool((staged.token_weights[keep] == 1).all())


def run_single_groups(batch):
    from grpo_plugins import Method, hookimpl

    class ZeroAdvantages(Method):  # an estimator that accepts groups of one
        name = "zero_advantages"

        @hookimpl
        def compute_advantages(self, batch):
            return torch.zeros_like(batch.rewards)

    composition = Composition([ZeroAdvantages(), "tw_grpo"])
    LinearProbe(max_positions=16).attach(batch, composition.needs()["tw_grpo"].probes)
    return composition.run_advantage_stage(batch), composition


def test_empty_completion_gets_no_weight():
    batch = random_batch(sizes=(3, 2))
    batch.completion_mask[1] = 0
    staged, _ = run(batch)
    assert bool((staged.token_weights[1] == 0).all())
    assert bool((staged.token_weights[staged.completion_mask > 0] >= 1).all())


def test_nan_rewards_are_refused():
    batch = random_batch()
    batch.rewards[2] = float("nan")
    with pytest.raises(BatchError, match="finite|NaN"):
        run(batch)


def test_alpha_one_is_plain_grpo_and_weights_differ_from_grpo_otherwise():
    staged, composition = run(random_batch(), {"alpha": 1.0})
    keep = staged.completion_mask > 0
    assert bool((staged.token_weights[keep] == 1).all())
    grpo = Composition().run_advantage_stage(random_batch())
    torch.testing.assert_close(staged.advantages, grpo.advantages)
    weighted, composition = run(random_batch())
    w = weighted.token_weights[keep]
    assert float(w.min()) == 1.0 and float(w.max()) == pytest.approx(1.7, abs=1e-6)
    assert composition.pop_metrics()["plugins/tw_grpo/mean_weight"] > 1


def test_soft_reward_partial_credit():
    assert answer_options("<think>..</think><answer> A, C </answer>") == {"A", "C"}
    assert partial_credit("<answer>A</answer>", "A,C") == 0.5  # subset: |P|/|S|
    assert partial_credit("<answer>C,A</answer>", "<answer>A,C</answer>") == 1.0  # exact match
    assert partial_credit("<answer>A,B</answer>", "A,C") == 0.0  # a wrong option
    assert partial_credit("<answer></answer>", "A,C") == 0.0  # nothing chosen
    assert partial_credit("B", "B,C,D") == pytest.approx(1 / 3)  # no tags: the whole text


def test_soft_reward_replaces_accuracy_when_larger():
    batch = random_batch(sizes=(2, 2))
    accuracy = torch.tensor([0.0, 1.0, 0.0, 0.0])
    fmt = torch.ones(4)
    batch.reward_components = torch.stack([accuracy, fmt], 1)
    batch.reward_names = ("accuracy", "format")
    batch.reward_weights = torch.tensor([2.0, 1.0])
    batch.rewards = 2 * accuracy + fmt
    batch.completions = ["<answer>A</answer>", "<answer>A,C</answer>", "<answer>B</answer>", "<answer>C</answer>"]
    batch.rows = [{"solution": "A,C"}, {"solution": "A,C"}, {"solution": "A"}, {"solution": "B,C,D"}]
    order = torch.argsort(batch.group_index, stable=True)
    batch.prompt_ids = batch.prompt_ids[order]
    batch.completion_ids, batch.completion_mask = batch.completion_ids[order], batch.completion_mask[order]
    staged, _ = run(batch, {"soft_reward": True})
    torch.testing.assert_close(staged.rewards, torch.tensor([2 * 0.5 + 1, 2 * 1.0 + 1, 1.0, 2 / 3 + 1]))


def test_needs_and_refusal_without_the_probe():
    composition = Composition([{"tw_grpo": {"soft_reward": True}}])
    needs = composition.needs()["tw_grpo"]
    assert needs.probes[PROBE].whole_groups and "solution" in needs.columns
    assert {"old_policy_probe"} <= needs.features
    problems = composition.capability_problems(TrainerCapabilities.standard("a trainer"))
    assert any("old_policy_probe" in p and "'tw_grpo'" in p for p in problems)
    with pytest.raises(CompositionError, match="alpha"):
        Composition([{"tw_grpo": {"alpha": 0.5}}])
