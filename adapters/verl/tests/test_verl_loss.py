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
from grpo_plugins_verl.testing import actor_config

MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


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


def actor_micro_batch(extra=None, step=None, prompt_len=3, rows=4, tokens=5, seed=11):
    """One actor micro-batch as verl's engine hands it to the loss: nested fields from TransferQueue."""
    from grpo_plugins_verl.loss import STEP

    old, new, advantages, mask, _ = micro_batch(seed=seed, rows=rows, tokens=tokens)
    mask[:, 0] = True
    lengths = mask.sum(1)
    flat = []
    for i in range(rows):
        seq = torch.zeros(prompt_len + int(lengths[i]))
        seq[prompt_len - 1 : prompt_len - 1 + int(lengths[i])] = new[i, : int(lengths[i])]
        flat.append(seq)
    mask = torch.arange(tokens) < lengths[:, None]  # contiguous responses, as verl's are
    fields = {
        "prompts": torch.ones(rows, prompt_len, dtype=torch.long),
        "responses": torch.ones(rows, tokens, dtype=torch.long),
        "attention_mask": torch.cat([torch.ones(rows, prompt_len, dtype=torch.long), mask.long()], dim=1),
        "response_mask": mask.long(),
        "old_log_probs": old,
        "advantages": advantages,
        "ref_log_prob": old - 0.1,
        **(extra or {}),
    }
    info = {"dp_size": 1, "batch_num_tokens": int(mask.sum()), "global_batch_size": rows}
    if step is not None:
        info[STEP] = step
    return tu.get_tensordict(fields, non_tensor_dict=info), flat, mask


def test_installed_actor_loss_equals_verl_ppo_loss_without_methods():
    from grpo_plugins_verl.loss import grpo_plugins_ppo_loss

    results = []
    for loss_fn, mode in ((ppo_loss, "vanilla"), (grpo_plugins_ppo_loss, "grpo_plugins")):
        data, flat, _ = actor_micro_batch()
        log_probs = torch.cat(flat).requires_grad_(True)
        config = actor_config(mode, "seq-mean-token-mean", use_kl_loss=True, kl_loss_coef=0.3)
        loss, metrics = loss_fn(config, {"log_probs": log_probs}, data)
        loss.backward()
        results.append((loss.detach(), log_probs.grad, metrics))
    (expected, expected_grad, verl_metrics), (ours, our_grad, our_metrics) = results
    assert torch.equal(ours, expected) and torch.equal(our_grad, expected_grad)
    for key in ("actor/pg_loss", "actor/ppo_kl", "actor/pg_clipfrac", "kl_loss"):
        assert our_metrics[key].aggregate() == verl_metrics[key].aggregate()


class Recorder(Method):
    """Records what the loss hooks receive and replaces the surrogate (so clip metrics are 0)."""

    name = "recorder"
    seen: dict = {}

    @hookimpl
    def policy_surrogate(self, inputs: LossInputs):
        Recorder.seen.update(
            step=inputs.step, row=inputs.row_data["per_row"].clone(), token=inputs.row_data["per_token"].clone(),
            entropies=inputs.entropies, ref=inputs.ref_log_probs, mask=inputs.mask.clone(),
        )
        return -inputs.ratio * inputs.advantages

    @hookimpl
    def loss_terms(self, inputs: LossInputs):
        return {"one": torch.ones_like(inputs.log_probs)}


