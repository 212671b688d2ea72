"""One rank of the two-process gloo test of COPO's batch-global statistics (test_copo.py)."""

import os

import torch
import torch.distributed as dist

from grpo_plugins import Composition, GRPOBatch, ParallelContext


def rank_main(rank: int, world: int, port: int, shards: list, out_dir: str):
    """Run COPO's advantage stage on this rank's shard ``(prompt_ids, rewards)`` (not gathered) and save it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        prompt_ids, rewards = shards[rank]
        batch = GRPOBatch(prompt_ids=prompt_ids, rewards=rewards, parallel=ParallelContext.from_torch(gathered=False))
        advantages = Composition(["copo"]).run_advantage_stage(batch).advantages
        torch.save(advantages, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
