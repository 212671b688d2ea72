"""Data-parallel context: batch-global statistics that stay correct across ranks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits among the data-parallel ranks.

    Attributes:
        rank: this process's data-parallel rank.
        world_size: number of data-parallel ranks.
        gathered: True when the tensors a hook sees already hold the whole global batch on every
            rank (TRL's and verl's advantage stage); reductions are then no-ops. False for per-rank
            data (a loss micro-batch), where sums are all-reduced through ``torch.distributed``.
    """

    rank: int = 0
    world_size: int = 1
    gathered: bool = True

    @classmethod
    def from_torch(cls, gathered: bool) -> "ParallelContext":
        """The context of the running ``torch.distributed`` job (a single process when uninitialised)."""
        if dist.is_available() and dist.is_initialized():
            return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), gathered=gathered)
        return cls(gathered=gathered)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks (a copy; the input is untouched). Every rank must call it.

        The gradient flows to this rank's own contribution, as in a single process: the other
        ranks' share enters as a constant.
        """
        if self.gathered or self.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return tensor
        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total + (tensor - tensor.detach()) if tensor.requires_grad else total
