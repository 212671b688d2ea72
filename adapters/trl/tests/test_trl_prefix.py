"""The shared-prefix forward (``PluginGRPOConfig(shared_prefix=True)``, Prefix Grouper): per-token
log-probs and entropies equal to TRL's plain forward within 1e-5 (fp32) and parameter gradients
within 1e-5 relative, for Qwen2 and Llama, padded and unpadded prompts, groups of different sizes,
shuffled rows, ``num_iterations > 1``, a reference model and activation checkpointing; the settings
it cannot support are refused at start-up."""

from __future__ import annotations

import sys
from unittest import mock

import pytest
import torch
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import add_fused_lm_head

pytest.importorskip("prefix_grouper")

from grpo_plugins import Method, hookimpl  # noqa: E402
from grpo_plugins.errors import CompositionError  # noqa: E402
from grpo_plugins_trl import prefix  # noqa: E402
from grpo_plugins_trl.testing import (  # noqa: E402
    GradientRecorder, arithmetic_dataset, digit_overlap_reward, tiny_grpo_run, tiny_model, tiny_tokenizer,
)


def plain_log_probs(model, input_ids, attention_mask, width):
    """TRL's own forward (GRPOTrainer._get_per_token_logps_and_entropies, one chunk)."""
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :-width] = -100
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    return out.log_probs[:, -width:], out.entropy[:, -width:]


def make_rows(padded: bool, group_of_row: list[int], seed: int = 0):
    """Rows ``[prompt | completion]`` as TRL lays them out: prompts left-padded (``padded``: three prompt
    lengths), completions right-padded with ragged lengths (one empty), rows of a group not adjacent."""
    g = torch.Generator().manual_seed(seed)
    num_groups, p, c = max(group_of_row) + 1, 7, 6
    prompts = torch.randint(4, 16, (num_groups, p), generator=g)
    prompt_mask = torch.ones(num_groups, p, dtype=torch.long)
    if padded:
        for group, pads in zip(range(num_groups), [0, 3, 5, 1]):
            prompt_mask[group, :pads] = 0
    prompts = torch.where(prompt_mask.bool(), prompts, 0)
    rows = torch.tensor(group_of_row)
    n = len(rows)
    lengths = torch.randint(0, c + 1, (n,), generator=g)
    lengths[0], lengths[-1] = c, 0
    completion_mask = (torch.arange(c)[None, :] < lengths[:, None]).long()
    completions = torch.where(completion_mask.bool(), torch.randint(4, 16, (n, c), generator=g), 0)
    return torch.cat([prompts[rows], completions], 1), torch.cat([prompt_mask[rows], completion_mask], 1), c


@pytest.fixture(scope="module", autouse=True)
def grouped_attention():
    prefix.install_grouped_attention()


