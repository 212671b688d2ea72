"""GTPO: conflict detection and token weights (``N x T`` tokens, groups of 8, 0/1 rewards, lengths
``T/4 .. T``) for three token distributions: realistic, a tiny vocabulary (many chance matches) and the
worst case (identical completions: every run spans the whole completion)."""

from __future__ import annotations

import torch

from grpo_plugin_gtpo import conflict_masks, conflict_weights

METHOD = "gtpo"
GROUP = 8


def batch(case: str, n: int, t: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    index = torch.arange(n) // GROUP
    lengths = torch.randint(t // 4, t + 1, (n,), generator=gen)
    mask = (torch.arange(t) < lengths[:, None]).float()
    rewards = torch.randint(0, 2, (n,), generator=gen).float()
    means = torch.zeros(n // GROUP).index_add_(0, index, rewards) / GROUP
    advantages = rewards - means[index]
    if case == "realistic":  # 32k vocabulary, a shared 3-token opening and 2-token closing
        ids = torch.randint(0, 32_000, (n, t), generator=gen)
        ids[:, :3] = torch.tensor([1, 2, 3])
        last = lengths - 1
        ids[torch.arange(n), last] = 4
        ids[torch.arange(n), last - 1] = 5
    elif case == "small-vocab":  # 8 token types: many chance matches, short runs
        ids = torch.randint(0, 8, (n, t), generator=gen)
    else:  # identical completions: every run spans the whole completion
        ids = torch.full((n, t), 7)
    return ids * mask.long(), mask, advantages, index


def benchmark_cases(quick: bool) -> list[dict]:
    n, t = (1_000, 512) if quick else (10_000, 512)
    cases = []
    for case in ("realistic", "small-vocab", "identical"):
        ids, mask, advantages, index = batch(case, n, t)

        def run(ids=ids, mask=mask, advantages=advantages, index=index):
            forward, backward = conflict_masks(ids, mask, advantages, index, n // GROUP)
            return conflict_weights(forward, backward, advantages)

        weights = run()
        share = float(((weights != 1) & (mask > 0)).sum() / mask.sum())
        cases.append({"case": f"conflict masks + weights ({case})", "size": f"{n} x {t} tokens, groups of {GROUP}",
                      "run": run, "note": f"weighted tokens {share:.3%}"})
    return cases
