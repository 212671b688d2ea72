"""Group statistics in the trainers' own float arithmetic, so that the built-in ``grpo`` reproduces each
trainer's advantages bit for bit.

The same mean and standard deviation can be rounded differently: :mod:`grpo_plugins.ops` builds them
from segment sums (one pass over the batch, any group sizes); TRL reduces a ``(B, G)`` view with
``nanmean`` and a two-pass ``nanstd``; verl reduces each group's stacked scores with ``torch.mean`` and
``torch.std``. The results agree to ~1e-7 but not in the last bit. The functions here take the
reduction each trainer takes, on the same shapes:

- :func:`stacked_groups` gathers the groups of each distinct size into one ``(G_s, s, ...)`` tensor,
  members in batch order: a reduction over ``dim=1`` then gives each group exactly what the trainer's
  reduction gives it (TRL's view is this tensor when groups are consecutive blocks of ``G`` rows;
  verl's per-group 1-D calls round each row the same way). The only loop is over distinct sizes.
- ``arithmetic="trl"``: ``mean = nanmean``, ``std = sqrt(nanmean((x - mean)^2) * n / (n - 1))``
  (NaN entries ignored, as TRL ignores unscorable rows and reward functions that returned None).
- ``arithmetic="verl"``: ``torch.mean`` and unbiased ``torch.std``; a group of one is scored against
  mean 0 and std 1, as verl scores it.
"""

from __future__ import annotations

from typing import Iterator, Literal

import torch

Arithmetic = Literal["trl", "verl"]


def stacked_groups(values: torch.Tensor, index: torch.Tensor, num_groups: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per distinct group size ``s``: ``(groups (G_s,), stacked (G_s, s, ...))`` of ``values`` ``(N, ...)``.

    ``index`` ``(N,)`` holds group ids in ``[0, G)``; members of a group keep their batch order.
    """
    order = torch.sort(index, stable=True).indices
    sizes = torch.bincount(index, minlength=num_groups)
    starts = torch.cumsum(sizes, 0) - sizes
    for size in torch.unique(sizes[sizes > 0]).tolist():
        groups = (sizes == size).nonzero().flatten()
        members = order[starts[groups, None] + torch.arange(size, device=values.device)]  # (G_s, s)
        yield groups, values[members]


def two_pass_std(values: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """NaN-ignoring unbiased std: ``sqrt(nanmean((x - nanmean x)^2) * n / (n - 1))`` over ``dim``
    (all elements when None); NaN where fewer than two values count. TRL's ``nanstd``, op for op."""
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    variance = torch.nanmean((values - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(values), dim=dim, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(count, float("nan"), dtype=variance.dtype))
    std = torch.sqrt(variance * correction)
    if keepdim:
        return std
    return std.squeeze() if dim is None else std.squeeze(dim)


def group_mean_std(
    values: torch.Tensor, index: torch.Tensor, num_groups: int, arithmetic: Arithmetic
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's mean and unbiased std of ``values`` ``(N, ...)`` -> two ``(G, ...)``, rounded as the
    trainer named by ``arithmetic`` rounds them (see the module docstring)."""
    mean = values.new_zeros((num_groups, *values.shape[1:]))
    std = values.new_ones((num_groups, *values.shape[1:]))
    for groups, stacked in stacked_groups(values, index, num_groups):
        if arithmetic == "trl":
            mean[groups], std[groups] = torch.nanmean(stacked, dim=1), two_pass_std(stacked, dim=1)
        elif stacked.shape[1] > 1:  # verl: a group of one keeps mean 0 and std 1
            mean[groups], std[groups] = stacked.mean(dim=1), stacked.std(dim=1)
    return mean, std
