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


def tiny_model(seed: int = 0, hidden_size: int = 32, num_layers: int = 2):
    """A randomly initialised Qwen2 causal LM (hidden 32, 2 layers) over :func:`tiny_tokenizer`'s vocabulary."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
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
    **grpo_config_overrides: Any,
):
    """Train the tiny model for ``max_steps`` optimiser steps on CPU in fp32 and return the trainer.

    Args:
        plugins: the method list (``["spo", {"gtpo": {...}}, MethodInstance]``); ``None`` with
            ``trainer_cls`` given trains that class (e.g. plain ``trl.GRPOTrainer``) without plugins.
        max_steps: optimiser steps.
        seed: seed of the model initialisation, the dataset and the trainer.
        trainer_cls: the trainer class; defaults to :class:`~grpo_plugins_trl.PluginGRPOTrainer`.
        reward_funcs: reward function(s); defaults to :func:`exact_answer_reward`.
        dataset: the training dataset; defaults to ``arithmetic_dataset(32, seed)``.
        callbacks: extra ``TrainerCallback`` objects.
        resume_from_checkpoint: passed to ``trainer.train``.
        train: False returns the trainer without training.
        model_config: keyword arguments of :func:`tiny_model` (``hidden_size``, ``num_layers``) for a
            larger model; the defaults give the 2-layer, hidden-32 model.
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
    trainer = trainer_cls(**kwargs)
    if train:
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer


__all__ = [
    "GradientRecorder",
    "arithmetic_dataset",
    "completion_text",
    "digit_overlap_reward",
    "exact_answer_reward",
    "tiny_grpo_run",
    "tiny_model",
    "tiny_tokenizer",
]
