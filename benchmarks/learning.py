"""Learning efficiency: does a method (or a composed stack) reach vanilla GRPO's accuracy with fewer rollouts?

    python benchmarks/learning.py --quick     # 2 seeds, 4 configurations, a couple of minutes
    python benchmarks/learning.py             # 5 seeds, every round-1 method and the stacks

Task: addition with 1- and 2-digit operands (difficulty levels), a ~0.1M-parameter Qwen2 model built
locally and warm-started with a short supervised phase on other problems than the 64 RL prompts, exact-answer 0/1 reward. Every configuration
trains from the same warm start per seed with the same rollouts per step and the same number of
steps (so the same total rollout budget). Reported per configuration, over seeds:

- rollouts needed to first reach the accuracy vanilla reaches at the end (median, min-max);
- final accuracy per difficulty level; area under the accuracy curve (mean accuracy over evaluations);
- the fraction of groups with zero advantage signal (every advantage of the group is 0).

Writes ``benchmarks/results/learning.{json,md,png}`` and prints the headline as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from arithmetic_task import build_model, make_problems, run_grpo, to_dataset, warm_start  # noqa: E402
from grpo_plugins import Method, hookimpl  # noqa: E402
from grpo_plugins.ops import segment_max  # noqa: E402

LEVELS = (1, 2)
PROMPTS = 64  # the RL prompt pool: small enough that prompts are revisited (trackers need history)
FULL_CONFIGS = {
    "vanilla": None,
    "spo": ["spo"],
    "vade": ["vade"],
    "knapsack_rl": ["knapsack_rl"],
    "gdpo": ["gdpo"],
    "ngrpo": ["ngrpo"],
    "gtpo": ["gtpo"],
    "llds": ["llds"],
    "sapo": ["sapo"],
    "unlikeliness": ["unlikeliness"],
    "knapsack_rl+ngrpo+unlikeliness": ["knapsack_rl", "ngrpo", "unlikeliness"],
    "vade+ngrpo+llds": ["vade", "ngrpo", "llds"],
}
QUICK_CONFIGS = ["vanilla", "knapsack_rl", "ngrpo", "knapsack_rl+ngrpo+unlikeliness"]


class SignalProbe(Method):
    """Measures the fraction of groups whose advantages are all zero; passes advantages through unchanged."""

    name = "signal_probe"

    def __init__(self):
        super().__init__()
        self.fractions: list[float] = []

    @hookimpl
    def adjust_advantages(self, batch, advantages):
        magnitude = advantages.abs() if advantages.dim() == 1 else (advantages.abs() * batch.token_mask).amax(1)
        group_signal = segment_max(magnitude, batch.group_index, batch.num_groups)
        self.fractions.append(float((group_signal < 1e-8).float().mean()))
        return advantages


def rollouts_to_reach(curve: list[tuple[int, float]], target: float, rollouts_per_step: int) -> float:
    """Rollouts at the first evaluation whose accuracy reaches ``target`` (inf if never)."""
    for step, acc in curve:
        if acc >= target - 1e-9:
            return step * rollouts_per_step
    return float("inf")


def area_under_curve(curve: list[tuple[int, float]]) -> float:
    """Trapezoidal mean accuracy over the training steps."""
    steps, acc = zip(*curve)
    area = sum((steps[i + 1] - steps[i]) * (acc[i] + acc[i + 1]) / 2 for i in range(len(steps) - 1))
    return area / (steps[-1] - steps[0])


def run(configs: dict, seeds: int, steps: int, warm_steps: int, eval_every: int, rollouts_per_step: int) -> dict:
    runs = {name: [] for name in configs}
    for seed in range(seeds):
        warm_problems = make_problems(512, LEVELS, seed=seed + 500)
        train_problems = make_problems(PROMPTS, LEVELS, seed=seed)
        eval_problems = make_problems(120, LEVELS, seed=seed + 1000)
        model, tokenizer = build_model(seed)
        warm_start(model, tokenizer, warm_problems, warm_steps, seed=seed)
        dataset = to_dataset(train_problems)
        for name, plugins in configs.items():
            probe = SignalProbe()
            start = time.perf_counter()
            result = run_grpo(
                model, tokenizer, dataset, eval_problems, plugins=[*(plugins or []), probe], steps=steps,
                rollouts_per_step=rollouts_per_step, seed=seed, eval_every=eval_every,
            )
            result.pop("trainer")
            result.update(seconds=time.perf_counter() - start, zero_signal=statistics.mean(probe.fractions))
            runs[name].append(result)
            print(f"seed {seed} {name:<28} final acc {result['accuracy'][-1][1]:.3f} "
                  f"zero-signal {result['zero_signal']:.2f} ({result['seconds']:.0f} s)", flush=True)
    return runs


def summarise(runs: dict, rollouts_per_step: int) -> dict:
    vanilla_final = [r["accuracy"][-1][1] for r in runs["vanilla"]]
    summary = {}
    for name, results in runs.items():
        needed = [rollouts_to_reach(r["accuracy"], target, rollouts_per_step) for r, target in zip(results, vanilla_final)]
        summary[name] = {
            "rollouts_to_vanilla_final_median": statistics.median(needed),
            "rollouts_to_vanilla_final_min": min(needed),
            "rollouts_to_vanilla_final_max": max(needed),
            "final_accuracy": statistics.mean(r["accuracy"][-1][1] for r in results),
            "final_accuracy_by_level": {
                str(level): statistics.mean(r["final_accuracy_by_level"][level] for r in results) for level in LEVELS
            },
            "auc": statistics.mean(area_under_curve(r["accuracy"]) for r in results),
            "zero_signal_group_fraction": statistics.mean(r["zero_signal"] for r in results),
            "seconds_per_run": statistics.mean(r["seconds"] for r in results),
        }
    return summary


def plot(runs: dict, rollouts_per_step: int, path: str) -> None:
    """Mean accuracy against rollouts: single methods on the left, composed stacks on the right, each
    panel with vanilla; min-max bands over seeds for vanilla and the stacks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab20").colors
    fig, (singles, stacks) = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for i, (name, results) in enumerate(runs.items()):
        x = [s * rollouts_per_step for s, _ in results[0]["accuracy"]]
        acc = torch.tensor([[a for _, a in r["accuracy"]] for r in results])
        panels = [singles, stacks] if name == "vanilla" else [stacks if "+" in name else singles]
        for ax in panels:
            colour = "black" if name == "vanilla" else colours[(2 * i) % len(colours)]
            ax.plot(x, acc.mean(0), label=name, color=colour, linewidth=2.5 if name == "vanilla" else 1.5)
            if name == "vanilla" or "+" in name:
                ax.fill_between(x, acc.min(0).values, acc.max(0).values, color=colour, alpha=0.1)
    seeds = len(next(iter(runs.values())))
    for ax, title in ((singles, "single methods"), (stacks, "composed stacks")):
        ax.set(xlabel="rollouts (completions generated)", title=f"{title}: mean over {seeds} seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    singles.set_ylabel("greedy accuracy (held out)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def json_safe(value):
    """``value`` with infinite floats written as the string "inf" (JSON has no infinity)."""
    if isinstance(value, float) and value == float("inf"):
        return "inf"
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def markdown(summary: dict, settings: dict) -> str:
    lines = [
        f"Learning benchmark ({settings['mode']}): {settings['seeds']} seeds, {settings['steps']} steps x "
        f"{settings['rollouts_per_step']} rollouts, levels {list(LEVELS)} (digits per operand).",
        "",
        "| configuration | rollouts to vanilla's final acc. (median [min, max]) | final acc. | acc. by level | AUC | zero-signal groups |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        by_level = ", ".join(f"{k}: {v:.2f}" for k, v in s["final_accuracy_by_level"].items())
        lines.append(
            f"| {name} | {s['rollouts_to_vanilla_final_median']:.0f} [{s['rollouts_to_vanilla_final_min']:.0f}, "
            f"{s['rollouts_to_vanilla_final_max']:.0f}] | {s['final_accuracy']:.3f} | {by_level} | {s['auc']:.3f} | "
            f"{s['zero_signal_group_fraction']:.2f} |"
        )
    lines.append("")
    lines.append("`inf`: the configuration never reached vanilla's final accuracy within the budget.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description="Learning efficiency of grpo-plugins methods on CPU.")
    parser.add_argument("--quick", action="store_true", help="2 seeds, 4 configurations, fewer steps")
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--configs", nargs="+", help=f"subset of {list(FULL_CONFIGS)}")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(2)
    names = args.configs or (QUICK_CONFIGS if args.quick else list(FULL_CONFIGS))
    if "vanilla" not in names:
        names = ["vanilla", *names]
    settings = dict(
        mode="quick" if args.quick else "full",
        seeds=args.seeds or (2 if args.quick else 5),
        steps=args.steps or (24 if args.quick else 60),
        warm_steps=300,
        eval_every=4 if args.quick else 6,
        rollouts_per_step=32,
    )
    runs = run({n: FULL_CONFIGS[n] for n in names}, settings["seeds"], settings["steps"], settings["warm_steps"],
               settings["eval_every"], settings["rollouts_per_step"])
    summary = summarise(runs, settings["rollouts_per_step"])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "learning.json"), "w") as handle:
        json.dump(json_safe({"settings": settings, "summary": summary, "runs": runs}), handle, indent=1, default=str)
    with open(os.path.join(args.out, "learning.md"), "w") as handle:
        handle.write(markdown(summary, settings))
    plot(runs, settings["rollouts_per_step"], os.path.join(args.out, "learning.png"))
    print(markdown(summary, settings))
    headline = {
        name: {k: summary[name][k] for k in ("rollouts_to_vanilla_final_median", "final_accuracy", "zero_signal_group_fraction")}
        for name in summary
    }
    print(json.dumps(json_safe({"benchmark": "learning", "mode": settings["mode"], "headline": headline})))


if __name__ == "__main__":
    main()
