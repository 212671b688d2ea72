"""A tiny, fully local GRPO setup for tests: a word-level tokenizer, a random 2-layer Qwen2 model,
an arithmetic dataset with a 0/1 exact-answer reward, and :func:`tiny_grpo_run`, which trains
:class:`~grpo_plugins_trl.PluginGRPOTrainer` for a few steps on CPU in fp32.

Nothing is downloaded: the tokenizer and model are built from configs. A 2-step run takes a few
seconds on one CPU core.

Example::

    from grpo_plugins_trl.testing import tiny_grpo_run

    trainer = tiny_grpo_run(["spo"], max_steps=2)
    assert any(key.startswith("plugins/spo/") for row in trainer.state.log_history for key in row)
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # any accidental hub lookup fails fast
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
WORDS = tuple("0123456789") + ("+", "=")


def tiny_tokenizer():
    """A word-level tokenizer over the digits, ``+`` and ``=``; digits are split one per token.

    Decoding joins tokens with spaces; :func:`exact_answer_reward` ignores whitespace.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True)]
    )
    core.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left",
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    )
    return tokenizer


def tiny_model(
    seed: int = 0, hidden_size: int = 32, num_layers: int = 2, architecture: str = "qwen2",
    max_positions: int = 64, **config_overrides: Any,
):
    """A randomly initialised causal LM (default: Qwen2, hidden 32, 2 layers) over :func:`tiny_tokenizer`'s
    vocabulary. ``architecture``: ``"qwen2"`` or ``"llama"``; ``config_overrides``: any field of the
    model config (e.g. ``attn_implementation``)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
    config_cls, model_cls = classes[architecture]
    tokenizer = tiny_tokenizer()
    config = config_cls(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **config_overrides,
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def arithmetic_dataset(n: int = 32, seed: int = 0, max_digits: int = 1):
    """``n`` addition problems ``"a + b ="`` with operands of up to ``max_digits`` digits.

    Columns: ``prompt`` (str), ``answer`` (str, the sum), ``prompt_id`` (int, the row index).
    """
    from datasets import Dataset

    rng = random.Random(seed)
    high = 10**max_digits - 1
    pairs = [(rng.randint(0, high), rng.randint(0, high)) for _ in range(n)]
    return Dataset.from_dict(
        {
            "prompt": [f"{a} + {b} =" for a, b in pairs],
            "answer": [str(a + b) for a, b in pairs],
            "prompt_id": list(range(n)),
        }
    )


def completion_text(completion: Any) -> str:
    """The text of a completion (a string, or a chat message list), whitespace removed."""
    if isinstance(completion, list):
        completion = completion[-1]["content"] if completion else ""
    return "".join(str(completion).split())


def supervised_batch(tokenizer, problems: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, labels, attention_mask)``, each ``(n, width)``, for supervised warm-starting on
    ``prompt answer <eos>`` with the loss on the answer tokens only (labels -100 elsewhere); right-padded.

    ``problems``: objects with ``prompt`` and ``answer`` strings (e.g. :func:`arithmetic_dataset`'s rows).
    """
    encoded = [
        (tokenizer(p.prompt)["input_ids"], tokenizer(p.answer)["input_ids"] + [tokenizer.eos_token_id]) for p in problems
    ]
    width = max(len(q) + len(a) for q, a in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
    labels = torch.full((len(encoded), width), -100)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (q, a) in enumerate(encoded):  # data preparation, once
        seq = q + a
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, len(q) : len(seq)] = torch.tensor(a)
        attention[row, : len(seq)] = 1
    return ids, labels, attention


def exact_answer_reward(completions: Sequence[Any], answer: Sequence[str], **kwargs: Any) -> list[float]:
    """1.0 where the completion (whitespace ignored) equals the answer, else 0.0."""
    return [float(completion_text(c) == str(a)) for c, a in zip(completions, answer)]


