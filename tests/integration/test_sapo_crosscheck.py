"""SAPO against the trainers' own SAPO losses on the same inputs: verl's ``sapo`` policy loss (loss and
gradient) and TRL 1.16's inline SAPO in a real ``trl.GRPOTrainer._compute_loss`` (loss and parameter
gradients)."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
trl = pytest.importorskip("trl")
core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
pytest.importorskip("grpo_plugin_sapo", reason="grpo-plugin-sapo is not installed")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from verl.workers.config.actor import ActorConfig  # noqa: E402

from grpo_plugins import Composition, LossInputs  # noqa: E402
from grpo_plugins.ops import masked_mean  # noqa: E402


def seq_mean_token_mean(loss: torch.Tensor, mask: torch.Tensor, count_empty_rows: bool = False) -> torch.Tensor:
    """Mean over rows of each row's token mean. verl skips rows without tokens; TRL counts them (as 0)."""
    per_row = masked_mean(loss, mask, dim=-1)
    if count_empty_rows:
        return per_row.mean()
    has_tokens = (mask.sum(-1) > 0).to(loss.dtype)
    return (per_row * has_tokens).sum() / has_tokens.sum()


def loss_inputs(log_probs, old_log_probs, advantages, mask) -> LossInputs:
    return LossInputs(log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages, mask=mask)


def random_case(seed: int = 0, rows: int = 6, tokens: int = 7):
    """Off-policy inputs with uneven lengths, one row without tokens, and a zero advantage."""
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, tokens, generator=gen) * 4
    log_probs = old + torch.randn(rows, tokens, generator=gen) * 0.8
    log_probs[0, 0] = old[0, 0] + 30.0  # beyond the clamp
    log_probs[1, 1] = old[1, 1] - 30.0
    lengths = torch.tensor([7, 5, 3, 1, 0, 6])[:rows]
    mask = (torch.arange(tokens) < lengths[:, None]).float()
    adv = torch.tensor([1.3, -0.7, 0.0, 2.0, 0.5, -1.1])[:rows, None].expand(rows, tokens).contiguous()
    return log_probs, old, adv, mask


# ----------------------------------------------------------------------------- verl's real sapo loss
@pytest.fixture(scope="module")
def verl_sapo():
    def run(old, log_probs, adv, mask, tau_pos=1.0, tau_neg=1.05):
        config = ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=4, tau_pos=tau_pos, tau_neg=tau_neg)
        loss, _ = core_algos.get_policy_loss_fn("sapo")(
            old_log_prob=old, log_prob=log_probs, advantages=adv, response_mask=mask.bool(),
            loss_agg_mode="seq-mean-token-mean", config=config, rollout_is_weights=None,
        )
        return loss

    return run


@pytest.mark.parametrize("tau_pos, tau_neg", [(1.0, 1.05), (0.6, 1.7)])
def test_equals_verl_sapo_loss_and_gradient(verl_sapo, tau_pos, tau_neg):
    log_probs, old, adv, mask = random_case()
    ours_lp = log_probs.clone().requires_grad_(True)
    verl_lp = log_probs.clone().requires_grad_(True)
    method = {"sapo": {"tau_pos": tau_pos, "tau_neg": tau_neg}}
    parts = Composition([method]).run_loss_stage(loss_inputs(ours_lp, old, adv, mask), trainer_surrogate=None)
    ours = seq_mean_token_mean(parts.policy * mask, mask)
    theirs = verl_sapo(old, verl_lp, adv, mask, tau_pos, tau_neg)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_lp.grad, verl_lp.grad * mask, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- TRL's real sapo loss
@pytest.fixture(scope="module")
def trl_sapo_trainer():
    """A real ``trl.GRPOTrainer`` with ``loss_type="sapo"`` over a tiny random Qwen2 model (built locally)."""
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<eos>", *"0123456789+="])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", padding_side="left"
    )
    config = Qwen2Config(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True, pad_token_id=0, eos_token_id=2,
    )
    torch.manual_seed(0)
    args = trl.GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="sapo_trl_"), loss_type="sapo", use_cpu=True, beta=0.0,
        per_device_train_batch_size=4, num_generations=4, max_completion_length=4, report_to="none",
    )
    trainer = trl.GRPOTrainer(
        model=Qwen2ForCausalLM(config), reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
        train_dataset=Dataset.from_dict({"prompt": ["1 + 2 ="] * 4}), processing_class=tokenizer,
    )
    trainer.model.eval()  # eval mode: TRL divides by no gradient-accumulation count
    return trainer


def test_equals_trl_sapo_loss_and_gradient(trl_sapo_trainer):
    """TRL 1.16 computes SAPO inline in ``GRPOTrainer._compute_loss`` (no reusable function), so the
    comparison runs that real method on crafted inputs and checks loss and parameter gradients."""
    trainer = trl_sapo_trainer
    model = trainer.model
    gen = torch.Generator().manual_seed(1)
    rows, prompt_len, tokens = 4, 2, 5
    inputs = dict(
        prompt_ids=torch.randint(3, 15, (rows, prompt_len), generator=gen),
        prompt_mask=torch.ones(rows, prompt_len, dtype=torch.long),
        completion_ids=torch.randint(3, 15, (rows, tokens), generator=gen),
        completion_mask=(torch.arange(tokens) < torch.tensor([[5], [2], [4], [0]])).long(),  # last row: no tokens
        advantages=torch.tensor([1.2, -0.8, 0.0, 2.5]),
    )
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        current, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, attention, tokens)
    drift = torch.randn(rows, tokens, generator=gen) * 0.7
    drift[0, 1] = 15.0  # r = exp(-15): far off-policy, inside the clamp
    inputs["old_per_token_logps"] = current + drift

    model.zero_grad()
    theirs = trainer._compute_loss(model, dict(inputs))
    theirs.backward()
    trl_grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    log_probs, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, attention, tokens)
    mask = inputs["completion_mask"].float()
    adv = inputs["advantages"][:, None].expand(rows, tokens)
    parts = Composition(["sapo"]).run_loss_stage(
        loss_inputs(log_probs, inputs["old_per_token_logps"], adv, mask), trainer_surrogate=None
    )
    ours = seq_mean_token_mean(parts.policy * mask, mask, count_empty_rows=True)
    ours.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    # TRL's "sapo" aggregation divides by every row of the micro-batch, verl's only by rows with tokens
    verl_style = seq_mean_token_mean(parts.policy.detach() * mask, mask)
    torch.testing.assert_close(verl_style * 3 / 4, theirs.detach(), rtol=1e-6, atol=1e-7)
    for ours_grad, trl_grad in zip((p.grad for p in model.parameters()), trl_grads):
        torch.testing.assert_close(ours_grad, trl_grad, rtol=1e-5, atol=1e-7)
