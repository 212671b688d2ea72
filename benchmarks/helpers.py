"""Speed of the shared helpers (grpo_plugins.ops) on a generation batch of 1e6 completions.

Groups are uneven (sizes drawn at random around N / G, groups of one included) and shuffled, as
after a variable rollout budget. Writes ``benchmarks/results/helpers.json`` and ``helpers.md``.

    python benchmarks/helpers.py              # N = 1e6, G in (1e4, 1e5), 1 torch thread
    python benchmarks/helpers.py --quick      # N = 1e5, for a smoke run
    python benchmarks/helpers.py --threads 2  # more intra-op threads
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from grpo_plugins import ParallelContext, ops

RESULTS = Path(__file__).parent / "results"


def uneven_index(num_completions: int, num_groups: int, gen: torch.Generator) -> torch.Tensor:
    """``(N,)`` shuffled group ids; every group has >= 1 member, sizes vary around N / G."""
    extra = torch.multinomial(torch.rand(num_groups, generator=gen), num_completions - num_groups, replacement=True, generator=gen)
    sizes = torch.bincount(extra, minlength=num_groups) + 1
    index = torch.repeat_interleave(torch.arange(num_groups), sizes)
    return index[torch.randperm(num_completions, generator=gen)]


def timed(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def loop_group_normalize(rewards: list[float], index: list[int], num_groups: int, epsilon: float = 1e-6) -> list[float]:
    """The plain Python reference: two passes over the completions."""
    sums, squares, counts = [0.0] * num_groups, [0.0] * num_groups, [0] * num_groups
    for r, g in zip(rewards, index):
        sums[g] += r
        counts[g] += 1
    means = [s / max(c, 1) for s, c in zip(sums, counts)]
    for r, g in zip(rewards, index):
        squares[g] += (r - means[g]) ** 2
    stds = [(q / (c - 1)) ** 0.5 if c > 1 else 0.0 for q, c in zip(squares, counts)]
    return [(r - means[g]) / (stds[g] + epsilon) for r, g in zip(rewards, index)]


def run(num_completions: int, group_counts: list[int], tokens: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(num_completions, generator=gen)
    rows = num_completions // tokens
    values = torch.randn(rows, tokens, generator=gen)
    mask = (torch.rand(rows, tokens, generator=gen) > 0.3).float()
    single = ParallelContext()
    results = []
    for num_groups in group_counts:
        index = uneven_index(num_completions, num_groups, gen)
        cases = {
            "segment_sum": lambda: ops.segment_sum(rewards, index, num_groups),
            "segment_count": lambda: ops.segment_count(index, num_groups),
            "segment_mean": lambda: ops.segment_mean(rewards, index, num_groups),
            "segment_std": lambda: ops.segment_std(rewards, index, num_groups),
            "segment_max": lambda: ops.segment_max(rewards, index, num_groups),
            "segment_min": lambda: ops.segment_min(rewards, index, num_groups),
            "group_normalize": lambda: ops.group_normalize(rewards, index, num_groups),
        }
        for name, fn in cases.items():
            results.append({"helper": name, "N": num_completions, "G": num_groups, "ms": timed(fn, repeats)})
        reward_list, index_list = rewards.tolist(), index.tolist()
        start = time.perf_counter()
        reference = loop_group_normalize(reward_list, index_list, num_groups)
        loop_ms = (time.perf_counter() - start) * 1e3
        vectorised = ops.group_normalize(rewards.double(), index, num_groups)  # same precision as the loop
        error = float((vectorised - torch.tensor(reference, dtype=torch.float64)).abs().max())
        results.append(
            {"helper": "group_normalize (Python loop reference)", "N": num_completions, "G": num_groups, "ms": loop_ms,
             "max_abs_diff_vs_vectorised": error}
        )
    for name, fn in {
        "masked_mean (rows)": lambda: ops.masked_mean(values, mask, dim=-1),
        "masked_mean (all)": lambda: ops.masked_mean(values, mask),
        "global_masked_mean (1 process)": lambda: ops.global_masked_mean(values, mask, single),
        "global_mean_std (1 process)": lambda: ops.global_mean_std(rewards, single),
    }.items():
        shape = f"{rows}x{tokens}" if "mean_std" not in name else str(num_completions)
        results.append({"helper": name, "N": shape, "G": "", "ms": timed(fn, repeats)})
    return {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": "cpu",
        },
        "command": "python benchmarks/helpers.py" + ("" if num_completions == 1_000_000 else " --quick")
        + ("" if torch.get_num_threads() == 1 else f" --threads {torch.get_num_threads()}"),
        "repeats": repeats,
        "results": results,
    }


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Speed of the shared helpers (grpo_plugins.ops)",
        "",
        f"`{report['command']}` on {m['device']} ({m['processor']}), torch {m['torch']}, torch threads: {m['threads']}; "
        f"median of {report['repeats']} runs after a warm-up. Uneven, shuffled groups (every group >= 1 member).",
        "",
        "| helper | N | G | ms |",
        "|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(f"| {r['helper']} | {r['N']} | {r['G']} | {r['ms']:.2f} |")
    loops = [r for r in report["results"] if "max_abs_diff_vs_vectorised" in r]
    if loops:
        lines += ["", "The Python loop reference agrees with `group_normalize` in float64 to "
                  f"{max(r['max_abs_diff_vs_vectorised'] for r in loops):.1e} (max abs difference)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1e5 completions instead of 1e6")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: stable on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = 100_000 if args.quick else 1_000_000
    groups = [1_000, 10_000] if args.quick else [10_000, 100_000]
    report = run(n, groups, tokens=100, repeats=args.repeats)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "helpers.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "helpers.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