def test_installed_actor_loss_gets_row_data_entropies_reference_and_step():
    from grpo_plugins_verl.loss import ROW_PREFIX, TOKEN_WEIGHTS, grpo_plugins_ppo_loss

    grpo_plugins_verl.configure([Recorder()])
    rows, tokens = 4, 5
    _, _, mask = actor_micro_batch()
    lengths = mask.sum(1)
    per_token = torch.arange(rows * tokens, dtype=torch.float32).view(rows, tokens)
    weights = torch.ones(rows, tokens)
    weights[0, 0] = 0.0  # a dropped token: zero loss, still in the normaliser
    nested = lambda x: torch.nested.as_nested_tensor([x[i, : int(lengths[i])] for i in range(rows)], layout=torch.jagged)  # noqa: E731
    extra = {ROW_PREFIX + "per_row": torch.tensor([1.0, 2.0, 3.0, 4.0]), ROW_PREFIX + "per_token": nested(per_token),
             TOKEN_WEIGHTS: nested(weights)}
    data, flat, _ = actor_micro_batch(extra, step=7)
    log_probs = torch.cat(flat).requires_grad_(True)
    entropy = torch.cat(flat).abs() + 1.0
    config = actor_config("grpo_plugins", "token-mean", use_kl_loss=True, kl_loss_coef=0.0)
    loss, metrics = grpo_plugins_ppo_loss(config, {"log_probs": log_probs, "entropy": entropy}, data)
    seen = Recorder.seen
    assert seen["step"] == 7 and torch.equal(seen["row"], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.equal(seen["token"], torch.where(mask, per_token, 0.0))
    assert seen["entropies"] is not None and seen["ref"] is not None
    assert torch.equal(seen["mask"], mask.float())  # the normaliser: verl's response mask, weights not in it
    assert metrics["actor/pg_clipfrac"].aggregate() == 0.0 and "actor/ppo_kl" in metrics
    # the term is aggregated like the policy loss and logged like actor/pg_loss (summed over micro-batches)
    assert metrics["plugins/recorder/one"].aggregation.value == "sum"
    assert metrics["plugins/recorder/one"].aggregate() == pytest.approx(1.0)
    from verl.workers.utils.padding import no_padding_2_padding

    padded = no_padding_2_padding(log_probs, data).detach()
    old_lp, adv = (data[k].to_padded_tensor(0.0) if data[k].is_nested else data[k] for k in ("old_log_probs", "advantages"))
    policy = torch.where(mask, -torch.exp(padded - old_lp) * adv * weights, 0.0)
    torch.testing.assert_close(loss.detach(), policy.sum() / mask.sum() + 1.0)  # |o| counts the weight-0 token


def test_term_metrics_of_the_registered_loss_are_micro_batch_means():
    grpo_plugins_verl.configure([ConstantTerm()])
    old, new, advantages, mask, _ = micro_batch(seed=3)
    config = actor_config("grpo_plugins", "token-mean")
    config.global_batch_info.update(dp_size=1, batch_num_tokens=int(mask.sum()) * 3, global_batch_size=18)
    _, metrics = compute_grpo_plugins_policy_loss(old, new, advantages, mask, "token-mean", config)
    assert metrics["plugins/constant_term/bonus"] == pytest.approx(0.25)  # not 0.25 / 3 for 3 micro-batches


class Refuses(Method):
    """A gate that fails when called: the methods must not run on a micro-batch without a response token."""

    name = "refuses"

    @hookimpl
    def gate_loss(self, inputs: LossInputs):
        raise AssertionError("the loss hooks ran on a micro-batch without a response token")


def test_a_micro_batch_without_response_tokens_is_verl_vanilla_without_the_methods():
    grpo_plugins_verl.configure([Refuses()])
    old, new, advantages, mask, _ = micro_batch(seed=5)
    empty = torch.zeros_like(mask)
    config = actor_config("grpo_plugins", "seq-mean-token-mean")
    config.global_batch_info.update(dp_size=1, batch_num_tokens=10, global_batch_size=6)
    ours = run(compute_grpo_plugins_policy_loss, config, old, new, advantages, empty, "seq-mean-token-mean")
    verl = run(get_policy_loss_fn("vanilla"), config, old, new, advantages, empty, "seq-mean-token-mean")
    assert torch.equal(ours[0], verl[0]) and torch.equal(ours[1], verl[1]) and ours[0] == 0