def digit_overlap_reward(completions: Sequence[Any], answer: Sequence[str], **kwargs: Any) -> list[float]:
    """A dense reward for tests: the fraction of the answer's characters found, position by position,
    at the start of the completion, minus 0.01 per extra character (varies even for a random model)."""
    out = []
    for c, a in zip(completions, answer):
        text, a = completion_text(c), str(a)
        hits = sum(x == y for x, y in zip(text, a))
        out.append(hits / len(a) - 0.01 * max(len(text) - len(a), 0))
    return out


class GradientRecorder:
    """A ``TrainerCallback`` keeping a copy of every parameter's gradient before each optimiser step."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Recorder(TrainerCallback):
            def __init__(self):
                self.gradients: list[list[torch.Tensor]] = []

            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                self.gradients.append(
                    [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
                )

        return _Recorder()


def finite_losses(trainer: Any) -> bool:
    """Whether a trained run logged at least one loss and every logged loss is finite."""
    import math

    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return bool(losses) and all(math.isfinite(float(x)) for x in losses)


def recording_trl() -> type:
    """TRL's own ``GRPOTrainer``, keeping the gathered per-function rewards of the latest batch
    (``recorded_rewards``, ``(N, F)``) and the advantages TRL computed from them (``recorded_advantages``)."""
    from trl import GRPOTrainer

    class RecordingTRL(GRPOTrainer):
        def _calculate_rewards(self, *args, **kwargs):
            self.recorded_rewards = super()._calculate_rewards(*args, **kwargs)
            return self.recorded_rewards

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            self.recorded_advantages = out["advantages"].clone()
            return out

    return RecordingTRL


def tiny_grpo_run(
    plugins: Any = None,
    *,
    max_steps: int = 2,
    seed: int = 0,
    trainer_cls: type | None = None,
    reward_funcs: Callable | Sequence[Callable] | None = None,
    dataset: Any = None,
    callbacks: Sequence[Any] | None = None,
    resume_from_checkpoint: str | bool | None = None,
    train: bool = True,
    model_config: dict | None = None,
    rollout_func: Callable | None = None,
    **grpo_config_overrides: Any,
):
    """Train the tiny model for ``max_steps`` optimiser steps on CPU in fp32 and return the trainer.

    Args:
        plugins: the method list (``["ngrpo", {"unlikeliness": {"rank_penalty": 0.5}}, MethodInstance]``); ``None`` with
            ``trainer_cls`` given trains that class (e.g. plain ``trl.GRPOTrainer``) without plugins.
        max_steps: optimiser steps.
        seed: seed of the model initialisation, the dataset and the trainer.
        trainer_cls: the trainer class; defaults to :class:`~grpo_plugins_trl.PluginGRPOTrainer`.
        reward_funcs: reward function(s); defaults to :func:`exact_answer_reward`.
        dataset: the training dataset; defaults to ``arithmetic_dataset(32, seed)``.
        callbacks: extra ``TrainerCallback`` objects.
        resume_from_checkpoint: passed to ``trainer.train``.
        train: False returns the trainer without training.
        model_config: keyword arguments of :func:`tiny_model` (``hidden_size``, ``num_layers``,
            ``architecture``, ...); the defaults give the 2-layer, hidden-32 Qwen2 model.
        rollout_func: TRL's ``rollout_func`` (e.g. a multi-turn environment's), passed to the trainer.
        **grpo_config_overrides: any ``GRPOConfig`` field (``loss_type``, ``beta``, ``num_iterations``, ...).
            ``beta > 0`` saves the model to a temporary folder and passes its path, because TRL builds
            the reference model from the policy's path.
    """
    from trl import GRPOConfig

    from grpo_plugins_trl.trainer import PluginGRPOConfig, PluginGRPOTrainer

    if trainer_cls is None:
        trainer_cls = PluginGRPOTrainer
    plugin_trainer = issubclass(trainer_cls, PluginGRPOTrainer)
    config_cls = PluginGRPOConfig if plugin_trainer else GRPOConfig
    if not plugin_trainer and plugins is not None:
        raise ValueError("plugins need a PluginGRPOTrainer subclass as trainer_cls")
    if "output_dir" not in grpo_config_overrides:
        grpo_config_overrides["output_dir"] = tempfile.mkdtemp(prefix="grpo_plugins_trl_")
    settings = dict(
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=4, num_generations=4, gradient_accumulation_steps=2,
        max_completion_length=6, learning_rate=1e-3, logging_steps=1, report_to="none",
        save_strategy="no", seed=seed, data_seed=seed, dataloader_num_workers=0, temperature=1.0, disable_tqdm=True,
    )
    settings.update(grpo_config_overrides)
    args = config_cls(max_steps=max_steps, **settings)

    model: Any = tiny_model(seed, **(model_config or {}))
    tokenizer = tiny_tokenizer()
    if args.beta != 0.0:
        path = os.path.join(args.output_dir, "initial_model")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        model = path
    kwargs: dict[str, Any] = dict(
        model=model,
        reward_funcs=list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else (reward_funcs or exact_answer_reward),
        args=args,
        train_dataset=dataset if dataset is not None else arithmetic_dataset(32, seed),
        processing_class=tokenizer,
        callbacks=list(callbacks or []),
    )
    if plugin_trainer:
        kwargs["plugins"] = plugins
    if rollout_func is not None:
        kwargs["rollout_func"] = rollout_func
    trainer = trainer_cls(**kwargs)
    if train:
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer


@dataclass
class LossOnBatch:
    """What :func:`trl_loss_on_batch` returns.

    Attributes:
        per_token_loss: ``(N, T)`` per-token loss before aggregation (policy loss x gates x token
            weights, + ``beta * KL`` and the methods' terms), 0 on padding.
        loss: the scalar TRL's ``compute_loss`` returned (what the optimiser sees).
        grad: ``(N, T)`` gradient of ``loss`` with respect to the current log-probs, 0 on padding.
        advantages: ``(N,)`` or ``(N, T)`` advantages TRL's loss received (token weights folded in
            when TRL's own loss runs).
    """

    per_token_loss: torch.Tensor
    loss: torch.Tensor
    grad: torch.Tensor
    advantages: torch.Tensor


def trl_loss_on_batch(
    plugins: Any,
    *,
    prompt_ids: torch.Tensor,
    rewards: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor | None = None,
    entropies: torch.Tensor | None = None,
    ref_log_probs: torch.Tensor | None = None,
    reward_components: torch.Tensor | None = None,
    reward_names: Sequence[str] = (),
    prompts: list | None = None,
    completions: list | None = None,
    rows: list[dict] | None = None,
    old_log_probs_at: dict[float, torch.Tensor] | None = None,
    **grpo_config_overrides: Any,
) -> LossOnBatch:
    """One fixed generation batch through the TRL adapter's advantage stage and TRL's loss path, on one
    process, with the model's log-probs replaced by ``log_probs``: the trainer-side half of a
    cross-adapter check (give the same batch to another adapter and compare).

    Args:
        plugins: the method list.
        prompt_ids: ``(N,)`` int64 prompt id of each completion (groups by id).
        rewards: ``(N,)`` float rewards (one reward function).
        completion_ids: ``(N, T)`` token ids (any ids below the tiny vocabulary's size).
        completion_mask: ``(N, T)`` 0/1, right-padded.
        log_probs: ``(N, T)`` current-policy log-probs of the completion tokens.
        old_log_probs: ``(N, T)`` behaviour log-probs; None is fully on-policy (TRL's detached current).
        entropies: ``(N, T)`` token entropies the loss sees (default 0).
        ref_log_probs: ``(N, T)`` reference log-probs, needed with ``beta > 0``.
        reward_components: ``(N, K)`` per-reward-function scores named ``reward_names`` (weights 1;
            ``rewards`` must be their sum); None: one reward function scoring ``rewards``.
        prompts, completions, rows: ``N`` prompts, completion texts and dataset rows the methods see
            (default: empty texts and rows).
        old_log_probs_at: ``{temperature: (N, T)}`` the old policy's log-probs at other temperatures
            (``GRPOBatch.old_log_probs_at``) in place of the temperature pass's, with ``entropies`` as its
            entropies; None: the tiny model's own pass.
        **grpo_config_overrides: ``GRPOConfig`` fields (``loss_type``, ``beta``, ``epsilon``,
            ``importance_sampling_level``, ``entropy_coef``, ...). One gradient-accumulation step, one
            micro-batch.
    """
    from contextlib import nullcontext
    from unittest import mock

    from trl.trainer.utils import nanstd

    from grpo_plugins_trl.loss import per_token_losses
    from grpo_plugins_trl.turns import row_fields

    n, t = completion_ids.shape
    size = int((prompt_ids == prompt_ids[0]).sum())
    generations = size if size >= 2 and n % size == 0 else n
    settings = dict(per_device_train_batch_size=n, num_generations=generations, gradient_accumulation_steps=1,
                    steps_per_generation=1, max_completion_length=t)
    trainer = tiny_grpo_run(plugins, train=False, **{**settings, **grpo_config_overrides})
    if trainer.optimizer is None:  # what a method previewing the optimiser's update reads
        trainer.create_optimizer()
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    mask = completion_mask.long()
    grouped = rewards.view(-1, generations)  # TRL's own advantage, as GRPOTrainer computes it
    out = {
        "prompt_ids": torch.full((n, 1), trainer.processing_class.bos_token_id),
        "prompt_mask": torch.ones((n, 1), dtype=torch.long),
        "completion_ids": completion_ids.long(),
        "completion_mask": mask,
        "advantages": ((grouped - torch.nanmean(grouped, 1, keepdim=True)) / (nanstd(grouped, 1, keepdim=True) + 1e-4)).view(-1),
        "num_items_in_batch": mask.sum(),
    }
    if old_log_probs is not None:
        out["old_per_token_logps"] = old_log_probs
    if ref_log_probs is not None:
        out["ref_per_token_logps"] = ref_log_probs
    current = log_probs.detach().clone().requires_grad_(True)
    entropies = torch.zeros_like(current) if entropies is None else entropies

    def fixed_log_probs(*args: Any, **kwargs: Any):
        return (current if torch.is_grad_enabled() else current.detach()), entropies, None

    ids = [int(i) for i in prompt_ids]
    trainer._plugin_local_ids = ids
    if reward_components is not None:  # named reward functions, weight 1 each
        trainer.reward_func_names = list(reward_names)
        trainer.reward_weights = torch.ones(len(reward_names))
    trainer._plugin_gathered = {
        "rewards_per_func": rewards.float()[:, None] if reward_components is None else reward_components.float(),
        "prompt_ids": ids, "prompts": prompts or [""] * n, "completions": completions or [""] * n,
        "rows": rows or [{} for _ in range(n)],
        "step_fields": row_fields([{} for _ in range(n)]),  # single-turn rows: one step each, no step rewards or keys
    }

    def fixed_temperature_pass(trainer, out, temperatures, want_entropy):
        return {tau: old_log_probs_at[tau] for tau in temperatures}, entropies if want_entropy else None

    fixed_pass = old_log_probs_at is not None
    with mock.patch.object(trainer, "_get_per_token_logps_and_entropies", fixed_log_probs), \
            mock.patch("grpo_plugins_trl.statistics.temperature_pass", fixed_temperature_pass) if fixed_pass else nullcontext():
        if not trainer._plugin_passthrough:
            trainer._run_advantage_stage(out, n)
        loss = trainer.compute_loss(trainer.model, out)
        loss.backward()
        with torch.no_grad():
            per_token, loss_mask, _, _ = per_token_losses(trainer, trainer.model, out)
    grad = torch.where(mask.bool(), current.grad, 0.0)
    per_token = torch.where(loss_mask.bool(), per_token, 0.0)
    return LossOnBatch(per_token_loss=per_token, loss=loss.detach(), grad=grad, advantages=out["advantages"])


__all__ = [
    "GradientRecorder",
    "LossOnBatch",
    "trl_loss_on_batch",
    "arithmetic_dataset",
    "completion_text",
    "digit_overlap_reward",
    "exact_answer_reward",
    "tiny_grpo_run",
    "tiny_model",
    "tiny_tokenizer",
]
