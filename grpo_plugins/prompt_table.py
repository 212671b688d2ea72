"""Per-prompt state for stateful methods (trackers, posteriors, reward histories).

Keyed by int64 prompt id, so dataset indices and 63-bit text hashes work alike; vectorised lookups
and inserts; checkpointable as plain tensors.
"""

from __future__ import annotations

import torch


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

    def state_dict(self) -> dict:
        """``keys`` and every column: tensors only."""
        return {"keys": self.keys.clone(), **{name: value.clone() for name, value in self.columns.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.keys = state["keys"].long().clone()
        for name, (_, dtype, _shape) in self.defaults.items():
            self.columns[name] = state[name].to(dtype).clone()
