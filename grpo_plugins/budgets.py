"""Exact rollout budgets: split a round's completions over its prompts, summing exactly to the budget.

Methods that decide how many completions each prompt gets (``allocate_rollouts``) share one problem:
turn real-valued wishes (weights, quotas) into ``(P,)`` int64 counts that

- sum exactly to the round's budget (the hook's contract),
- respect a per-prompt minimum (an at-least-``k``-rollouts rule; 0 lets a prompt be dropped) and
  maximum,
- stay proportional to the weights wherever the bounds allow.

:func:`proportional_quotas` solves the bounded proportional split exactly (water-filling: the scale
``s`` with ``sum_i clamp(s w_i, lo_i, hi_i) = total``, found from the sorted break points, no
iteration); :func:`round_to_total` rounds quotas to integers by largest remainder within the bounds
(ties go to the earlier prompt, so the result is deterministic and identical on every rank);
:func:`apportion` does both. All functions are vectorised (sorts and cumulative sums, no loop over
prompts) and handle 10^5 prompts in milliseconds.
"""

from __future__ import annotations

import torch

Bound = int | float | torch.Tensor | None


def _bound(value: Bound, size: int, fill: float) -> torch.Tensor:
    """``(size,)`` float64 per-prompt bound from a scalar, a tensor or None (``fill``)."""
    if value is None:
        return torch.full((size,), fill, dtype=torch.float64)
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return value.double().expand(size).clone()
        if value.shape != (size,):
            raise ValueError(f"a per-prompt bound must have shape ({size},), got {tuple(value.shape)}")
        return value.double().cpu()
    return torch.full((size,), float(value), dtype=torch.float64)


