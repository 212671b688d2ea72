"""LLDS: the action gate and the full penalty on completions with tool outputs (``N x T`` tokens, lengths
``T/4 .. T``, three 40-token tool outputs per completion masked out), at both gate levels."""

from __future__ import annotations

import torch

from grpo_plugin_llds import displacement_gate, llds_penalty

METHOD = "llds"


def benchmark_cases(quick: bool) -> list[dict]:
    n, t = (1_000, 512) if quick else (10_000, 512)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(t // 4, t + 1, (n,), generator=gen)
    mask = (torch.arange(t) < lengths[:, None]).float()
    tool = torch.zeros(n, t, dtype=torch.bool)
    for start in (100, 220, 340):
        tool[:, start : start + 40] = True
    mask = mask * (~tool)
    old = -torch.rand(n, t, generator=gen) * 3
    new = old + 0.05 * torch.randn(n, t, generator=gen)
    advantages = torch.randn(n, 1, generator=gen).expand(n, t)
    preserving = (mask > 0) & (advantages >= 0)
    displacement = old - new
    size = f"{n} x {t} tokens"
    cases = []
    for level in ("action", "response"):
        cases.append({"case": f"gate ({level} level)", "size": size,
                      "run": lambda level=level: displacement_gate(displacement, preserving, level)})
        cases.append({"case": f"gate + penalty ({level} level)", "size": size,
                      "run": lambda level=level: llds_penalty(new, old, advantages, mask, level)})
    return cases
