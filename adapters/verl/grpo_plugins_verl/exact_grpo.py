"""The built-in ``grpo`` estimator with verl's float arithmetic, so plain runs match verl bit for bit.

verl's ``compute_grpo_outcome_advantage`` takes ``torch.mean`` and ``torch.std`` of each group's
stacked scores. On CPU ``torch.std`` runs Welford's algorithm and ``torch.mean`` torch's reduction
kernel, while the core's ``group_normalize`` builds the same statistics from ``index_add_`` sums
(two-pass). Both are correct; they differ in the last bit (up to 1.2e-7 on unit-scale rewards).

:func:`torch_group_mean_std` reproduces torch's arithmetic without a loop over groups: groups of
equal size are stacked into one ``(G_s, s)`` matrix (members in batch order) and reduced with
``mean(dim=1)`` / ``std(dim=1)``, which gives each row exactly what the 1-D call gives (checked in
the tests). The only loop is over the distinct group sizes.
"""

from __future__ import annotations

import torch

from grpo_plugins import GRPOBatch, hookimpl
from grpo_plugins.default import GRPO


def torch_group_mean_std(values: torch.Tensor, index: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``torch.mean`` and unbiased ``torch.std`` of ``values`` ``(N,)`` -> two ``(G,)``.

    ``index`` ``(N,)`` holds group ids in ``[0, G)``. Each group is reduced in batch order, exactly as
    ``torch.std(torch.stack(group))`` would. Groups of one get mean = their value and std = NaN
    (torch's own result); callers decide what a single completion means.
    """
    order = torch.sort(index, stable=True).indices  # members of a group stay in batch order
    sizes = torch.bincount(index, minlength=num_groups)
    starts = torch.cumsum(sizes, 0) - sizes
    mean = values.new_zeros(num_groups)
    std = values.new_zeros(num_groups)
    for size in torch.unique(sizes[sizes > 0]).tolist():
        groups = (sizes == size).nonzero().flatten()  # (G_s,)
        members = order[starts[groups, None] + torch.arange(size)]  # (G_s, size) row indices
        stacked = values[members]
        mean[groups] = stacked.mean(dim=1)
        std[groups] = stacked.std(dim=1) if size > 1 else torch.full_like(stacked[:, 0], float("nan"))
    return mean, std


class VerlGRPO(GRPO):
    """The built-in ``grpo`` method, computed with verl's arithmetic for ``scale`` "group" and "none".

    Same maths, config and checks as :class:`grpo_plugins.default.GRPO` (which it extends);
    ``scale="batch"`` is left to the core.
    """

    @hookimpl
    def compute_advantages(self, batch: GRPOBatch) -> torch.Tensor:
        """``(N,)`` ``(r - mean_g) / (std_g + epsilon)`` (or ``r - mean_g``), rounded as verl rounds it."""
        if self.config.scale == "batch":
            return super().compute_advantages(batch)
        sizes = batch.group_sizes
        if bool((sizes < 2).any()):  # same contract as the core method: the core raises for groups of one
            return super().compute_advantages(batch)
        rewards, index = batch.rewards, batch.group_index
        mean, std = torch_group_mean_std(rewards, index, batch.num_groups)
        centred = rewards - mean[index]
        advantages = centred / (std[index] + self.config.epsilon) if self.config.scale == "group" else centred
        self.log_metric("frac_zero_advantage", (advantages == 0).float().mean())
        return advantages
