"""Multi-reward GRPO on CPU: TRL's own ``reward_funcs`` and ``reward_weights`` (a format reward and an
accuracy reward) with a reward-shaping method enabled next to them by name.

    python examples/multi_reward/train.py                 # 20 steps, well under a minute on 2 CPU cores
    python examples/multi_reward/train.py --no-plugins    # the same run in plain TRL GRPO

The task is addition with a reasoning format. A completion is ``thought = answer``: what stands before
the ``=`` is the model's working (e.g. ``4 + 3``), what follows is its answer. The user's format reward
is the usual strict one: it pays only for a non-empty thought. The ``ton`` method (Think or Not?,
arXiv:2505.16854) swaps that reward, at the weight ``reward_weights`` gives it, for a think-or-not
format reward that also accepts ``= answer`` (the thought skipped), and logs how often the policy
skips. Everything is local: the tiny model, tokenizer and dataset of ``grpo_plugins_trl.testing``.

Prints the methods of the run, one line per step (the trainer's reward, each reward function's mean,
the method's metrics) and, last, one JSON line with the run's summary.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import PrinterCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from grpo_plugins_trl import PluginGRPOConfig, PluginGRPOTrainer  # noqa: E402
from grpo_plugins_trl.testing import arithmetic_dataset, tiny_model, tiny_tokenizer  # noqa: E402

# A well-formed completion: "thought = answer", one '=', digits in the answer. The named group 'think' is
# what TON reads; a blank thought is a skipped one.
THINK_OR_NOT = r"(?P<think>[^=]*)=(?P<answer>[^=]*[0-9][^=]*)"
REWARD_WEIGHTS = [0.5, 1.0]  # format, accuracy


def split(completion: str) -> tuple[str, str] | None:
    """``(thought, answer)`` of a ``thought = answer`` completion (whitespace removed), or None."""
    parts = completion.split("=")
    if len(parts) != 2 or not any(ch.isdigit() for ch in parts[1]):
        return None
    return "".join(parts[0].split()), "".join(parts[1].split())


def format_reward(completions, **kwargs) -> list[float]:
    """Strict reasoning format: 1.0 for ``thought = answer`` with a non-empty thought, else 0.0."""
    return [float(parts is not None and parts[0] != "") for parts in map(split, completions)]


def accuracy_reward(completions, answer, **kwargs) -> list[float]:
    """1.0 when the answer after the ``=`` equals the sum, else 0.0 (``answer`` is a dataset column)."""
    return [float(parts is not None and parts[1] == str(a)) for parts, a in zip(map(split, completions), answer)]


def build_trainer(steps: int, seed: int, output_dir: str, plugins: list | None) -> PluginGRPOTrainer:
    args = PluginGRPOConfig(
        output_dir=output_dir,
        max_steps=steps,
        reward_weights=REWARD_WEIGHTS,  # TRL's own weighting of reward_funcs
        grpo_plugins=plugins,  # the methods, by name, with their configs (or pass plugins= to the trainer)
        per_device_train_batch_size=8, num_generations=4, gradient_accumulation_steps=1,
        max_completion_length=6, temperature=1.0, learning_rate=1e-3, seed=seed, data_seed=seed,
        use_cpu=True, bf16=False, fp16=False, logging_steps=1, report_to="none", save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0,
    )
    return PluginGRPOTrainer(
        model=tiny_model(seed),
        processing_class=tiny_tokenizer(),
        reward_funcs=[format_reward, accuracy_reward],
        args=args,
        train_dataset=arithmetic_dataset(64, seed),
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="trainer output folder (a temporary one by default)")
    parser.add_argument("--no-plugins", action="store_true", help="run plain TRL GRPO with the same rewards")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()

    plugins = None if args.no_plugins else [
        {"ton": {"format_reward": "replace", "format_component": "format_reward", "pattern": THINK_OR_NOT}}
    ]
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="multi_reward_")
    trainer = build_trainer(args.steps, args.seed, output_dir, plugins)
    trainer.remove_callback(PrinterCallback)  # this script prints its own per-step lines
    print("reward functions:", trainer.reward_func_names, "weights:", trainer.reward_weights.tolist())
    print("methods (composition order) and their hooks:")
    print(trainer.composition.describe())
    trainer.train()

    # "reward" is the trainer's weighted sum of reward_funcs; plugins/ton/mean_reward is the shaped reward.
    keys = ["reward", "rewards/format_reward/mean", "rewards/accuracy_reward/mean",
            "plugins/ton/mean_reward", "plugins/ton/format_rate", "plugins/ton/skip_rate"]
    rows = [row for row in trainer.state.log_history if "reward" in row]
    for step, row in enumerate(rows, start=1):
        shown = " ".join(f"{key}={row[key]:.3f}" for key in keys if key in row)
        print(f"step {step}: {shown}")
    summary = {
        "steps": len(rows),
        "methods": [entry.name for entry in trainer.composition.user_methods],
        "reward_weights": trainer.reward_weights.tolist(),
        "last": {key: rows[-1][key] for key in keys if rows and key in rows[-1]},
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
