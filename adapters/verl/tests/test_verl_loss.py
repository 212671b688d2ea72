"""The ``grpo_plugins`` policy loss against verl's ``vanilla`` loss and verl's ``ppo_loss`` (real verl, CPU)."""

from __future__ import annotations

import pytest
import torch
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.utils import tensordict_utils as tu
from verl.workers.utils.losses import ppo_loss

import grpo_plugins_verl
from grpo_plugins import LossInputs, Method, hookimpl
from grpo_plugins_verl.loss import compute_grpo_plugins_policy_loss
from grpo_plugins_verl.testing import actor_config, isolate

MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@pytest.fixture(autouse=True)
def clean_runtime(monkeypatch):
    isolate(monkeypatch)
    yield
    grpo_plugins_verl.configure(None)


def micro_batch(seed=0, rows=6, tokens=5):
    """Old/new log-probs (ratios far outside the clip range included, so both clips and the dual clip
    fire), signed advantages and a right-padded bool mask with one fully masked row."""
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, tokens, generator=gen) * 3
    new = old + (torch.rand(rows, tokens, generator=gen) - 0.5) * 3
    advantages = torch.randn(rows, 1, generator=gen).expand(rows, tokens) * torch.rand(rows, tokens, generator=gen)
    lengths = torch.randint(1, tokens + 1, (rows,), generator=gen)
    lengths[2] = 0
    mask = torch.arange(tokens) < lengths[:, None]
    weights = torch.rand(rows, tokens, generator=gen) + 0.5
    return old, new, advantages.contiguous(), mask, weights


def run(loss_fn, config, old, new, advantages, mask, mode, weights=None):
    log_prob = new.clone().requires_grad_(True)
    loss, metrics = loss_fn(
        old_log_prob=old,
        log_prob=log_prob,
        advantages=advantages,
        response_mask=mask,
        loss_agg_mode=mode,
        config=config,
        rollout_is_weights=weights,
    )
    loss.backward()
    return loss.detach(), log_prob.grad, metrics


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("global_info", [False, True])
def test_no_method_equals_verl_vanilla_bit_for_bit(mode, global_info):
    old, new, advantages, mask, weights = micro_batch(seed=MODES.index(mode))
    for rollout_weights in (None, weights):
        configs = []
        for loss_mode in ("vanilla", "grpo_plugins"):
            config = actor_config(loss_mode, mode, clip_ratio_low=0.2, clip_ratio_high=0.28)
            if global_info:  # as ppo_loss sets it on a rank of a dp=2 job
                config.global_batch_info.update(dp_size=2, batch_num_tokens=37, global_batch_size=11, loss_scale_factor=None)
            configs.append(config)
        expected = run(get_policy_loss_fn("vanilla"), configs[0], old, new, advantages, mask, mode, rollout_weights)
        ours = run(get_policy_loss_fn("grpo_plugins"), configs[1], old, new, advantages, mask, mode, rollout_weights)
        assert torch.equal(ours[0], expected[0]), (mode, ours[0], expected[0])
        assert torch.equal(ours[1], expected[1])
        for key, value in expected[2].items():
            assert ours[2][key] == value


