"""Time Knapsack RL's allocation on a large round: ``python plugins/knapsack_rl/benchmark.py``.

10 000 prompts, a budget of 8 rollouts per prompt, N_up in {16, 32, 64}; success rates: 20% of prompts
unsolved (p = 0), 10% solved (p = 1), 5% without an estimate, the rest uniform in (0, 1). Prints the
median of 5 runs for the exact greedy solver (with and without the fallback) and the per-item cost
of the dynamic programme.
"""

import statistics
import time

import torch

from grpo_plugin_knapsack_rl import item_gains, knapsack_allocate, knapsack_dp, knapsack_greedy


def round_of(num_prompts: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    kind = torch.rand(num_prompts, generator=gen)
    p = torch.rand(num_prompts, generator=gen).clamp(0.01, 0.99)
    p = torch.where(kind < 0.2, torch.zeros_like(p), torch.where(kind < 0.3, torch.ones_like(p), p))
    valid = kind < 0.95
    return p, valid


def median_seconds(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    p, valid = round_of(10_000)
    for max_n in (16, 32, 64):
        for fallback in (True, False):
            seconds = median_seconds(
                lambda: knapsack_allocate(p, valid, 80_000, n_default=8, max_n=max_n, allow_fallback=fallback)
            )
            print(f"greedy  P=10000 budget=80000 N_up={max_n:3d} fallback={fallback!s:5}: {seconds * 1e3:7.1f} ms")
    mixed = p[valid & (p > 0) & (p < 1)]
    for items, budget in ((100, 600), (1000, 6000), (1000, 30_000)):
        gains = item_gains(mixed[:items], 2, 62, "paper")
        dp = median_seconds(lambda: knapsack_dp(gains, budget), repeats=1)
        greedy = median_seconds(lambda: knapsack_greedy(gains, budget))
        print(f"items={items:5d} budget={budget:6d} N_up=64: dp {dp * 1e3:9.1f} ms, greedy {greedy * 1e3:6.2f} ms")


if __name__ == "__main__":
    main()
