"""CPU demo: train a tiny local model on addition with several grpo-plugins methods composed, and
compare it with vanilla TRL GRPO from the same warm start.

    python examples/trl_demo.py                      # under a minute to a few minutes on 2 CPU cores
    python examples/trl_demo.py --plugins vade ngrpo llds --num-iterations 2

Steps: build a tokenizer and a ~0.1M-parameter Qwen2 model locally (nothing is downloaded), warm
it up with a short supervised phase, then run (a) ``trl.GRPOTrainer`` and (b)
``grpo_plugins_trl.PluginGRPOTrainer`` with the named methods for the same number of steps and
rollouts. Prints what each method did and writes ``outputs/demo/demo.png`` (reward and greedy
accuracy against steps for both runs) and ``outputs/demo/demo.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from arithmetic_task import accuracy_by_level, build_model, make_problems, run_grpo, to_dataset, warm_start  # noqa: E402

DEFAULT_PLUGINS = ["knapsack_rl", "ngrpo", "unlikeliness"]  # the learning benchmark's stack


def train(label: str, plugins, model, tokenizer, dataset, eval_problems, args) -> dict:
    start = time.perf_counter()
    run = run_grpo(
        model, tokenizer, dataset, eval_problems, plugins=plugins, steps=args.steps,
        rollouts_per_step=args.rollouts_per_step, num_generations=args.num_generations, lr=args.lr,
        seed=args.seed, eval_every=args.eval_every, num_iterations=args.num_iterations, progress=True, label=label,
    )
    run.update(label=label, seconds=round(time.perf_counter() - start, 1))
    return run


def report_plugins(trainer) -> None:
    """What each enabled method did: its hooks and the last value of each metric it logged."""
    print("\nMethods in this run (composition order) and the hooks they ran:")
    print(trainer.composition.describe())
    last: dict[str, float] = {}
    for row in trainer.state.log_history:
        last.update({k: v for k, v in row.items() if k.startswith("plugins/")})
    for key, value in sorted(last.items()):
        print(f"  {key} = {value:.4g}")


def comparison_table(results) -> str:
    """A Markdown table: mean training reward over the last 10 steps, greedy accuracy before and after
    (overall and per level), wall time."""
    levels = list(results[0]["final_accuracy_by_level"])
    header = ["run", "reward (last 10 steps)", "accuracy start -> end"] + [f"{lv}-digit acc" for lv in levels] + ["time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        recent = r["reward"][-10:]
        reward = f"{sum(recent) / len(recent):.3f}" if recent else "-"
        curve = r["accuracy"]
        accuracy = f"{curve[0][1]:.2f} -> {curve[-1][1]:.2f}" if curve else "-"
        per_level = [f"{r['final_accuracy_by_level'][lv]:.2f}" for lv in levels]
        lines.append("| " + " | ".join([r["label"], reward, accuracy, *per_level, f"{r['seconds']} s"]) + " |")
    return "\n".join(lines)


def plot(results, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_reward, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for result in results:
        reward = torch.tensor(result["reward"])
        window = min(10, len(reward))
        smoothed = reward.unfold(0, window, 1).mean(1)  # moving average over `window` logged steps
        ax_reward.plot(range(window, len(reward) + 1), smoothed, label=result["label"])
        steps, acc = zip(*result["accuracy"])
        ax_acc.plot(steps, acc, marker="o", label=result["label"])
    ax_reward.set(xlabel="optimiser step", ylabel="training reward (moving average of 10)", title="Reward")
    ax_acc.set(xlabel="optimiser step", ylabel="greedy accuracy (held out)", title="Accuracy")
    for ax in (ax_reward, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plugins", nargs="+", default=DEFAULT_PLUGINS, help="methods to compose, in order")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--rollouts-per-step", type=int, default=32)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--warm-start-steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--num-iterations", type=int, default=1, help="optimiser steps per generation batch")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/demo")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    hf_logging.set_verbosity_error()
    os.makedirs(args.out, exist_ok=True)

    levels = (1, 2)
    warm_problems = make_problems(512, levels, seed=args.seed + 500)
    train_problems = make_problems(128, levels, seed=args.seed)
    eval_problems = make_problems(120, levels, seed=args.seed + 1000)
    model, tokenizer = build_model(args.seed)
    print(f"Warm start: {args.warm_start_steps} supervised steps on {len(warm_problems)} other problems ...")
    warm_start(model, tokenizer, warm_problems, args.warm_start_steps, seed=args.seed)
    by_level = accuracy_by_level(model, tokenizer, eval_problems)
    print("greedy accuracy after warm start: " + ", ".join(f"{lv}-digit {acc:.2f}" for lv, acc in by_level.items()))
    dataset = to_dataset(train_problems)

    print(f"\nTraining {args.steps} steps of {args.rollouts_per_step} completions, twice from the same warm start:")
    vanilla = train("vanilla GRPO (trl.GRPOTrainer)", None, model, tokenizer, dataset, eval_problems, args)
    composed = train("+".join(args.plugins), list(args.plugins), model, tokenizer, dataset, eval_problems, args)
    report_plugins(composed.pop("trainer"))
    vanilla.pop("trainer")

    results = [vanilla, composed]
    plot_path, json_path = os.path.join(args.out, "demo.png"), os.path.join(args.out, "demo.json")
    plot(results, plot_path)
    with open(json_path, "w") as handle:
        json.dump(results, handle, indent=1)
    print("\n" + comparison_table(results))
    print(f"\nPlot: {plot_path}  (numbers: {json_path})")


if __name__ == "__main__":
    main()