def test_through_verl_ppo_loss_matches_vanilla():
    """verl's actor loss function (``workers/utils/losses.ppo_loss``), unpadded log-probs and all."""
    old, new, advantages, mask, _ = micro_batch(seed=7, rows=4, tokens=5)
    mask[2, 0] = True  # ppo_loss needs a non-empty response per row
    prompt_len = 3
    lengths = mask.sum(1)
    flat = []
    for i in range(len(lengths)):  # model output of sequence i: position p predicts token p + 1
        seq = torch.zeros(prompt_len + int(lengths[i]))
        seq[prompt_len - 1 : prompt_len - 1 + int(lengths[i])] = new[i, : int(lengths[i])]
        flat.append(seq)
    attention = torch.cat([torch.ones(4, prompt_len, dtype=torch.long), mask.long()], dim=1)

    def loss_for(loss_mode):
        data = tu.get_tensordict(
            {
                "prompts": torch.ones(4, prompt_len, dtype=torch.long),
                "responses": torch.ones(4, 5, dtype=torch.long),
                "attention_mask": attention,
                "response_mask": mask.long(),
                "old_log_probs": old,
                "advantages": advantages,
            },
            non_tensor_dict={"dp_size": 1, "batch_num_tokens": int(mask.sum()), "global_batch_size": 4},
        )
        log_probs = torch.cat(flat).requires_grad_(True)
        config = actor_config(loss_mode, "token-mean")
        loss, metrics = ppo_loss(config, {"log_probs": log_probs}, data)
        loss.backward()
        return loss.detach(), log_probs.grad

    expected, ours = loss_for("vanilla"), loss_for("grpo_plugins")
    assert torch.equal(ours[0], expected[0]) and torch.equal(ours[1], expected[1])


class HalfGate(Method):
    name = "half_gate"

    @hookimpl
    def gate_loss(self, inputs: LossInputs):
        return torch.full_like(inputs.log_probs[:, :1], 0.5).detach()


class ConstantTerm(Method):
    name = "constant_term"

    @hookimpl
    def loss_terms(self, inputs: LossInputs):
        self.log_metric("seen_rows", inputs.log_probs.shape[0])
        return {"bonus": torch.full_like(inputs.log_probs, 0.25)}


class NegRatio(Method):
    name = "neg_ratio"

    @hookimpl
    def policy_surrogate(self, inputs: LossInputs):
        return -inputs.ratio * inputs.advantages


def test_gates_terms_and_surrogates_by_hand():
    old, new, advantages, mask, _ = micro_batch(seed=3)
    vanilla, *_ = run(get_policy_loss_fn("vanilla"), actor_config(), old, new, advantages, mask, "token-mean")
    grpo_plugins_verl.configure([HalfGate(), ConstantTerm()])
    loss, _, metrics = run(compute_grpo_plugins_policy_loss, actor_config(), old, new, advantages, mask, "token-mean")
    # token-mean of (0.5 * vanilla per-token loss) + token-mean of a constant 0.25
    torch.testing.assert_close(loss, 0.5 * vanilla + 0.25)
    assert metrics["plugins/constant_term/bonus"] == pytest.approx(0.25)
    assert metrics["plugins/constant_term/seen_rows"] == 6
    grpo_plugins_verl.configure([NegRatio()])
    loss, *_ = run(compute_grpo_plugins_policy_loss, actor_config(), old, new, advantages, mask, "token-sum")
    expected = (-torch.exp(new - old) * advantages)[mask].sum()
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_and_ranks_add_up_to_the_global_loss(mode):
    """With verl's global_batch_info, the per-(rank, micro-batch) losses sum to the global-batch loss
    (data-parallel gradients are averaged, hence the mean over ranks)."""
    grpo_plugins_verl.configure([HalfGate(), ConstantTerm()])
    old, new, advantages, mask, _ = micro_batch(seed=11, rows=8)
    full, *_ = run(compute_grpo_plugins_policy_loss, actor_config(loss_agg_mode=mode), old, new, advantages, mask, mode)
    info = dict(dp_size=2, batch_num_tokens=int(mask.sum()), global_batch_size=int(mask.any(1).sum()), loss_scale_factor=None)
    parts = []
    for rank_rows in (slice(0, 4), slice(4, 8)):
        rank_loss = 0.0
        for micro in (slice(0, 2), slice(2, 4)):
            rows = torch.arange(8)[rank_rows][micro]
            config = actor_config(loss_agg_mode=mode)
            config.global_batch_info.update(info)
            loss, *_ = run(compute_grpo_plugins_policy_loss, config, old[rows], new[rows], advantages[rows], mask[rows], mode)
            rank_loss = rank_loss + loss
        parts.append(rank_loss)
    torch.testing.assert_close(sum(parts) / 2, full)
