"""Rank-GRPO on the real TRL trainer (list completions scored per rank against a ground-truth column),
alone and composed with a round-1 method; with one item, its loss is TRL's sequence-level
importance-sampling loss."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("trl")
pytest.importorskip("grpo_plugin_rank_grpo")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from grpo_plugins import Composition, LossInputs  # noqa: E402
from grpo_plugins_trl.testing import tiny_grpo_run, trl_loss_on_batch  # noqa: E402


def rows(trainer, key):
    return [row[key] for row in trainer.state.log_history if key in row]


def lists_dataset():
    # items are digits, separated by "+" (a token of the tiny vocabulary); the ground truth lists two digits
    return Dataset.from_dict({"prompt": [f"{a} + {b} =" for a in range(4) for b in range(4)],
                              "groundtruth": [[str(a), str(b)] for a in range(4) for b in range(4)],
                              "answer": ["0"] * 16, "prompt_id": list(range(16))})


def test_rank_grpo_alone_and_composed():
    config = {"rank_grpo": {"num_items": 2, "separator": "+"}}
    trainer = tiny_grpo_run([config], max_steps=2, dataset=lists_dataset(), loss_type="grpo")
    assert rows(trainer, "plugins/rank_grpo/hit_rate") and rows(trainer, "plugins/rank_grpo/item_clip_frac")
    assert all(math.isfinite(v) for v in rows(trainer, "loss"))
    separator = trainer.processing_class.convert_tokens_to_ids("+")
    assert trainer.composition.method("rank_grpo").separator_ids.nonzero().flatten().tolist() == [separator]
    composed = tiny_grpo_run(["unlikeliness", config], max_steps=2, dataset=lists_dataset())
    assert rows(composed, "plugins/rank_grpo/hit_rate")


def test_one_item_equals_trl_sequence_level_importance_sampling():
    gen = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float32)
    old = -torch.rand(4, 4, generator=gen) - 0.5
    batch = dict(prompt_ids=torch.tensor([1, 1, 1, 1]), rewards=torch.tensor([1.0, 0.0, 0.5, 0.0]),
                 completion_ids=torch.randint(4, 14, (4, 4), generator=gen), completion_mask=mask,
                 log_probs=old + 0.3 * torch.randn(4, 4, generator=gen), old_log_probs=old)
    trl = trl_loss_on_batch([], loss_type="grpo", importance_sampling_level="sequence", **batch)
    log_probs = batch["log_probs"].clone().requires_grad_(True)
    adv = trl.advantages[:, None].expand(4, 4)
    inputs = LossInputs(log_probs=log_probs, old_log_probs=old, advantages=adv, mask=mask,
                        row_data={"rank_grpo_item": torch.zeros(4, 4, dtype=torch.long)})
    policy = Composition([{"rank_grpo": {"num_items": 1, "epsilon_low": 0.2, "epsilon_high": 0.2}}]).run_loss_stage(inputs, None).policy
    torch.testing.assert_close(torch.where(mask > 0, policy, 0.0), trl.per_token_loss, rtol=1e-6, atol=1e-7)
    loss = (torch.where(mask > 0, policy, 0.0).sum(-1) / mask.sum(-1)).mean()  # loss_type='grpo'
    loss.backward()
    torch.testing.assert_close(log_probs.grad, trl.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss, trl.loss, rtol=1e-6, atol=1e-7)
