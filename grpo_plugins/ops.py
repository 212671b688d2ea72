"""Vectorised helpers shared by methods: segment (group) statistics over variable-size groups,
masked token means, token log-probs from logits, and batch-global statistics that are correct across
data-parallel ranks.

``index`` is always an ``(N,)`` int64 tensor of group ids in ``[0, G)``; groups may differ in size.
No function here loops over completions or tokens.
"""

from __future__ import annotations

import torch

from grpo_plugins.parallel import ParallelContext


def segment_sum(values: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Sum of ``values`` ``(N, ...)`` per group -> ``(G, ...)``."""
    out = values.new_zeros((num_groups, *values.shape[1:]))
    if values.dim() == 1:  # scatter_add_ is several times faster than index_add_ on 1-D CPU tensors
        return out.scatter_add_(0, index, values)
    return out.index_add_(0, index, values)


def segment_count(index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Number of members of each group -> ``(G,)`` int64."""
    ones = torch.ones((), dtype=torch.long, device=index.device).expand(index.shape[0])
    return torch.zeros(num_groups, dtype=torch.long, device=index.device).scatter_add_(0, index, ones)


def segment_mean(values: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Mean of ``values`` ``(N, ...)`` per group -> ``(G, ...)``; an empty group gives 0."""
    counts = segment_count(index, num_groups).clamp(min=1).to(values.dtype)
    return segment_sum(values, index, num_groups) / counts.view(-1, *([1] * (values.dim() - 1)))


def _centre(values: torch.Tensor, index: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G,)`` group sizes (in ``values``' dtype) and ``(N,)`` values minus their group's mean."""
    counts = segment_count(index, num_groups).to(values.dtype)
    mean = segment_sum(values, index, num_groups) / counts.clamp(min=1)
    return counts, values - mean.index_select(0, index)


def _std(counts: torch.Tensor, centred: torch.Tensor, index: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """``(G,)`` standard deviation from group sizes and centred values; 0 without spread."""
    squared = segment_sum(centred**2, index, counts.shape[0])
    dof = (counts - 1) if unbiased else counts
    return torch.where(dof > 0, squared / dof.clamp(min=1), torch.zeros_like(squared)).sqrt()


def segment_std(
    values: torch.Tensor, index: torch.Tensor, num_groups: int, unbiased: bool = True
) -> torch.Tensor:
    """Standard deviation of ``values`` ``(N,)`` per group -> ``(G,)``.

    ``unbiased`` divides by ``n - 1`` (torch's default). A group of one (or an empty group) has no
    spread and gets 0, never NaN.
    """
    counts, centred = _centre(values, index, num_groups)
    return _std(counts, centred, index, unbiased)


def group_ranks(index: torch.Tensor, num_groups: int, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Position of each member within its group -> ``(N,)`` int64 in ``[0, size_g)``.

    Ascending by ``scores`` ``(N,)`` (ties broken by batch position), or by batch position when
    ``scores`` is None. Two stable sorts order the batch by (group, score, position); a batch already
    stored group by group needs none when ``scores`` is None.
    """
    sizes = segment_count(index, num_groups)
    starts = torch.cumsum(sizes, 0) - sizes
    position = torch.arange(index.numel(), device=index.device)
    if scores is None and bool((index[1:] >= index[:-1]).all()):
        return position - starts[index]
    order = position if scores is None else torch.sort(scores, stable=True).indices
    order = order[torch.sort(index[order], stable=True).indices]
    ranks = torch.empty_like(position)
    ranks[order] = position - starts[index[order]]
    return ranks


def segment_max(values: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Maximum of ``values`` ``(N,)`` per group -> ``(G,)``; an empty group gives -inf."""
    out = values.new_full((num_groups,), float("-inf"))
    return out.scatter_reduce_(0, index, values, reduce="amax", include_self=True)


def segment_min(values: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Minimum of ``values`` ``(N,)`` per group -> ``(G,)``; an empty group gives +inf."""
    out = values.new_full((num_groups,), float("inf"))
    return out.scatter_reduce_(0, index, values, reduce="amin", include_self=True)


def constant_groups(values: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``(G,)`` bool: whether every member of the group has the same value (``values`` ``(N,)``).

    Decided by comparing the group's minimum and maximum, so it is exact at any scale (a float mean of
    equal values need not equal them). Groups of one and empty groups count as constant.
    """
    return segment_max(values, index, num_groups) <= segment_min(values, index, num_groups)


def group_normalize(
    rewards: torch.Tensor,
    index: torch.Tensor,
    num_groups: int,
    scale_by_std: bool = True,
    epsilon: float = 1e-6,
) -> torch.Tensor:
    """GRPO's group-relative advantage ``(r - mean_g) / (std_g + epsilon)`` -> ``(N,)``.

    ``rewards``: ``(N,)``; std is unbiased. With ``scale_by_std=False`` only the mean is removed
    (Dr. GRPO). A group whose rewards are all equal gets exactly 0 (at any reward scale: the float
    rounding residue of its mean is not divided by ``std + epsilon``); other groups are untouched.
    """
    counts, centred = _centre(rewards, index, num_groups)
    if scale_by_std:
        centred = centred / (_std(counts, centred, index, unbiased=True).index_select(0, index) + epsilon)
    constant = constant_groups(rewards, index, num_groups).index_select(0, index)
    return centred.masked_fill(constant, 0.0)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``values * mask`` over ``dim`` (all elements when ``None``). Where ``mask`` is 0 the value
    is not read: NaN or inf in padding positions adds 0 (and gets a zero gradient)."""
    weighted = torch.where(mask != 0, values * mask, 0.0)
    return weighted.sum() if dim is None else weighted.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` ``(N, T)`` over the tokens where ``mask`` ``(N, T)`` is non-zero.

    With ``dim=None`` one scalar over all tokens; with ``dim=-1`` one value per row ``(N,)``. Rows
    (or batches) without any unmasked token give 0.
    """
    total = masked_sum(values, mask, dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1)


def token_log_probs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs ``(B, T)`` of ``tokens`` ``(B, T)`` under ``softmax(logits / temperature)`` from ``logits``
    ``(B, T, V)``, and that distribution's entropy ``-sum_v p_v log p_v`` ``(B, T)`` when ``entropy``
    (else None). Computed in the logits' dtype: pass float32 logits for float32 statistics."""
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    picked = log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked, (-(log_p.exp() * log_p).sum(-1) if entropy else None)


def global_masked_mean(values: torch.Tensor, mask: torch.Tensor, parallel: ParallelContext) -> torch.Tensor:
    """Token mean of ``values`` ``(N, T)`` over ``mask`` across all data-parallel ranks -> scalar."""
    sums = torch.stack([masked_sum(values, mask), mask.sum().to(values.dtype)])
    total, count = parallel.all_reduce_sum(sums).unbind()
    return total / count.clamp(min=1)


def global_mean_std(
    values: torch.Tensor, parallel: ParallelContext, unbiased: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of every element of ``values`` across all ranks -> two scalars.

    Computed from global (count, sum, sum of squares about a shared shift) so that it equals the
    single-process statistic of the concatenated batch. Fewer than two elements give std 0.
    """
    flat = values.reshape(-1)
    count = parallel.all_reduce_sum(flat.new_tensor([flat.numel()]))[0]
    mean = parallel.all_reduce_sum(flat.sum().reshape(1))[0] / count.clamp(min=1)
    squared = parallel.all_reduce_sum(((flat - mean) ** 2).sum().reshape(1))[0]
    dof = count - 1 if unbiased else count
    std = torch.where(dof > 0, squared / dof.clamp(min=1), torch.zeros_like(squared)).sqrt()
    return mean, std


def global_max_min(values: torch.Tensor, parallel: ParallelContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximum and minimum of every element of ``values`` on every rank -> two float64 scalars
    (``-inf`` and ``+inf`` when no rank has an element).

    Through a sum: each rank writes ``(has values, max, min)`` into its own row of a zero
    ``(world_size, 3)`` table, and a rank without values is skipped through the first column.
    """
    flat = values.reshape(-1)
    slots = flat.new_zeros(parallel.world_size, 3, dtype=torch.float64)
    if flat.numel():
        slots[parallel.rank] = torch.stack([flat.new_ones(()), flat.max(), flat.min()]).double()
    present, highest, lowest = parallel.all_reduce_sum(slots).unbind(1)
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=slots.device)
    return torch.where(present > 0, highest, -inf).max(), torch.where(present > 0, lowest, inf).min()


def global_all_equal(values: torch.Tensor, parallel: ParallelContext) -> torch.Tensor:
    """Scalar bool: whether every element of ``values`` on every rank is the same value (no element at
    all counts as equal). Decided exactly from :func:`global_max_min`, not from a float variance or
    mean, which can keep a rounding residue."""
    highest, lowest = global_max_min(values, parallel)
    return highest <= lowest
