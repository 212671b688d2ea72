"""Time LLDS's action gate and penalty on 1e4 completions x 512 tokens (CPU).

Run: ``python plugins/llds/benchmarks/bench_llds.py``. Prints the best of several repeats.
"""

from __future__ import annotations

import torch

from grpo_plugins.testing import best_of, cpu_single_thread
from grpo_plugin_llds import displacement_gate, llds_penalty

N, T = 10_000, 512


if __name__ == "__main__":
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(T // 4, T + 1, (N,), generator=gen)
    mask = (torch.arange(T) < lengths[:, None]).float()
    tool = torch.zeros(N, T, dtype=torch.bool)  # three tool outputs of 40 tokens per completion
    for start in (100, 220, 340):
        tool[:, start : start + 40] = True
    mask = mask * (~tool)
    old = -torch.rand(N, T, generator=gen) * 3
    new = old + 0.05 * torch.randn(N, T, generator=gen)
    advantages = torch.randn(N, 1, generator=gen).expand(N, T)
    preserving = (mask > 0) & (advantages >= 0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N={N}, T={T}")
    for level in ("action", "response"):
        displacement = old - new
        gate = lambda: displacement_gate(displacement, preserving, level)  # noqa: E731
        full = lambda: llds_penalty(new, old, advantages, mask, level)  # noqa: E731
        print(f"{level:9s} gate: wall {best_of(gate) * 1e3:7.1f} ms, 1-thread CPU {cpu_single_thread(gate) * 1e3:7.1f} ms"
              f" | gate + penalty: wall {best_of(full) * 1e3:7.1f} ms, 1-thread CPU {cpu_single_thread(full) * 1e3:7.1f} ms")
