"""The built-in ``grpo`` estimator with verl's own arithmetic, so plain runs match verl's ``grpo``.

verl's ``compute_grpo_outcome_advantage`` takes ``torch.mean`` and ``torch.std`` of each group's
stacked scores (on CPU ``torch.std`` is Welford's algorithm), and scores a group of one against mean
0 and std 1. The core's ``group_normalize`` builds the same statistics from ``index_add_`` sums; both
are correct but differ in the last bit (up to 1.2e-7 on unit-scale rewards).

:func:`torch_group_mean_std` reproduces torch's arithmetic without a loop over groups: groups of
equal size are stacked into one ``(G_s, s)`` matrix (members in batch order) and reduced with
``mean(dim=1)`` / ``std(dim=1)``, which gives each row exactly what the 1-D call gives. The only loop
is over the distinct group sizes.

One deliberate difference: a group whose rewards are all equal gets advantage exactly 0. verl leaves
the rounding residue of its float32 mean, divided by ``std + 1e-6`` (``-0.83`` for 12 completions
of reward 123.4).
"""

from __future__ import annotations

import torch

from grpo_plugins import GRPOBatch, hookimpl
from grpo_plugins.default import GRPO
from grpo_plugins.ops import segment_max, segment_min


def torch_group_mean_std(values: torch.Tensor, index: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's per-group ``torch.mean`` and unbiased ``torch.std`` of ``values`` ``(N,)`` -> two ``(G,)``.

    ``index`` ``(N,)`` holds group ids in ``[0, G)``. Each group is reduced in batch order, exactly as
    ``torch.std(torch.stack(group))``; a group of one gets mean 0 and std 1, as in verl.
    """
    order = torch.sort(index, stable=True).indices  # members of a group stay in batch order
    sizes = torch.bincount(index, minlength=num_groups)
    starts = torch.cumsum(sizes, 0) - sizes
    mean = values.new_zeros(num_groups)
    std = values.new_ones(num_groups)
    for size in torch.unique(sizes[sizes > 1]).tolist():
        groups = (sizes == size).nonzero().flatten()  # (G_s,)
        stacked = values[order[starts[groups, None] + torch.arange(size, device=values.device)]]  # (G_s, size)
        mean[groups] = stacked.mean(dim=1)
        std[groups] = stacked.std(dim=1)
    return mean, std


class VerlGRPO(GRPO):
    """The built-in ``grpo`` method computed as verl's ``grpo`` for ``scale`` "group" and "none".

    Same config as :class:`grpo_plugins.default.GRPO`; groups of one are scored as verl scores them
    (mean 0, std 1) instead of refused; ``scale="batch"`` is left to the core.
    """

    @hookimpl
    def compute_advantages(self, batch: GRPOBatch) -> torch.Tensor:
        """``(N,)`` ``(r - mean_g) / (std_g + epsilon)`` (or ``r - mean_g``), rounded as verl rounds it;
        exactly 0 for a group whose rewards are all equal."""
        if self.config.scale == "batch":
            return super().compute_advantages(batch)
        rewards, index, groups = batch.rewards, batch.group_index, batch.num_groups
        mean, std = torch_group_mean_std(rewards, index, groups)
        centred = rewards - mean[index]
        advantages = centred / (std[index] + self.config.epsilon) if self.config.scale == "group" else centred
        constant = (segment_max(rewards, index, groups) == segment_min(rewards, index, groups)) & (batch.group_sizes > 1)
        advantages = torch.where(constant[index], torch.zeros_like(advantages), advantages)
        self.log_metric("frac_zero_advantage", (advantages == 0).float().mean())
        return advantages
