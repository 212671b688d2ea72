"""Rank-GRPO: the card's worked example by hand (tail-DCG rewards, rank advantages, item ratio and clip),
segmentation, a float64 finite-difference gradient check, edge cases, and the one-item cross-check with
GSPO's sequence ratio (torch and the core only; TRL: tests/integration/test_rank_grpo_trl.py)."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_plugins import Composition, GRPOBatch, LossInputs, RunContext
from grpo_plugins.surrogates import ppo_clip_loss
from grpo_plugin_rank_grpo import item_index, item_ratios, parse_items, rank_advantages, rank_rewards, relevance


class WordTokenizer:
    """A real (tiny) tokenizer: token i is the word VOCAB[i]; decoding joins words with spaces."""

    VOCAB = ["<pad>", "alien", "heat", "up", "jaws", "\n", "1.", "2."]

    def __len__(self):
        return len(self.VOCAB)

    def batch_decode(self, sequences):
        return [" ".join(self.VOCAB[i] for i in ids) for ids in sequences]

    def encode(self, text):
        return [self.VOCAB.index(w) if w != "\n" else 5 for w in text.replace("\n", " \n ").split(" ") if w]


def test_card_rewards_and_advantages():
    assert rank_rewards(torch.tensor([[1.0, 0.0, 1.0]]), "log_decay").tolist()[0] == pytest.approx([1.5, 0.5, 0.5])
    rewards = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
    adv = rank_advantages(rewards, torch.zeros(4, dtype=torch.long), 1)
    assert adv.flatten().tolist() == pytest.approx([0.866, -0.866, 0.866, -0.866], abs=1e-3)  # +-.5 / .5774


def test_card_item_ratio_and_clip():
    log_ratio = torch.log(torch.tensor([[0.5 / 0.25, 0.5 / 0.5]]))
    ratio = item_ratios(log_ratio, torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2), 3)
    assert ratio.flatten().tolist() == pytest.approx([math.sqrt(2)] * 2)
    composition = Composition(["rank_grpo"])
    inputs = LossInputs(log_probs=torch.log(torch.tensor([[0.5, 0.5]])), old_log_probs=torch.log(torch.tensor([[0.25, 0.5]])),
                        advantages=torch.ones(1, 2), mask=torch.ones(1, 2), row_data={"rank_grpo_item": torch.zeros(1, 2, dtype=torch.long)})
    loss = composition.run_loss_stage(inputs, None).policy
    assert loss.flatten().tolist() == pytest.approx([-1.08, -1.08])  # clipped to 1 + .08 when A > 0


def test_segmentation_and_relevance():
    separators = torch.tensor([[False, True, False, True, False, False]])
    items = item_index(separators, ~separators, torch.tensor([[1, 1, 1, 1, 1, 0]]), 2)
    assert items.tolist() == [[0, 0, 1, 1, 2, 2]]  # a separator ends its item; after K items: overflow bin K
    assert parse_items("1. Alien\n2) Heat\n\n- Up", "\n") == ["alien", "heat", "up"]
    rel, counts = relevance(["1. Alien\n2. Jaws", "garbage"], [["alien", "heat"], "heat"], "\n", 3)
    assert rel.tolist() == [[1, 0, 0], [0, 0, 0]] and counts.tolist() == [2, 1]


def batch_of(texts, prompt_ids, targets, tokenizer):
    ids = [tokenizer.encode(t) for t in texts]
    width = max(len(i) for i in ids)
    completion_ids = torch.tensor([i + [0] * (width - len(i)) for i in ids])
    mask = (torch.arange(width) < torch.tensor([len(i) for i in ids])[:, None]).float()
    return GRPOBatch(prompt_ids=torch.tensor(prompt_ids), rewards=torch.zeros(len(texts)), completion_ids=completion_ids,
                     completion_mask=mask, completions=texts, rows=[{"groundtruth": t} for t in targets])


def test_per_token_advantages_with_length_shaping():
    tokenizer = WordTokenizer()
    composition = Composition([{"rank_grpo": {"num_items": 2}}])
    composition.run_setup(RunContext(trainer="test", tokenizer=tokenizer))
    texts = ["alien\nheat", "jaws\nup\nalien", "up"]
    batch = composition.run_advantage_stage(batch_of(texts, [1, 1, 1], [["alien", "heat"]] * 3, tokenizer))
    # rank 0: rel [1, 0, 0] -> A = [2/3, -1/3, -1/3] / (std 0.5774 + 1e-4); rank 1: rel [1, 0, 0] likewise
    a = (2 / 3) / (0.57735 + 1e-4)
    b = (-1 / 3) / (0.57735 + 1e-4)
    adv = batch.advantages
    # completion 0: "alien \n" item 0, "heat" item 1 (last token: exactly K items -> +0.1)
    assert adv[0, :3].tolist() == pytest.approx([a, a, a + 0.1], abs=1e-4)
    # completion 1: three items: "alien" (token 4) overflows -> -0.1; more than K items: no end bonus
    assert adv[1, :5].tolist() == pytest.approx([b, b, b, b, -0.1], abs=1e-4)
    # completion 2: one item, fewer than K -> last token -0.1
    assert adv[2, :1].tolist() == pytest.approx([b - 0.1], abs=1e-4) and adv[2, 1:].abs().sum() == 0
    assert batch.row_data["rank_grpo_item"][1].tolist() == [0, 0, 1, 1, 2]


def test_constant_ranks_give_zero_advantage():
    adv = rank_advantages(torch.full((3, 2), 1e4 * 0.3), torch.zeros(3, dtype=torch.long), 1)
    assert torch.equal(adv, torch.zeros(3, 2))


def test_one_item_is_gspo_sequence_ratio():
    """Cross-check: with one item per completion the item ratio is GSPO's length-normalised sequence ratio,
    so the loss equals PPO-clip with the (B, 1) sequence ratio."""
    gen = torch.Generator().manual_seed(0)
    old = -torch.rand(3, 4, generator=gen, dtype=torch.float64)
    log_pi = (old + 0.2 * torch.randn(3, 4, generator=gen, dtype=torch.float64)).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float64)
    adv = torch.tensor([[1.0], [-0.5], [0.3]], dtype=torch.float64).expand(3, 4)
    inputs = LossInputs(log_probs=log_pi, old_log_probs=old, advantages=adv, mask=mask,
                        row_data={"rank_grpo_item": torch.zeros(3, 4, dtype=torch.long)})
    ours = Composition([{"rank_grpo": {"epsilon_low": 0.2, "epsilon_high": 0.2}}]).run_loss_stage(inputs, None).policy
    seq = (torch.where(mask > 0, log_pi - old, 0.0).sum(-1) / mask.sum(-1)).exp()[:, None]
    gspo = ppo_clip_loss(seq, adv, 0.2, 0.2)
    torch.testing.assert_close(torch.where(mask > 0, ours, 0.0), torch.where(mask > 0, gspo, 0.0))


def test_gradient_finite_difference_and_nan_padding():
    gen = torch.Generator().manual_seed(1)
    old = -torch.rand(2, 5, generator=gen, dtype=torch.float64)
    log_pi = old + 0.02 * torch.randn(2, 5, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.float64)
    items = torch.tensor([[0, 0, 1, 2, 2], [0, 1, 1, 1, 2]])
    adv = torch.tensor([[0.5, 0.5, -1.0, -0.1, 0], [-0.3, 0.8, 0.8, 0.8, -0.1]], dtype=torch.float64)
    composition = Composition([{"rank_grpo": {"num_items": 2}}])

    def f(x):
        inputs = LossInputs(log_probs=x, old_log_probs=old, advantages=adv, mask=mask, row_data={"rank_grpo_item": items})
        return torch.where(mask > 0, composition.run_loss_stage(inputs, None).policy, 0.0).sum()

    x = torch.where(mask > 0, log_pi, float("nan")).requires_grad_(True)
    f(x).backward()
    numeric = torch.zeros_like(log_pi)
    for i, j in mask.nonzero().tolist():
        e = torch.zeros_like(log_pi)
        e[i, j] = 1e-7
        numeric[i, j] = (f(log_pi + e) - f(log_pi - e)) / 2e-7
    torch.testing.assert_close(torch.nan_to_num(x.grad), numeric, atol=1e-6, rtol=1e-5)


def test_property_versus_grpo_rank_credit():
    """The distinguishing property: a completion with a hit at rank 0 and a miss at rank 1 gets opposite
    signs on its two items, where GRPO gives all its tokens the one sign of its total reward."""
    adv = rank_advantages(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.zeros(2, dtype=torch.long), 1)
    assert adv[0, 0] > 0 > adv[0, 1]


def test_empty_lines_end_no_item():
    r"""Tokens a, SEP, SEP, b, SEP, EOS ("a\n\nb\n"): the empty line ends nothing (``parse_items`` drops it),
    so "b" is item 1; a token holding item text and the separator (")\n") ends its item."""
    separators = torch.tensor([[False, True, True, False, True, False]])
    items = item_index(separators, ~separators, torch.ones(1, 6), 2)
    assert items.tolist() == [[0, 0, 1, 1, 1, 2]]
    # "x", ")\n", "\n", "y\n", "z": the merged tokens end items, the lone "\n" does not
    separators = torch.tensor([[False, True, True, True, False]])
    content = torch.tensor([[True, True, False, True, True]])
    assert item_index(separators, content, torch.ones(1, 5), 5).tolist() == [[0, 0, 1, 1, 2]]


def test_empty_line_keeps_items_on_their_ranks():
    r"""K = 2, ground truth {b}: "a\n\nb\n" lists [a, b], "b\nc\n" lists [b, c]. Rank 0 hits [0, 1], rank 1
    hits [1, 0] -> A = -+.5 / (.7071 + 1e-4) = -+.7070. The relevant "b" of completion 0 gets rank 1's
    +.7070 (not the overflow bin's -.1); the EOS after the K-th item's separator gets only the exactly-K
    bonus +.1 (not -.1 + .1)."""
    ids = torch.tensor([[1, 5, 5, 2, 5, 9], [2, 5, 3, 5, 9, 0]])  # a=1 b=2 c=3 SEP=5 EOS=9
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]).float()
    batch = GRPOBatch(prompt_ids=torch.tensor([0, 0]), rewards=torch.zeros(2), completion_ids=ids, completion_mask=mask,
                      completions=["a\n\nb\n", "b\nc\n"], rows=[{"groundtruth": ["b"]}] * 2)
    composition = Composition([{"rank_grpo": {"num_items": 2, "separator_token_id": 5}}])
    adv = composition.run_advantage_stage(batch).advantages
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    assert adv[0].tolist() == pytest.approx([-a, -a, a, a, a, 0.1], abs=1e-6)
    assert adv[1].tolist() == pytest.approx([a, a, -a, -a, 0.1, 0.0], abs=1e-6)


def test_tokenizer_tables_skip_blank_and_numbering_tokens():
    tokenizer = WordTokenizer()
    composition = Composition([{"rank_grpo": {"num_items": 2}}])
    composition.run_setup(RunContext(trainer="test", tokenizer=tokenizer))
    method = composition.method("rank_grpo")
    assert method.separator_ids.nonzero().flatten().tolist() == [5]
    assert method.content_ids.tolist() == [True, True, True, True, True, False, False, False]  # "\n", "1.", "2."
    texts = ["1. alien\n\n2. heat", "up\njaws"]
    batch = composition.run_advantage_stage(batch_of(texts, [1, 1], [["alien", "heat"]] * 2, tokenizer))
    assert batch.row_data["rank_grpo_item"][0].tolist() == [0, 0, 0, 1, 1, 1]


def test_scale_rewards_off_centres_only():
    rewards = torch.tensor([[1.0, 3.0], [0.0, 3.0], [1.0, 3.0], [0.0, 3.0]])
    adv = rank_advantages(rewards, torch.zeros(4, dtype=torch.long), 1, scale=False)
    assert adv.tolist() == [[0.5, 0.0], [-0.5, 0.0], [0.5, 0.0], [-0.5, 0.0]]
    tokenizer = WordTokenizer()
    composition = Composition([{"rank_grpo": {"num_items": 1, "scale_rewards": False, "length_penalty": 0.0}}])
    composition.run_setup(RunContext(trainer="test", tokenizer=tokenizer))
    batch = composition.run_advantage_stage(batch_of(["alien", "heat"], [1, 1], [["alien"]] * 2, tokenizer))
    assert batch.advantages.flatten().tolist() == [0.5, -0.5]
