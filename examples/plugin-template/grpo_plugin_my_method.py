"""MY METHOD (Author et al., year, arXiv:XXXX.XXXXX): one line on what it changes in GRPO.

The maths first, as pure tensor functions with their shapes; the config; then the thin Method class.
This template clips the estimator's advantages to ``[-clip, clip]``; replace it with your method:

    A'_i = min(max(A_i, -clip), clip)

``A``: ``(N,)`` per-completion or ``(N, T)`` per-token advantages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpo_plugins import GRPOBatch, Method, hookimpl, option


def clipped_advantages(advantages: torch.Tensor, clip: float) -> torch.Tensor:
    """``advantages`` ``(N,)`` or ``(N, T)`` clipped to ``[-clip, clip]``; same shape."""
    return advantages.clamp(-clip, clip)


@dataclass(frozen=True)
class MyMethodConfig:
    """Options of MY METHOD; every field says what it does and the paper's value."""

    clip: float = option(2.0, "Largest advantage magnitude kept.", paper=2.0)

    def __post_init__(self):
        if self.clip <= 0:
            raise ValueError(f"clip must be > 0, got {self.clip}")


class MyMethod(Method):
    """MY METHOD: clip advantages to [-clip, clip] (the first line is the help `grpo-plugins list` shows)."""

    name = "my_method"
    Config = MyMethodConfig
    paper = "https://arxiv.org/abs/XXXX.XXXXX"

    @hookimpl
    def adjust_advantages(self, batch: GRPOBatch, advantages: torch.Tensor) -> torch.Tensor:
        """``(N,)`` or ``(N, T)`` advantages, clipped."""
        clipped = clipped_advantages(advantages, self.config.clip)
        self.log_metric("frac_clipped", (clipped != advantages).float().mean())
        return clipped
