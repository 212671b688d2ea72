"""Train the tiny local model to walk the corridor (``corridor.py``'s rules) with GiGPO inside verl's own
training loop (``PPOTrainer.fit``) on CPU, and with verl's own multi-trajectory GRPO for comparison; prints the
success rate of each run's episodes.

    python examples/multi_turn/train_verl.py --steps 20

verl 0.9.1 cannot start a job on a CPU-only machine, so this runs ``fit()`` through the adapter's CPU harness
(:mod:`grpo_plugins_verl.cpu_fit`: the FSDP engine, vLLM server and Ray workers stood in for, everything else
verl's code). The episodes are played by :class:`corridor_verl.CorridorAgentLoop`, verl's agent-loop
interface: one row per turn. On a GPU machine the same agent loop runs under ``python -m grpo_plugins_verl.main``
with the overrides of :func:`corridor_overrides` (and this folder on ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from corridor_verl import AGENT_LOOPS, corridor_rows  # noqa: E402

TINY_ASSETS = HERE.parent / "verl" / "make_tiny_assets.py"
REWARD = HERE.parent / "verl" / "reward.py"  # verl needs a reward function; the agent loop sets the reward itself


def corridor_overrides(steps: int, turn_tokens: int = 2) -> list[str]:
    """verl overrides of a corridor run: the corridor agent loop, ``turn_tokens`` tokens per turn."""
    return [
        f"actor_rollout_ref.rollout.agent.agent_loop_config_path={AGENT_LOOPS}",
        "actor_rollout_ref.rollout.agent.default_agent_loop=corridor_agent",
        f"data.max_response_length={turn_tokens}",
        "data.max_prompt_length=64",
        f"trainer.total_training_steps={steps}",
        "trainer.save_freq=-1",
        "trainer.resume_mode=disable",
    ]


def corridor_tokenizer():
    """A character-level tokenizer of the corridor's texts (a byte-level BPE without merges, Qwen2's format),
    with a chat template: the digits 0-9 are 10 of its 25 tokens, so a random policy steps left (a digit
    below 5) about a fifth of the time and episodes both reach the goal and fail (the tokenizer of
    ``examples/verl`` has 5 such tokens in 300). ``Ġ`` is a space, ``Ċ`` the newline verl's token builder for
    Qwen models requires; verl loads it from the model folder as a ``Qwen2Tokenizer``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *map(str, range(10)), "Ġ", "=", ":", "Ċ",
             *sorted(set("userassistant"))]
    core = Tokenizer(models.BPE({word: i for i, word in enumerate(words)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = (
        "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    return tokenizer


def build_assets(work: Path, train_size: int = 32, seed: int = 0) -> Path:
    """A tiny random Qwen2 (``examples/verl``'s) with :func:`corridor_tokenizer`, and corridor datasets in ``work``."""
    import importlib.util

    import pandas as pd

    spec = importlib.util.spec_from_file_location("make_tiny_assets", TINY_ASSETS)
    assets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(assets)
    assets.build_model(corridor_tokenizer(), work / "model")
    pd.DataFrame(corridor_rows(train_size, seed)).to_parquet(work / "train.parquet")
    pd.DataFrame(corridor_rows(8, seed + 1, offset=train_size)).to_parquet(work / "val.parquet")
    return work


def corridor_config(methods, work: Path, steps: int, overrides=()):
    """verl's composed config of a corridor run of ``methods`` (None: verl's own GRPO, no adapter)."""
    from grpo_plugins_verl.cpu_fit import compose_config

    return compose_config(methods, work, REWARD, [*corridor_overrides(steps), *overrides])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import ray

    from grpo_plugins_verl.cpu_fit import run_fit

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        with tempfile.TemporaryDirectory() as folder:
            work = build_assets(Path(folder), seed=args.seed)
            for label, methods in (("GRPO", None), ("GiGPO", [{"gigpo": {"gamma": 0.9}}])):
                result = run_fit(corridor_config(methods, work, args.steps), seed=args.seed)
                rates = [step["critic/score/mean"] for step in result.metrics]
                window = max(1, len(rates) // 3)
                first, last = sum(rates[:window]) / window, sum(rates[-window:]) / window
                print(f"{label:6s} success rate (per turn row): first {window} steps {first:.2f} -> "
                      f"last {window} steps {last:.2f}")
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
