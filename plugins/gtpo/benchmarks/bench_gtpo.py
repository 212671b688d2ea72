"""Time GTPO's conflict detection and token weights on 1e4 completions x 512 tokens (CPU).

Run: ``python plugins/gtpo/benchmarks/bench_gtpo.py``. Prints the best of several repeats per case.
"""

from __future__ import annotations

import torch

from grpo_plugins.testing import best_of, cpu_single_thread
from grpo_plugin_gtpo import conflict_masks, conflict_weights

N, T, G = 10_000, 512, 8


def batch(case: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    index = torch.arange(N) // G
    lengths = torch.randint(T // 4, T + 1, (N,), generator=gen)
    mask = (torch.arange(T) < lengths[:, None]).float()
    rewards = torch.randint(0, 2, (N,), generator=gen).float()
    means = torch.zeros(N // G).index_add_(0, index, rewards) / G
    advantages = rewards - means[index]
    if case == "realistic":  # 32k vocabulary, a shared 3-token opening and 2-token closing
        ids = torch.randint(0, 32_000, (N, T), generator=gen)
        ids[:, :3] = torch.tensor([1, 2, 3])
        last = lengths - 1
        ids[torch.arange(N), last] = 4
        ids[torch.arange(N), last - 1] = 5
    elif case == "small-vocab":  # 8 token types: many chance matches, short runs
        ids = torch.randint(0, 8, (N, T), generator=gen)
    else:  # worst case: identical completions, every run spans the whole completion
        ids = torch.full((N, T), 7)
    return ids * mask.long(), mask, advantages, index


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N={N}, T={T}, group size {G}")
    for case in ("realistic", "small-vocab", "identical"):
        ids, mask, adv, index = batch(case)

        def run():
            forward, backward = conflict_masks(ids, mask, adv, index, N // G)
            return conflict_weights(forward, backward, adv)

        weights = run()
        share = float(((weights != 1) & (mask > 0)).sum() / mask.sum())
        print(f"{case:12s} wall {best_of(run) * 1e3:8.1f} ms   1-thread CPU {cpu_single_thread(run) * 1e3:8.1f} ms"
              f"   (weighted tokens {share:.3%})")
