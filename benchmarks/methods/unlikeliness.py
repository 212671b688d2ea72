"""Unlikeliness: reward shaping (sequence scores, ranks within each group, penalised rewards) on ``N``
completions x ``T`` tokens in shuffled groups of 16."""

from __future__ import annotations

from grpo_plugins.testing import make_batch
from grpo_plugin_unlikeliness import Unlikeliness

METHOD = "unlikeliness"


def benchmark_cases(quick: bool) -> list[dict]:
    n, t = (2_000, 50) if quick else (20_000, 50)
    batch = make_batch(group_sizes=(16,) * (n // 16), num_tokens=t, seed=1)
    method = Unlikeliness()
    return [{"case": "shape_rewards", "size": f"{n} x {t} tokens, groups of 16",
             "run": lambda: method.shape_rewards(batch=batch, rewards=batch.rewards)}]
