"""Checks of batches (built by adapters) and of hook outputs (returned by methods)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from grpo_plugins.errors import BatchError

_TOKEN_FIELDS = ("completion_ids", "completion_mask", "old_log_probs", "ref_log_probs", "old_entropies")


def validate_batch(batch: Any) -> None:
    """Raise :class:`BatchError` naming what is wrong with a ``GRPOBatch``.

    Checked: ``prompt_ids`` is ``(N,)`` integer with ``N > 0``; ``rewards`` is ``(N,)`` and finite;
    ``reward_components`` is ``(N, K)`` and ``reward_weights`` ``(K,)``; token tensors are ``(N, T)``
    and agree; ``prompts`` / ``completions`` / ``rows`` hold ``N`` items; the completion mask keeps
    at least one token.
    """
    ids = batch.prompt_ids
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype.is_floating_point:
        raise BatchError(f"prompt_ids must be an (N,) integer tensor, got {_describe(ids)}")
    n = ids.shape[0]
    if n == 0:
        raise BatchError("the batch is empty (no completions, so every group is empty)")
    rewards = batch.rewards
    if not isinstance(rewards, torch.Tensor) or tuple(rewards.shape) != (n,):
        raise BatchError(f"rewards must be ({n},) to match prompt_ids, got {_describe(rewards)}")
    bad = ~torch.isfinite(rewards)
    if bad.any():
        where = bad.nonzero().flatten()[:5].tolist()
        raise BatchError(
            f"rewards contain NaN/inf at completions {where} (prompt ids {ids[where].tolist()}); "
            "fix the reward function or map a missing reward to a number"
        )
    comps = batch.reward_components
    if comps is not None and (not isinstance(comps, torch.Tensor) or comps.dim() != 2 or comps.shape[0] != n):
        raise BatchError(f"reward_components must be ({n}, K), got {_describe(comps)}")
    weights = batch.reward_weights
    if comps is not None and weights is not None and tuple(weights.shape) != (comps.shape[1],):
        raise BatchError(f"reward_weights must be (K,) = ({comps.shape[1]},) like reward_components, got {_describe(weights)}")
    shape = None
    for name in _TOKEN_FIELDS:
        value = getattr(batch, name)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[0] != n or (shape is not None and tuple(value.shape) != shape):
            raise BatchError(f"{name} must be (N, T) = ({n}, T) like the other token tensors, got {_describe(value)}")
        shape = tuple(value.shape)
    for name in ("prompts", "completions", "rows"):
        value = getattr(batch, name)
        if value is not None and len(value) != n:
            raise BatchError(f"{name} must hold N={n} items like prompt_ids, got {len(value)}")
    steps = getattr(batch, "steps", None)
    if steps is not None:
        width = shape[1] if shape is not None else int(steps.end.max()) if steps.num_steps else 0
        problems = steps.problems(n, width)
        if problems:
            raise BatchError("steps (the multi-turn records): " + "; ".join(problems))
    if batch.completion_mask is not None and not bool(batch.completion_mask.gt(0).any()):
        raise BatchError("completion_mask masks every token of the batch; nothing is left to learn from")


def check_output(
    output: Any,
    shape: tuple | Sequence[tuple] | None = None,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    total: int | None = None,
    dtype: str | None = None,
) -> str | None:
    """What is wrong with a hook's tensor output, or None if it meets its contract.

    ``shape``: the required shape, or a list of accepted shapes. ``dtype``: ``"float"`` (a
    floating-point tensor), ``"count"`` (whole numbers: integers, or floats holding whole numbers),
    ``"bool"`` or None (any). ``integer``: the same as ``dtype="count"``. ``low``/``high``: inclusive
    bounds. ``total``: the required sum. Floats must be finite.
    """
    if not isinstance(output, torch.Tensor):
        return f"must return a torch.Tensor, got {type(output).__name__}"
    if shape is not None:
        several = len(shape) > 0 and isinstance(shape[0], (tuple, list))
        accepted = [tuple(s) for s in shape] if several else [tuple(shape)]
        if tuple(output.shape) not in accepted:
            return f"returned shape {tuple(output.shape)}, expected {' or '.join(str(s) for s in accepted)}"
    if dtype == "float" and not output.dtype.is_floating_point:
        return f"must return a floating-point tensor, got dtype {output.dtype} (values would be truncated)"
    if dtype == "bool" and output.dtype != torch.bool:
        return f"must return a bool tensor, got dtype {output.dtype}"
    if output.dtype.is_floating_point and not bool(torch.isfinite(output).all()):
        return f"returned {int((~torch.isfinite(output)).sum())} NaN/inf value(s)"
    integer = integer or dtype == "count"
    if integer and output.dtype == torch.bool:
        return "must return integers, got a bool tensor"
    if integer and (output.dtype.is_complex or (output.dtype.is_floating_point and not torch.equal(output, output.round()))):
        return f"must return integers, got dtype {output.dtype} with fractional values"
    if low is not None and output.numel() and bool((output < low).any()):
        return f"returned values below {low} (min {output.min().item()})"
    if high is not None and output.numel() and bool((output > high).any()):
        return f"returned values above {high} (max {output.max().item()})"
    if total is not None and int(output.sum()) != total:
        return f"returned counts summing to {int(output.sum())}, expected the budget {total}"
    return None


def check_contract(output: Any, contract: Any, values: Mapping[str, Any]) -> str | None:
    """What is wrong with a tensor ``output`` under a hook table contract
    (:class:`grpo_plugins.hooktable.Output`), or None.

    ``values`` resolves the contract's symbols: dimensions (``"N"``, ``"T"``, ``"B"``, ``"P"``; a
    ranged dimension such as ``"P'"`` maps to ``(low, high, what high is)``) and named bounds
    (``"dataset_size - 1"``, ``"budget"``). A shape using a symbol the call leaves out (or sets to
    None) is not accepted.
    """
    if not isinstance(output, torch.Tensor):
        return check_output(output)
    shapes = []
    for shape in contract.shapes:
        ranged = [symbol for symbol in shape if isinstance(values.get(symbol), tuple)]
        if ranged:
            symbol = ranged[0]
            first, last, what = values[symbol]
            size = tuple(output.shape)
            if len(size) != len(shape) or not first <= size[shape.index(symbol)] <= last:
                wanted = "(" + ", ".join(str(s) for s in shape) + (",)" if len(shape) == 1 else ")")
                return f"returned shape {size}, expected {wanted} with {first} <= {symbol} <= {what} {last}"
            shapes.append(size)
        else:
            resolved = tuple(values.get(s) if isinstance(s, str) else s for s in shape)
            if None not in resolved:  # a dimension the call does not have (no tokens): shape not accepted
                shapes.append(resolved)
    if contract.shapes and not shapes:
        return f"returned shape {tuple(output.shape)}, but this call has none of the dimensions its contract names"
    return check_output(
        output,
        shape=shapes or None,
        low=_resolve(contract.low, values),
        high=_resolve(contract.high, values),
        total=_resolve(contract.total, values),
        dtype=None if contract.dtype == "any" else contract.dtype,
    )


def _resolve(bound: Any, values: Mapping[str, Any]) -> Any:
    return values[bound] if isinstance(bound, str) else bound


def check_plain_state(state: Any, path: str = "state") -> str | None:
    """Whether ``state`` holds only tensors and plain Python values; the first offending path otherwise."""
    if state is None or isinstance(state, (torch.Tensor, bool, int, float, str)):
        return None
    if isinstance(state, (list, tuple)):
        for i, item in enumerate(state):
            problem = check_plain_state(item, f"{path}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(state, dict):
        for key, item in state.items():
            if not isinstance(key, (str, int)):
                return f"{path} has a key of type {type(key).__name__}; use str or int keys"
            problem = check_plain_state(item, f"{path}[{key!r}]")
            if problem:
                return problem
        return None
    return f"{path} is a {type(state).__name__}; state may hold only tensors and plain Python values"


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__