UNEVEN = [0, 1, 0, 2, 1, 1, 0, 3, 2, 1, 0, 1]  # groups of 4, 5, 2 and 1 rows, interleaved


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
def test_log_probs_entropies_and_gradients_equal_the_plain_forward(architecture, padded):
    model = tiny_model(0, hidden_size=64, num_layers=2, architecture=architecture)
    add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    model.train()
    input_ids, attention_mask, width = make_rows(padded, UNEVEN)
    weights = torch.randn(input_ids.shape[0], width, generator=torch.Generator().manual_seed(1))

    def run(forward):
        model.zero_grad()
        log_probs, entropies = forward(model, input_ids, attention_mask, width)
        ((log_probs * weights).sum() + entropies.sum()).backward()
        return log_probs.detach(), entropies.detach(), [p.grad.clone() for p in model.parameters()]

    with mock.patch.object(prefix, "grouped_attention", wraps=prefix.grouped_attention) as spy:
        shared = run(lambda *a: prefix.grouped_log_probs(*a, compute_entropy=True))
    assert spy.call_count == 2  # once per layer
    plain = run(plain_log_probs)
    torch.testing.assert_close(shared[0], plain[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(shared[1], plain[1], rtol=0, atol=1e-5)
    completion_mask = attention_mask[:, -width:].bool()
    assert bool((shared[0][~completion_mask] == 0).all()) and bool((shared[0][completion_mask] < 0).all())
    for grad_shared, grad_plain in zip(shared[2], plain[2], strict=True):
        assert (grad_shared - grad_plain).norm() <= 1e-5 * grad_plain.norm()


def test_the_prefix_is_encoded_once_per_group():
    """What makes it pay: the packed rows hold each prompt once plus one token per completion."""
    input_ids, attention_mask, width = make_rows(True, UNEVEN)
    model = tiny_model(0)
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    seen = {}

    def spy(*args, **kwargs):
        seen["ids"], seen["mask"] = kwargs["input_ids"], kwargs[prefix.GROUPER_KWARG].padding_mask
        return forward(*args, **kwargs)

    forward = model.forward
    with mock.patch.object(model, "forward", spy):
        prefix.grouped_log_probs(model, input_ids, attention_mask, width, compute_entropy=False)
    prompt_tokens = attention_mask[:, :-width].sum(1)
    group_prompts = {int(g): int(n) for g, n in zip(UNEVEN, prompt_tokens)}
    expected = sum(group_prompts.values()) - len(group_prompts) + len(UNEVEN) + int(attention_mask[:, -width:].sum())
    assert seen["ids"].shape[0] == len(group_prompts)  # one packed row per group
    assert int(seen["mask"].sum()) == expected
    assert expected < int(attention_mask.sum())


def test_wrapped_sdpa_is_unchanged_without_a_grouper():
    """Installing the grouped attention leaves every other forward bit for bit as it was."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = tiny_model(0)
    input_ids, attention_mask, _ = make_rows(True, UNEVEN)
    wrapped = model(input_ids=input_ids, attention_mask=attention_mask).logits
    original = ALL_ATTENTION_FUNCTIONS["sdpa"].grouped_attention_of
    with mock.patch.dict(ALL_ATTENTION_FUNCTIONS._global_mapping, {"sdpa": original}):
        unwrapped = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert torch.equal(wrapped, unwrapped)


def test_prompts_must_be_left_padded():
    input_ids, attention_mask, width = make_rows(True, UNEVEN)
    model = tiny_model(0)
    add_fused_lm_head(model)
    with pytest.raises(ValueError, match="left-padded prompts"):
        right_padded = attention_mask.clone()
        right_padded[:, :-width] = attention_mask[:, :-width].flip(1)
        prefix.grouped_log_probs(model, input_ids, right_padded, width, compute_entropy=False)


class UnevenBudgets(Method):
    """Rollout counts 3 and 5 (variable budgets): groups of different sizes in every micro-batch."""

    name = "uneven_budgets"

    @hookimpl
    def allocate_rollouts(self, round, prompt_ids):
        counts = torch.tensor([3, 5, 2, 6] * len(prompt_ids))[: len(prompt_ids)]
        counts[-1] += round.budget - int(counts.sum())
        return counts


def training(shared_prefix: bool, **overrides):
    recorder = GradientRecorder()
    settings = dict(max_steps=3, num_iterations=2, gradient_accumulation_steps=2, reward_funcs=digit_overlap_reward,
                    dataset=arithmetic_dataset(32, 0, max_digits=2), callbacks=[recorder])
    trainer = tiny_grpo_run(overrides.pop("plugins", None), shared_prefix=shared_prefix, **{**settings, **overrides})
    logs = [row for row in trainer.state.log_history if "loss" in row and "train_runtime" not in row]
    return trainer, logs, recorder.gradients


@pytest.mark.parametrize(
    "overrides",
    [
        dict(beta=0.05),
        dict(plugins=[UnevenBudgets()], loss_type="grpo", model_config=dict(architecture="llama")),
        dict(gradient_checkpointing=True, steps_per_generation=4),
    ],
    ids=["qwen2_reference_model", "llama_uneven_groups", "activation_checkpointing"],
)
def test_training_equals_the_plain_forward(overrides):
    """Whole runs with num_iterations=2 (old log-probs), every forward grouped: the same completions,
    losses within 1e-5 and gradients within 1e-5 relative of the plain run's."""
    with mock.patch.object(prefix, "grouped_log_probs", wraps=prefix.grouped_log_probs) as spy:
        shared, shared_logs, shared_grads = training(True, **dict(overrides))
    plain, plain_logs, plain_grads = training(False, **dict(overrides))
    passes = 3 if "beta" in overrides else 2  # old (and reference) log-probs, then the loss
    assert spy.call_count >= passes
    assert len(shared_logs) == len(plain_logs) == 3
    for a, b in zip(shared_logs, plain_logs):  # loss, kl, entropy, grad norm, rewards, lengths, ...
        assert set(a) == set(b)
        for key in set(b) - {"step_time"}:
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(b[key])), (key, a[key], b[key])
    assert any(row["loss"] != 0 for row in plain_logs)
    for step_shared, step_plain in zip(shared_grads, plain_grads, strict=True):
        for a, b in zip(step_shared, step_plain, strict=True):
            assert (a - b).norm() <= 1e-5 * b.norm() + 1e-12


def test_unsupported_settings_are_refused_at_start_up():
    with pytest.raises(CompositionError, match="attn_implementation='eager'"):
        tiny_grpo_run(None, train=False, shared_prefix=True, model_config=dict(attn_implementation="eager"))
    with pytest.raises(CompositionError, match="sliding-window"):
        tiny_grpo_run(None, train=False, shared_prefix=True,
                      model_config=dict(use_sliding_window=True, sliding_window=8))
    with mock.patch.dict(sys.modules, {"prefix_grouper": None}):
        with pytest.raises(CompositionError, match=r"grpo-plugins-trl\[prefix\]"):
            tiny_grpo_run(None, train=False, shared_prefix=True)
    with pytest.raises(ValueError, match="shared_prefix=True"):  # plain TRL would ignore the option
        from grpo_plugins_trl import PluginGRPOConfig

        args = PluginGRPOConfig(output_dir="unused", shared_prefix=True, use_cpu=True, bf16=False)
        GRPOTrainer(model=tiny_model(0), reward_funcs=digit_overlap_reward, args=args,
                    train_dataset=arithmetic_dataset(8), processing_class=tiny_tokenizer())
    assert not getattr(GRPOConfig(output_dir="unused", use_cpu=True, bf16=False), "shared_prefix", False)


def test_the_benchmark_step_runs_both_forwards():
    """benchmarks/prefix.py's timed step on a toy size (the benchmark itself: ``--quick``)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "benchmarks" / "prefix.py"
    spec = importlib.util.spec_from_file_location("prefix_benchmark", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    row = benchmark.timed_pair(dict(hidden=32, layers=1, prompt=16, completion=4, group=4), repeats=1)
    assert row["plain_s"] > 0 and row["shared_s"] > 0 and row["step_time_ratio"] > 0
