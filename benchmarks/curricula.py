"""Speed of the prompt-curriculum methods (cures, vas, gdro) and the core's budget helpers at scale.

A dataset of 10^5 prompts whose trackers are all filled; each method's ``sample_prompts`` draws a
round of 1 024 prompts from the whole dataset, and each ``allocate_rollouts`` splits a budget of
32 rollouts per prompt (each prompt between 2 and 64) over a round of 10^5 prompts, exactly. Also
the core's ``apportion`` alone, and VAS's batched self-BLEU on 1 024 groups of 8 completions of 128
tokens. Best of 5 single-thread CPU times (``grpo_plugins.testing.cpu_single_thread``). Writes
``benchmarks/results/curricula.json`` and ``curricula.md`` and prints the headline as one JSON line.

    python benchmarks/curricula.py            # 10^5 prompts
    python benchmarks/curricula.py --quick    # 10^4 prompts, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from grpo_plugins import Composition, GRPOBatch, PromptRound
from grpo_plugins.budgets import apportion
from grpo_plugins.testing import cpu_single_thread

RESULTS = Path(__file__).parent / "results"


def filled(name: str, config: dict, dataset_size: int, gen: torch.Generator) -> Composition:
    """A composition whose method has seen every prompt once (8 completions, random pass rates)."""
    composition = Composition([{name: config}])
    ids = torch.arange(dataset_size).repeat_interleave(8)
    rewards = (torch.rand(ids.numel(), generator=gen) < torch.rand(dataset_size, generator=gen).repeat_interleave(8)).float()
    batch = GRPOBatch(prompt_ids=ids, rewards=rewards)
    composition.run_observe(batch, 1)
    if name == "vas":
        composition.method("vas").refresh()
    return composition


def run(dataset_size: int, round_prompts: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    rows = []
    configs = {
        "cures": {"min_rollouts": 2, "max_rollouts": 64},
        "vas": {},
        "gdro": {"min_rollouts": 2, "max_rollouts": 64},
    }
    for name, config in configs.items():
        composition = filled(name, config, dataset_size, gen)
        sample_round = PromptRound(round_prompts, 32 * round_prompts, dataset_size, 1, 32)
        generator = torch.Generator().manual_seed(1)
        sample_s = cpu_single_thread(lambda: composition.run_sample_prompts(sample_round, generator), repeats)
        row = {"method": name, "dataset_prompts": dataset_size, "round_prompts": round_prompts, "sample_ms": sample_s * 1e3}
        if composition.implements("allocate_rollouts"):
            ids = torch.arange(dataset_size)
            alloc_round = PromptRound(dataset_size, 32 * dataset_size, dataset_size, 1, 32)
            counts = composition.rollout_counts(alloc_round, ids)
            assert int(counts.sum()) == alloc_round.budget and int(counts.max()) <= 64
            row.update(allocate_prompts=dataset_size, budget=alloc_round.budget,
                       allocate_ms=cpu_single_thread(lambda: composition.rollout_counts(alloc_round, ids), repeats) * 1e3)
        rows.append(row)
    weights = torch.rand(dataset_size, generator=gen)
    apportion_ms = cpu_single_thread(lambda: apportion(weights, 32 * dataset_size, 2, 64), repeats) * 1e3
    from grpo_plugin_vas import self_bleu

    groups, size, tokens = (1024, 8, 128) if dataset_size >= 100_000 else (128, 8, 64)
    ids = torch.randint(0, 2000, (groups * size, tokens), generator=gen)
    mask = (torch.arange(tokens) < torch.randint(1, tokens + 1, (groups * size, 1), generator=gen)).float()
    index = torch.arange(groups).repeat_interleave(size)
    bleu_ms = cpu_single_thread(lambda: self_bleu(ids, mask, index, groups), max(1, repeats // 2)) * 1e3
    return {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread",
        "methods": rows,
        "apportion": {"prompts": dataset_size, "budget": 32 * dataset_size, "bounds": [2, 64], "ms": apportion_ms},
        "self_bleu": {"groups": groups, "group_size": size, "tokens": tokens, "ms": bleu_ms},
    }


def markdown(result: dict) -> str:
    lines = [
        "# Prompt curricula at scale", "",
        f"Best of 5 single-thread CPU times ({result['machine']}).", "",
        "| method | dataset prompts | sample_prompts (round of P) | allocate_rollouts (prompts, budget) |",
        "|---|---|---|---|",
    ]
    for row in result["methods"]:
        alloc = f"{row['allocate_ms']:.1f} ms ({row['allocate_prompts']}, {row['budget']})" if "allocate_ms" in row else "—"
        lines.append(f"| {row['method']} | {row['dataset_prompts']} | {row['sample_ms']:.1f} ms (P = {row['round_prompts']}) | {alloc} |")
    a, b = result["apportion"], result["self_bleu"]
    lines += [
        "",
        f"`grpo_plugins.budgets.apportion`: {a['prompts']} prompts, budget {a['budget']}, bounds {a['bounds']}: {a['ms']:.1f} ms.",
        f"VAS self-BLEU-123: {b['groups']} groups x {b['group_size']} completions x {b['tokens']} tokens: {b['ms']:.1f} ms.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10^4 prompts")
    args = parser.parse_args()
    result = run(10_000 if args.quick else 100_000, 1024, 3 if args.quick else 5)
    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (RESULTS / f"curricula{suffix}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"curricula{suffix}.md").write_text(markdown(result))
    print(json.dumps({row["method"]: {k: round(v, 1) for k, v in row.items() if k.endswith("_ms")} for row in result["methods"]}))


if __name__ == "__main__":
    main()
