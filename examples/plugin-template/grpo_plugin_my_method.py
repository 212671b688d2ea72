"""MY METHOD (Author et al., year, arXiv:XXXX.XXXXX): one line on what it changes in GRPO.

The maths first, as pure tensor functions with their shapes and the paper's formula; the config; then
the thin Method class. As written by `grpo-plugins new`, every hook (shape_rewards) is a neutral
placeholder that meets its contract (with ``weight = 1`` nothing changes): replace them with the method.

Shapes: ``N`` completions, ``T`` completion tokens, ``B`` rows of a loss micro-batch, ``P`` prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpo_plugins import NON_NEGATIVE, Example, GRPOBatch, Method, hookimpl, option


@dataclass(frozen=True)
class MyMethodConfig:
    """Options of MY METHOD; every field says what it does, the paper's value and its domain."""

    weight: float = option(1.0, "An example option: the weight of the method's effect.", paper=1.0, domain=NON_NEGATIVE)


class MyMethod(Method):
    """MY METHOD: one line on what it does (the help `grpo-plugins list` shows)."""

    name = "my_method"
    Config = MyMethodConfig
    paper = "https://arxiv.org/abs/XXXX.XXXXX"
    plugin_api = ">=1.3,<2"

    @classmethod
    def example(cls) -> Example:
        """The data the conformance suite exercises the method with: declare named reward components,
        dataset columns, completion texts, the smallest group it accepts (see grpo_plugins.example)."""
        return Example()

    @hookimpl
    def shape_rewards(self, batch: GRPOBatch, rewards: torch.Tensor) -> torch.Tensor:
        """Transform per-completion rewards before advantages are computed.

        Returns:
            ``(N,)`` finite float rewards.

        Replace the placeholder body with the method; the spec: docs/hooks.md.
        """
        return rewards * self.config.weight
