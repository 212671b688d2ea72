"""Train the tiny local model to walk the corridor (``corridor.py``) with GiGPO on TRL, and with plain GRPO
for comparison; prints the success rate of each run's episodes.

    python examples/multi_turn/train_trl.py --steps 30
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from corridor import corridor_dataset, make_rollout, reached_goal  # noqa: E402

from grpo_plugins_trl.testing import tiny_grpo_run  # noqa: E402


def success_rate(trainer) -> list[float]:
    """The mean reward (episodes that reached the goal) of each logged step."""
    return [row["reward"] for row in trainer.state.log_history if "reward" in row]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    settings = dict(dataset=corridor_dataset(32, args.seed), reward_funcs=reached_goal, rollout_func=make_rollout(),
                    max_steps=args.steps, seed=args.seed, max_completion_length=16, per_device_train_batch_size=8,
                    num_generations=4, gradient_accumulation_steps=1, learning_rate=3e-3)
    for label, methods in (("GRPO", ["grpo"]), ("GiGPO", [{"gigpo": {"gamma": 0.9}}])):
        rates = success_rate(tiny_grpo_run(methods, **settings))
        window = max(1, len(rates) // 3)
        first, last = sum(rates[:window]) / window, sum(rates[-window:]) / window
        print(f"{label:6s} success rate: first {window} steps {first:.2f} -> last {window} steps {last:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
