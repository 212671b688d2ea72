"""Knapsack RL: the round's allocation (exact greedy solver, with and without the fallback) on ``P``
prompts at 8 rollouts per prompt, and the exact dynamic programme against the greedy solver on the same
items. Success rates: 20% unsolved (``p = 0``), 10% solved (``p = 1``), 5% without an estimate, the rest
uniform in (0, 1)."""

from __future__ import annotations

import torch

from grpo_plugin_knapsack_rl import item_gains, knapsack_allocate, knapsack_dp, knapsack_greedy

METHOD = "knapsack_rl"


def round_of(num_prompts: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    kind = torch.rand(num_prompts, generator=gen)
    p = torch.rand(num_prompts, generator=gen).clamp(0.01, 0.99)
    p = torch.where(kind < 0.2, torch.zeros_like(p), torch.where(kind < 0.3, torch.ones_like(p), p))
    return p, kind < 0.95


def benchmark_cases(quick: bool) -> list[dict]:
    prompts = 1_000 if quick else 10_000
    budget = 8 * prompts
    p, valid = round_of(prompts)
    cases = []
    for max_n in (64,) if quick else (16, 32, 64):
        for fallback in (True, False):
            cases.append({
                "case": f"allocate, greedy, N_up={max_n}, fallback {'on' if fallback else 'off'}",
                "size": f"P={prompts}, budget={budget}",
                "run": lambda max_n=max_n, fallback=fallback: knapsack_allocate(
                    p, valid, budget, n_default=8, max_n=max_n, allow_fallback=fallback),
            })
    mixed = p[valid & (p > 0) & (p < 1)]
    for items, units in ((100, 600),) if quick else ((100, 600), (1000, 6000), (1000, 30_000)):
        gains = item_gains(mixed[:items], 2, 62, "paper")
        greedy = knapsack_greedy(gains, units)
        dp = knapsack_dp(gains, units)
        gap = float(gains.gather(1, dp[:, None]).sum() - gains.gather(1, greedy[:, None]).sum())
        size = f"items={items}, budget={units}, N_up=64"
        cases.append({"case": "knapsack, dynamic programme", "size": size, "run": lambda g=gains, u=units: knapsack_dp(g, u),
                      "repeats": 1, "note": f"value(dp) - value(greedy) = {gap:.1e}"})
        cases.append({"case": "knapsack, greedy", "size": size, "run": lambda g=gains, u=units: knapsack_greedy(g, u)})
    return cases
