"""Build a tiny local model and a tiny arithmetic dataset for a short verl GRPO run (no downloads).

Writes under ``--out``:

- ``model/``: a randomly initialised 2-layer Qwen2 causal LM (head dim 64, which vLLM's attention
  kernels support) with a 300-token byte-level BPE tokenizer trained on the task's text, and a chat
  template (verl's agent loop applies it to each prompt);
- ``train.parquet`` / ``val.parquet``: verl's RL dataset schema (``data_source``, ``prompt`` as chat
  messages, ``ability``, ``reward_model.ground_truth``, ``extra_info.index``) for "a + b" questions.

The reward is :mod:`reward` (``compute_score``: 1.0 when the completion's first number is the sum).

The tokenizer is saved in the format of the installed ``transformers`` (5.x here: ``tokenizer.json``
plus a ``tokenizer_config.json`` written by 5.x). verl 0.9.1 with transformers 5.x reads it (tested on
CPU); a rollout engine pinned to transformers 4.x (some vLLM builds) may not: run this script with
the transformers version the rollout engine uses.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

DATA_SOURCE = "tiny_arith"
WORDS = ["what", "is", "the", "answer", "sum", "of", "and", "=", "+", "?", "user", "assistant", ":"]
"""Extra training text for the tokenizer."""


def build_tokenizer():
    """A byte-level BPE tokenizer (Qwen2's format) trained here on the task's own text, with a chat template.

    ``AutoTokenizer`` loads it as ``Qwen2Tokenizer`` (from the model's type) in transformers and in vLLM,
    so it is a byte-level BPE like Qwen2's own, just with a 300-token vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f"user : what is {a} + {b} ? assistant : {a + b}" for a in range(50) for b in range(50)] + WORDS
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = (
        "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    return tokenizer


def build_model(tokenizer, out: Path, seed: int = 0) -> None:
    """Save a tiny random Qwen2 causal LM and its tokenizer to ``out``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def build_rows(count: int, seed: int, offset: int = 0) -> list[dict]:
    """``count`` rows of verl's RL dataset schema asking for the sum of two small numbers."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        rows.append(
            {
                "data_source": DATA_SOURCE,
                "prompt": [{"role": "user", "content": f"what is {a} + {b} ?"}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": str(a + b)},
                "extra_info": {"index": offset + i, "split": "train" if offset == 0 else "val"},
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-size", type=int, default=64)
    parser.add_argument("--val-size", type=int, default=16)
    args = parser.parse_args()

    import pandas as pd

    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    build_model(tokenizer, args.out / "model")
    pd.DataFrame(build_rows(args.train_size, seed=1)).to_parquet(args.out / "train.parquet")
    pd.DataFrame(build_rows(args.val_size, seed=2, offset=args.train_size)).to_parquet(args.out / "val.parquet")
    print(f"wrote {args.out}/model, train.parquet ({args.train_size} rows), val.parquet ({args.val_size} rows)")


if __name__ == "__main__":
    main()
