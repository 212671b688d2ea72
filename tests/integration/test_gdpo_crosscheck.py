"""GDPO against the trainers' own code: TRL's ``multi_objective_aggregation="normalize_then_sum"`` in one
real ``trl.GRPOTrainer`` step, and verl's ``gdpo`` advantage estimator on the same rewards."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("trl")
pytest.importorskip("verl")
pytest.importorskip("grpo_plugin_gdpo", reason="grpo-plugin-gdpo is not installed")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from trl import GRPOConfig  # noqa: E402
from trl.trainer.utils import nanstd  # noqa: E402, F401  (the helper TRL's normalize_then_sum uses)
from verl.trainer.ppo.core_algos import get_adv_estimator_fn  # noqa: E402

from grpo_plugins import Composition, GRPOBatch  # noqa: E402
from grpo_plugins_trl.testing import recording_trl  # noqa: E402


def batch_of(components, prompt_ids, weights=None) -> GRPOBatch:
    comps = torch.tensor(components, dtype=torch.float32)
    w = torch.ones(comps.shape[1]) if weights is None else torch.tensor(weights, dtype=torch.float32)
    return GRPOBatch(
        prompt_ids=torch.tensor(prompt_ids),
        rewards=torch.nan_to_num(comps, nan=0.0) @ w,
        reward_components=comps,
        reward_names=tuple(f"r{k}" for k in range(comps.shape[1])),
        reward_weights=w,
    )


def advantages(methods, batch, **config):
    return Composition(methods, **config).run_advantage_stage(batch).advantages


# ----------------------------------------------------------------- TRL's own computation
def _tiny_trl_trainer(reward_funcs, weights, out_dir):
    Recording = recording_trl()

    words = "a b c d e f g h".split()
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<bos>", "<eos>"] + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True,
            bos_token_id=2, eos_token_id=3, pad_token_id=0,
        )
    )
    model.generation_config.eos_token_id = 3
    data = Dataset.from_dict({"prompt": ["a b", "c d", "e f", "g h"]})
    args = GRPOConfig(
        output_dir=str(out_dir), use_cpu=True, bf16=False, gradient_checkpointing=False,
        per_device_train_batch_size=4, num_generations=4, gradient_accumulation_steps=3, max_completion_length=6,
        max_steps=1, learning_rate=1e-4, logging_steps=1, report_to="none", save_strategy="no", beta=0.0,
        multi_objective_aggregation="normalize_then_sum", reward_weights=list(weights), seed=0,
    )
    return Recording(model=model, reward_funcs=reward_funcs, args=args, train_dataset=data, processing_class=tokenizer)


def _count(letter):
    def reward(completions, **kwargs):
        return [float(c.split().count(letter)) for c in completions]

    reward.__name__ = f"count_{letter}"
    return reward


def _length(completions, **kwargs):
    return [0.5 * len(c.split()) for c in completions]


def test_equals_trl_normalize_then_sum(tmp_path):
    """One real TRL step with two reward functions: TRL's GDPO advantages == ours on its own rewards."""
    trainer = _tiny_trl_trainer([_count("a"), _length], (1.0, 0.5), tmp_path)
    trainer.train()
    rewards = trainer.recorded_rewards  # (12, 2), groups are consecutive blocks of num_generations
    assert rewards.shape == (12, 2)
    groups = torch.arange(12) // 4
    spread = rewards.view(3, 4, 2).std(dim=1)
    assert bool((spread > 0).any()), "degenerate rollout: every reward is constant within its group"
    batch = GRPOBatch(
        prompt_ids=groups, rewards=rewards @ torch.tensor([1.0, 0.5]), reward_components=rewards,
        reward_weights=torch.tensor([1.0, 0.5]),
    )
    ours = advantages(["gdpo"], batch)
    torch.testing.assert_close(ours, trainer.recorded_advantages, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------- verl's gdpo estimator
def _verl_gdpo(components, index, lengths, epsilon):
    n, k = components.shape
    t = int(max(lengths))
    response_mask = (torch.arange(t) < torch.tensor(lengths)[:, None]).float()
    prompt = torch.ones(n, 2, dtype=torch.long)
    keys = [f"r{j}" for j in range(k)]
    fn = get_adv_estimator_fn("gdpo")
    adv, _ = fn(
        token_level_rewards=torch.zeros(n, t),
        response_mask=response_mask,
        index=np.array(index),
        epsilon=epsilon,
        config={"gdpo_reward_keys": keys},
        non_tensor_batch={key: components[:, j].numpy() for j, key in enumerate(keys)},
        batch={"prompts": prompt, "attention_mask": torch.cat([torch.ones(n, 2), response_mask], 1).long()},
    )
    return adv, response_mask


def test_matches_verl_gdpo_on_one_token_responses():
    """With one token per response verl's token-level whitening is the sequence-level batch z-score;
    only the epsilon placement differs ((x - m) * rsqrt(var + 1e-8) vs (x - m) / (std + 1e-4))."""
    comps = torch.tensor([[1.0, 0], [0, 1], [0, 1], [0, 0], [1, 1], [0, 1], [1, 0], [1, 0]])
    index = [0, 0, 0, 0, 1, 1, 1, 1]
    verl_adv, _ = _verl_gdpo(comps, index, [1] * 8, epsilon=1e-4)
    ours = advantages(["gdpo"], batch_of(comps.tolist(), index))
    torch.testing.assert_close(verl_adv[:, 0], ours, atol=2e-4, rtol=2e-4)


def test_verl_whitens_over_tokens_so_equal_lengths_rescale():
    """verl's unbiased token-level std over N*L tokens of L equal-length responses differs from the
    sequence-level one by sqrt((N L - 1) / (L (N - 1))); the direction and the mean are the same."""
    comps = torch.tensor([[1.0, 0], [0, 1], [0, 1], [0, 0], [1, 1], [0, 1], [1, 0], [1, 0]])
    index = [0, 0, 0, 0, 1, 1, 1, 1]
    n, length = 8, 5
    verl_adv, mask = _verl_gdpo(comps, index, [length] * n, epsilon=1e-4)
    ours = advantages(["gdpo"], batch_of(comps.tolist(), index))
    scale = math.sqrt((n * length - 1) / (length * (n - 1)))
    torch.testing.assert_close(verl_adv, ours[:, None] * scale * mask, atol=5e-4, rtol=5e-4)
