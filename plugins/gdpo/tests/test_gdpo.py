"""GDPO: hand-computed numbers from the method card, edge cases, and agreement with TRL's and verl's code."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_plugins import Composition, GRPOBatch
from grpo_plugins.errors import BatchError, PluginError

CARD_COMPONENTS = [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 0.0]]  # (correct, format), G = 4


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


def test_card_worked_example_and_grpo_contrast():
    gdpo = advantages(["gdpo"], batch_of(CARD_COMPONENTS, [7, 7, 7, 7]))
    # hand numbers from the card: S = [0.634, 0.366, 0.366, -1.366] -> A = [0.689, 0.398, 0.398, -1.486]
    assert gdpo.tolist() == pytest.approx([0.689, 0.398, 0.398, -1.486], abs=1e-3)
    grpo = advantages([], batch_of(CARD_COMPONENTS, [7, 7, 7, 7]))
    assert grpo.tolist() == pytest.approx([0.5, 0.5, 0.5, -1.5], abs=1e-4)
    # the distinguishing property: (1, 0) and (0, 1) collapse under GRPO, not under GDPO
    assert grpo[0] == pytest.approx(grpo[1].item(), abs=1e-6)
    assert gdpo[0] - gdpo[1] > 0.25


def test_card_example_pre_batch_sum():
    batch = batch_of(CARD_COMPONENTS, [7, 7, 7, 7])
    summed = advantages([{"gdpo": {"batch_normalize": False}}], batch)
    assert summed.tolist() == pytest.approx([0.634, 0.366, 0.366, -1.366], abs=1e-3)


def test_uneven_groups_hand_numbers():
    # group 3 (size 2): correct [1, 0] -> +-0.707, format constant -> 0.
    # group 9 (size 3): correct [0, 0, 1] -> [-0.577, -0.577, 1.154], format [1, 0, 0] -> [1.154, -0.577, -0.577].
    # S = [0.707, -0.707, 0.577, -1.154, 0.577]: mean 0, unbiased std 0.8659 -> A = S / 0.8660.
    comps = [[1, 0], [0, 0], [0, 1], [0, 0], [1, 0]]
    ids = [3, 3, 9, 9, 9]
    order = [2, 0, 4, 1, 3]  # shuffled positions: groups are formed by prompt id, not position
    adv = advantages(["gdpo"], batch_of([comps[i] for i in order], [ids[i] for i in order]))
    expected = [0.8164, -0.8164, 0.6666, -1.3332, 0.6666]
    assert adv.tolist() == pytest.approx([expected[i] for i in order], abs=1e-3)


def test_zero_variance_groups_contribute_zero():
    # group 1 is constant in both components: its S is exactly 0; the batch then holds only group 2's spread.
    batch = batch_of([[1, 1], [1, 1], [1, 0], [0, 0]], [1, 1, 2, 2])
    summed = advantages([{"gdpo": {"batch_normalize": False}}], batch)
    assert summed[:2].tolist() == [0.0, 0.0]
    assert summed[2:].tolist() == pytest.approx([0.7070, -0.7070], abs=1e-3)
    # an all-constant batch gives all-zero (finite) advantages
    flat = advantages(["gdpo"], batch_of([[0.3, 1], [0.3, 1], [0.7, 0], [0.7, 0]], [1, 1, 2, 2]))
    assert flat.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_group_of_one_is_a_clear_error():
    with pytest.raises(PluginError, match=r"gdpo.*at least 2 completions.*\[5\]"):
        advantages(["gdpo"], batch_of([[1, 0], [0, 1], [0, 0]], [4, 4, 5]))


def test_nan_component_counts_as_zero_and_inf_is_an_error():
    nan = float("nan")
    with_nan = advantages(["gdpo"], batch_of([[1, nan], [0, 1], [0, 1], [0, nan]], [7, 7, 7, 7]))
    with_zero = advantages(["gdpo"], batch_of([[1, 0], [0, 1], [0, 1], [0, 0]], [7, 7, 7, 7]))
    assert torch.equal(with_nan, with_zero)
    with pytest.raises(PluginError, match="inf"):
        advantages(["gdpo"], batch_of([[1, math.inf], [0, 1], [0, 1], [0, 0]], [7, 7, 7, 7]))
    bad = batch_of(CARD_COMPONENTS, [7, 7, 7, 7])
    bad.rewards = torch.tensor([1.0, nan, 1.0, 0.0])
    with pytest.raises(BatchError, match="NaN"):
        advantages(["gdpo"], bad)


def test_weights_scale_components_before_the_batch_step():
    # weight 3 on format: S = [1.5 - 3*0.866, -0.5 + 3*0.866, ...]; the batch z-score keeps the order
    summed = advantages([{"gdpo": {"batch_normalize": False}}], batch_of(CARD_COMPONENTS, [7] * 4, weights=[1.0, 3.0]))
    assert summed.tolist() == pytest.approx([-1.098, 2.098, 2.098, -3.098], abs=1e-3)


def test_single_reward_falls_back_to_grpo_like_the_paper_code():
    batch = GRPOBatch(prompt_ids=torch.tensor([1, 1, 1, 1, 2, 2]), rewards=torch.tensor([1.0, 0, 0, 0, 2, 0]))
    adv = advantages(["gdpo"], batch)
    assert adv.tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5, 0.7070, -0.7070], abs=1e-3)
    # 'gdpo' mode adds the batch z-score: mean 0, unbiased std sqrt((2.25 + 3 * 0.25 + 2 * 0.5) / 5) = 0.8943
    full = advantages([{"gdpo": {"single_reward": "gdpo"}}], batch)
    assert full.tolist() == pytest.approx([1.677, -0.559, -0.559, -0.559, 0.7906, -0.7906], abs=1e-3)


def test_metrics_and_stateless_round_trip(tmp_path):
    comp = Composition(["gdpo"])
    comp.run_advantage_stage(batch_of(CARD_COMPONENTS, [7] * 4))
    metrics = comp.pop_metrics()
    assert metrics["plugins/gdpo/distinct_advantages_per_group"] == 3.0
    assert comp.state_dict() == {}
    comp.save(tmp_path / "state.pt")
    comp.load(tmp_path / "state.pt")


# ----------------------------------------------------------------- TRL's own computation
def _tiny_trl_trainer(reward_funcs, weights, out_dir):
    from datasets import Dataset
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    class Recording(GRPOTrainer):
        """Records the gathered per-function rewards and the advantages TRL computes from them."""

        def _calculate_rewards(self, *args, **kwargs):
            self.recorded_rewards = super()._calculate_rewards(*args, **kwargs)
            return self.recorded_rewards

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            self.recorded_advantages = out["advantages"].clone()
            return out

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
    from trl.trainer.utils import nanstd  # noqa: F401  (the helper TRL's normalize_then_sum uses)

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
    import numpy as np
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

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


# ----------------------------------------------------------------- short real trainer runs (TRL adapter)
def _finite_losses(trainer):
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return bool(losses) and all(math.isfinite(float(x)) for x in losses)


@pytest.mark.parametrize(
    "methods", [["gdpo"], ["gdpo", {"scaf_grpo": {"warmup_steps": 0}}]], ids=["alone", "with_scaf_grpo"]
)
def test_tiny_trl_run(methods):
    testing = pytest.importorskip("grpo_plugins_trl.testing")
    from grpo_plugin_gdpo import gdpo_advantages

    dataset = testing.arithmetic_dataset(8).map(
        lambda row: {"hint_knowledge": "1", "hint_planning": "2", "hint_solution": row["answer"]}
    )
    trainer = testing.tiny_grpo_run(
        methods, max_steps=2, dataset=dataset, reward_funcs=[testing.exact_answer_reward, testing.digit_overlap_reward]
    )
    assert _finite_losses(trainer)
    assert any("plugins/gdpo/distinct_advantages_per_group" in row for row in trainer.state.log_history)
    batch = trainer.last_plugin_batch  # the global batch the loss used
    expected = gdpo_advantages(batch.reward_components, batch.reward_weights, batch.group_index, batch.num_groups)
    torch.testing.assert_close(batch.advantages, expected)