def check_budget(num_prompts: int, total: int, minimum: Bound = 0, maximum: Bound = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` ``(P,)`` float64 bounds, after checking that ``total`` fits between their sums.

    ``hi`` is capped at ``total`` (no prompt can take more), so every value is finite.

    Raises:
        ValueError: a bound is negative or ``lo > hi``, or ``sum(lo) > total`` or ``sum(hi) < total``; the
            message gives the numbers.
    """
    total = int(total)
    lo = _bound(minimum, num_prompts, 0.0)
    hi = torch.minimum(_bound(maximum, num_prompts, float(total)), torch.tensor(float(total), dtype=torch.float64))
    if bool((lo < 0).any()) or bool((lo > hi).any()):
        raise ValueError("per-prompt rollout bounds need 0 <= minimum <= maximum")
    if float(lo.sum()) > total:
        raise ValueError(
            f"a budget of {total} completions cannot give {num_prompts} prompts their minimum "
            f"(needs {int(lo.sum())}); lower the minimum or raise the budget"
        )
    if float(hi.sum()) < total:
        raise ValueError(
            f"a budget of {total} completions exceeds what {num_prompts} prompts may take at their maximum "
            f"({int(hi.sum())}); raise the maximum or lower the budget"
        )
    return lo, hi


def proportional_quotas(weights: torch.Tensor, total: int, minimum: Bound = 0, maximum: Bound = None) -> torch.Tensor:
    """Real quotas ``q = clamp(s w, lo, hi)`` ``(P,)`` float64 with ``sum(q) = total`` (water-filling).

    ``weights``: ``(P,)`` finite, ``>= 0``. ``minimum`` / ``maximum``: scalars or ``(P,)`` per-prompt
    bounds (``maximum=None``: unbounded). ``f(s) = sum_i clamp(s w_i, lo_i, hi_i)`` is piecewise linear
    and non-decreasing in ``s`` with break points ``lo_i / w_i`` and ``hi_i / w_i``; sorting them gives
    ``f`` at every break point by a cumulative sum, and ``s`` follows by linear interpolation on the
    segment where ``f`` reaches ``total``. This is the exact Lagrangian (shadow-price) solution of
    ``min sum_i q_i^2 / w_i`` s.t. ``sum_i q_i = total``, ``lo <= q <= hi``; with ``w_i = sqrt(c_i)`` it is
    also that of ``min sum_i c_i / q_i`` (the square-root rule of variance-minimising allocation).

    When no prompt with room (``hi > lo``) has positive weight, what is left above the minimums is
    split evenly over the prompts with room; likewise what is left once every weighted prompt is at
    its maximum is split evenly over the prompts without weight.

    Raises:
        ValueError: weights negative or not finite, or the bounds cannot meet ``total``.
    """
    w = weights.detach().double().cpu().reshape(-1)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("rollout weights must be finite and >= 0")
    lo, hi = check_budget(w.numel(), total, minimum, maximum)
    room = hi > lo
    active = room & (w > 0)
    floor_total = float(lo.sum())
    if float(total) <= floor_total or not bool(room.any()):
        return lo.clone()
    if not bool(active.any()):  # nothing to be proportional to: split the rest evenly
        w, active = room.double(), room
    full = torch.where(active, hi, lo)
    if float(total) > float(full.sum()):  # the weighted prompts are full: the rest goes evenly to the others
        return proportional_quotas((room & ~active).double(), total, full, hi)
    w_active = torch.where(active, w, torch.ones_like(w))
    start = torch.where(active, lo / w_active, torch.zeros_like(w))  # slope +w_i from here ...
    stop = torch.where(active, hi / w_active, torch.zeros_like(w))  # ... until here
    points = torch.cat([start, stop])
    slopes = torch.cat([torch.where(active, w, 0.0), torch.where(active, -w, 0.0)])
    points, order = torch.sort(points, stable=True)
    slope_after = torch.cumsum(slopes[order], 0)  # slope of f just right of each point
    rise = slope_after[:-1] * (points[1:] - points[:-1])
    values = floor_total + torch.cat([rise.new_zeros(1), torch.cumsum(rise, 0)])  # f at each point
    k = int(torch.searchsorted(values, torch.tensor([float(total)], dtype=torch.float64))[0].clamp(1, points.numel() - 1))
    slope = float(slope_after[k - 1])
    scale = float(points[k - 1]) + (float(total) - float(values[k - 1])) / slope if slope > 0 else float(points[k])
    return torch.where(active, (scale * w).clamp(min=0).clamp(lo, hi), lo)


def round_to_total(quotas: torch.Tensor, total: int, minimum: Bound = 0, maximum: Bound = None) -> torch.Tensor:
    """``(P,)`` int64 counts summing exactly to ``total``: largest-remainder rounding of ``quotas`` ``(P,)``.

    Every count starts at ``floor(q)`` (within ``[minimum, maximum]``); the units still missing go, one
    each, to the prompts with the largest fractional parts that are below their maximum (ties: the
    earlier prompt first). Quotas summing to a little more than ``total`` (floating point) lose units
    from the smallest fractional parts instead.

    Raises:
        ValueError: the bounds cannot meet ``total``.
    """
    q = quotas.detach().double().cpu().reshape(-1)
    lo, hi = check_budget(q.numel(), total, minimum, maximum)
    lo, hi = lo.ceil(), hi.floor()
    counts = torch.floor(q + 1e-9).clamp(min=0)
    counts = torch.maximum(torch.minimum(counts, hi), lo)
    remainder = q - counts
    missing = int(total) - int(counts.sum())
    if missing > 0:
        key = torch.where(counts < hi, remainder, float("-inf"))
        order = torch.sort(key, descending=True, stable=True).indices[:missing]
        counts[order] += 1
    elif missing < 0:
        key = torch.where(counts > lo, remainder, float("inf"))
        order = torch.sort(key, stable=True).indices[:-missing]
        counts[order] -= 1
    counts = counts.long()
    if int(counts.sum()) != int(total) or bool((counts < lo).any()) or bool((counts > hi).any()):
        raise ValueError(f"cannot round quotas to a total of {total} within the bounds")  # quotas far from the total
    return counts


def apportion(weights: torch.Tensor, total: int, minimum: Bound = 0, maximum: Bound = None) -> torch.Tensor:
    """``(P,)`` int64 counts in ``[minimum, maximum]``, summing exactly to ``total``, proportional to ``weights``.

    :func:`proportional_quotas` then :func:`round_to_total`. A prompt with weight 0 and minimum 0 gets
    0 completions (the adapters drop it from the round). With equal weights this is the even split:
    ``total // P`` each and one more for the first ``total % P`` prompts.

    Example (the CurES card): weights ``[0.5, 0.433, 0]``, total 16 -> quotas ``[8.57, 7.43, 0]`` ->
    ``[9, 7, 0]``.
    """
    quotas = proportional_quotas(weights, total, minimum, maximum)
    return round_to_total(quotas, total, minimum, maximum)


def spread_evenly(counts: torch.Tensor, members: torch.Tensor, amount: int) -> torch.Tensor:
    """``counts`` ``(P,)`` plus ``amount`` spread over the ``members`` ``(P,)`` bool mask.

    Each of the ``m`` members gets ``amount // m``; the first ``amount % m`` (in order) one more. Nothing
    changes when ``amount <= 0`` or there is no member.
    """
    if amount <= 0 or not bool(members.any()):
        return counts
    return counts + apportion(members.double(), int(amount)).to(counts.dtype)
