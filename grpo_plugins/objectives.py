"""Trainer-independent pieces of the loss objectives (hook ``loss_objectives``) and whole-group batching.

An adapter that provides the features ``loss_normalisers`` and ``whole_groups`` needs three things
that do not depend on the trainer:

- which enabled methods need every group of the batch in one loss micro-batch
  (:func:`whole_group_methods`);
- a row order that keeps each group's rows together, groups in a chosen order
  (:func:`contiguous_group_order`), and a check that a micro-batch holds only complete groups
  (:func:`incomplete_groups`);
- the micro-batch's share of every :class:`~grpo_plugins.LossTerm`, scaled for the trainer's
  gradient averaging over ranks (:func:`reduce_objectives`).

What remains in an adapter is where the counts come from (TRL's ``num_items_in_batch``, verl's
global batch info) and where the rows are reordered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import torch

from grpo_plugins.batch import LossTerm, LossTotals

if TYPE_CHECKING:
    from grpo_plugins.composition import Composition


def whole_group_methods(composition: "Composition") -> list[str]:
    """Methods whose loss hooks need every group in one micro-batch (feature ``whole_groups`` or loss
    field ``group_index``), sorted."""
    return sorted(set(composition.needers("features", "whole_groups")) | set(composition.needers("loss_fields", "group_index")))


def contiguous_group_order(group_index: torch.Tensor, group_order: torch.Tensor | None = None) -> torch.Tensor:
    """``(N,)`` row permutation that puts each group's rows next to each other.

    Args:
        group_index: ``(N,)`` int64 group of each row, ``0 .. G-1``.
        group_order: ``(G,)`` the groups in the order they should come (a permutation of ``0 .. G-1``);
            default ascending ids.

    Returns:
        ``order`` with ``rows[order]`` grouped: groups in ``group_order``, a group's rows in their original
        order (a stable sort on each row's group position).
    """
    key = group_index
    if group_order is not None:
        position = torch.empty_like(group_order)
        position[group_order] = torch.arange(group_order.numel(), device=group_order.device)
        key = position.index_select(0, group_index)
    return torch.sort(key, stable=True).indices


def incomplete_groups(group_index: torch.Tensor, group_size: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: the row's group has fewer rows in this micro-batch than in the whole batch.

    Args:
        group_index: ``(B,)`` int64 group of each row of the micro-batch (any ids).
        group_size: ``(B,)`` the size of each row's group in the whole batch.
    """
    _, inverse, counts = torch.unique(group_index, return_inverse=True, return_counts=True)
    return counts.index_select(0, inverse.reshape(-1)) != group_size.to(counts.dtype)


def reduce_objectives(
    objectives: Mapping[str, LossTerm],
    mask: torch.Tensor,
    totals: LossTotals,
    group_size: torch.Tensor | None,
    scale: float = 1.0,
) -> tuple[torch.Tensor | float, dict[str, torch.Tensor]]:
    """This micro-batch's share of every term: ``(sum of the shares, {name: share})``, in name order.

    Each share is ``term.reduce(mask, totals, group_size) * scale``; ``scale`` undoes the trainer's
    averaging of gradients over data-parallel ranks (the number of ranks for DDP / FSDP), so that the
    shares of every micro-batch and rank add up to the step's value of each term. The sum is 0.0 (a
    float) when there is no term.

    Args:
        objectives: ``{"<method>/<term>": LossTerm}`` (``LossParts.objectives``).
        mask: ``(B, T)`` the trainer's completion mask of the micro-batch.
        totals: the step's token, sequence and group counts (every micro-batch, every rank).
        group_size: ``(B,)`` size of each row's group in the global batch (``group`` terms only).
    """
    total: torch.Tensor | float = 0.0
    shares: dict[str, torch.Tensor] = {}
    for name in sorted(objectives):  # the same order on every rank
        share = objectives[name].reduce(mask, totals, group_size) * scale
        shares[name] = share
        total = total + share
    return total, shares
