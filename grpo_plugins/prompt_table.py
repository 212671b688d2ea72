"""Per-prompt state for stateful methods (trackers, posteriors, reward histories), and the helpers
that curricula share around it.

- :class:`PromptTable`: columns keyed by int64 prompt id, so dataset indices and 63-bit text hashes
  work alike; vectorised lookups, inserts, overwrites (:meth:`~PromptTable.set`) and accumulations
  (:meth:`~PromptTable.add`); checkpointable as plain tensors.
- :func:`unit_outcomes` / :func:`group_outcomes`: per-completion success in ``[0, 1]`` from rewards
  (mapped from a reward range, or thresholded), and per-prompt successes and trials of a batch: what
  pass-rate trackers count.
- :func:`draw_weighted`: draw prompts with probability proportional to weights from a seeded
  generator (without replacement while enough prompts have positive weight).

Shapes: ``N`` completions, ``G`` groups (distinct prompts of a batch), ``K`` tracked prompts,
``D`` candidate prompts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from grpo_plugins.batch import GRPOBatch


def unit_outcomes(
    rewards: torch.Tensor, reward_range: tuple[float, float] = (0.0, 1.0), threshold: float | None = None
) -> torch.Tensor:
    """``(N,)`` float64 success of each completion in ``[0, 1]``.

    ``threshold=None``: ``clamp((r - low) / (high - low), 0, 1)`` with ``reward_range = (low, high)``
    (binary 0/1 rewards pass through unchanged); else ``1`` where the raw reward ``r > threshold``,
    ``0`` otherwise.

    Raises:
        ValueError: a reward is NaN or infinite (a pass-rate tracker cannot count it).
    """
    rewards = rewards.detach().double()
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN/inf; the per-prompt pass rates cannot be updated")
    if threshold is not None:
        return (rewards > threshold).double()
    low, high = reward_range
    return ((rewards - low) / (high - low)).clamp(0, 1)


def group_outcomes(batch: GRPOBatch, outcomes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(prompt_ids, successes, trials)``, each ``(G,)``: the batch's prompts, the sum of their
    completions' ``outcomes`` ``(N,)`` (float64) and their number of completions (float64)."""
    successes = torch.zeros(batch.num_groups, dtype=torch.float64, device=outcomes.device)
    successes.scatter_add_(0, batch.group_index, outcomes.double())
    return batch.group_prompt_ids, successes, batch.group_sizes.double()


def draw_weighted(
    weights: torch.Tensor, num: int, generator: torch.Generator, replacement: bool | None = None
) -> torch.Tensor:
    """``(num,)`` int64 indices into ``weights`` ``(D,)`` drawn with probability ``weights / sum(weights)``.

    Uniform when every weight is 0. ``replacement=None`` draws without replacement while at least
    ``num`` prompts have positive weight and with replacement otherwise; ``True`` / ``False`` force it
    (``False`` needs ``num`` positive weights). Only ``generator`` is used, so a seeded generator makes
    the draw reproducible (and identical on every rank).
    """
    weights = weights.detach().double().cpu().clamp(min=0)
    if not bool(weights.sum() > 0):
        weights = torch.ones_like(weights)
    if replacement is None:
        replacement = num > int((weights > 0).sum())
    return torch.multinomial(weights, num, replacement=replacement, generator=generator)


class PromptTable:
    """Per-prompt state keyed by int64 prompt id (dataset indices or 63-bit hashes alike).

    ``keys``: ``(K,)`` sorted ids; each column is ``(K, ...)`` aligned with ``keys``. Prompts never
    seen read the column's default. Lookups and inserts are vectorised (``searchsorted``, one sort).
    The table lives on the CPU whatever device the ids come from; :meth:`get` answers on the ids'
    device, :meth:`rows` gives CPU row positions into the columns.
    """

    def __init__(self, **columns: tuple[float, torch.dtype, tuple[int, ...]]):
        self.defaults = columns
        self.keys = torch.zeros(0, dtype=torch.int64)
        self.columns = {name: torch.zeros((0, *shape), dtype=dtype) for name, (_, dtype, shape) in columns.items()}

    def _find(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.searchsorted(self.keys, ids).clamp(max=max(self.keys.numel() - 1, 0))
        found = self.keys[pos] == ids if self.keys.numel() else torch.zeros_like(ids, dtype=torch.bool)
        return pos, found

    def __len__(self) -> int:
        """Number of prompts the table holds."""
        return int(self.keys.numel())

    def get(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """``(len(ids), ...)`` values of column ``name``; the default where a prompt is unknown."""
        device, ids = ids.device, ids.long().cpu()
        default, dtype, shape = self.defaults[name]
        out = torch.full((ids.numel(), *shape), default, dtype=dtype)
        pos, found = self._find(ids)
        out[found] = self.columns[name][pos[found]]
        return out.to(device)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """``(len(ids),)`` CPU row positions of ``ids``, inserting unknown ids with default values."""
        ids = ids.long().cpu()
        pos, found = self._find(ids)
        if not bool(found.all()):
            new = torch.unique(ids[~found])
            keys, order = torch.sort(torch.cat([self.keys, new]))
            for name, (default, dtype, shape) in self.defaults.items():
                fresh = torch.full((new.numel(), *shape), default, dtype=dtype)
                self.columns[name] = torch.cat([self.columns[name], fresh])[order]
            self.keys = keys
            pos, found = self._find(ids)
        return pos

    def set(self, name: str, ids: torch.Tensor, values: torch.Tensor | float) -> torch.Tensor:
        """Overwrite column ``name`` at the distinct ``ids`` ``(P,)`` with ``values`` ``(P, ...)`` (or a
        scalar), inserting unknown ids; returns their CPU rows."""
        rows = self.rows(ids)
        column = self.columns[name]
        column[rows] = torch.as_tensor(values, dtype=column.dtype).cpu()
        return rows

    def add(self, name: str, ids: torch.Tensor, values: torch.Tensor | float) -> torch.Tensor:
        """Add ``values`` ``(P, ...)`` (or a scalar) to column ``name`` at ``ids`` ``(P,)``; repeated ids
        accumulate (unlike indexed ``+=``). Inserts unknown ids; returns their CPU rows."""
        rows = self.rows(ids)
        column = self.columns[name]
        values = torch.as_tensor(values, dtype=column.dtype).cpu().expand(rows.shape[0], *column.shape[1:])
        column.index_add_(0, rows, values.contiguous())
        return rows

    def state_dict(self) -> dict:
        """``keys`` and every column: tensors only."""
        return {"keys": self.keys.clone(), **{name: value.clone() for name, value in self.columns.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned.

        Raises:
            ValueError: a column is missing or its shape does not match the keys and the column's
                declared shape.
        """
        missing = sorted({"keys", *self.defaults} - set(state))
        if missing:
            raise ValueError(f"prompt table state lacks {missing}; it holds {sorted(state)}")
        keys = state["keys"].long().clone()
        columns = {}
        for name, (_, dtype, shape) in self.defaults.items():
            value = state[name]
            if tuple(value.shape) != (keys.numel(), *shape):
                raise ValueError(
                    f"prompt table column '{name}' has shape {tuple(value.shape)}, expected {(keys.numel(), *shape)}"
                )
            columns[name] = value.to(dtype).clone()
        self.keys, self.columns = keys, columns
