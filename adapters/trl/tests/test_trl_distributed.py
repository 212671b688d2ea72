"""Two data-parallel processes (torchrun, gloo on CPU): the advantage stage sees the global batch,
identically on both ranks, and its batch-global statistics equal a single-process computation."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpo_plugins import Composition, GRPOBatch

WORKER = Path(__file__).with_name("trl_distributed_worker.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.distributed
def test_two_processes_share_one_global_batch(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), str(WORKER), str(tmp_path)],
        capture_output=True, text=True, timeout=230, env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["world"] == rank1["world"] == 2

    # the sampler planned the same rounds on both ranks
    assert len(rank0["rounds"]) >= 2
    assert all(torch.equal(a, b) for a, b in zip(rank0["rounds"], rank1["rounds"], strict=True))
    assert all(bool((r % 2 == 0).all()) for r in rank0["rounds"])  # drawn by sample_prompts
    # mask_tokens weights never change the normaliser: TRL's global token count of the completion masks
    global_tokens = [int(b["completion_mask"].sum()) for b in rank0["batches"]]
    assert rank0["num_items"] == rank1["num_items"] == global_tokens and min(global_tokens) > 16

    assert len(rank0["batches"]) == len(rank1["batches"]) == 2
    for b0, b1, l0, l1 in zip(rank0["batches"], rank1["batches"], rank0["local_advantages"], rank1["local_advantages"]):
        # every rank holds the whole global batch: 16 completions, groups 2, 7, 3, 4
        prompts = b0.pop("prompts")
        assert prompts == b1.pop("prompts") and all(p.endswith("= 0 +") for p in prompts)  # augment_prompts
        for key in b0:
            assert torch.equal(b0[key], b1[key]), key
        ids = b0["prompt_ids"]
        assert ids.shape == (16,) and ids[7] == ids[8]  # a group straddles the ranks
        # a single process, running the same method on the same global data, gets the same advantages
        single = Composition(["grpo"], defaults={"grpo": {"epsilon": 1e-4, "scale": "batch"}})
        batch = single.run_advantage_stage(GRPOBatch(prompt_ids=ids, rewards=b0["rewards"].clone()))
        assert torch.equal(batch.advantages, b0["advantages"])
        # by hand: centre by the true group (by id), divide by the std of the whole batch
        rewards = b0["rewards"].double()
        means = {int(p): rewards[ids == p].mean() for p in ids.unique()}
        centred = rewards - torch.stack([means[int(p)] for p in ids])
        expected = centred / (rewards.std() + 1e-4)
        torch.testing.assert_close(b0["advantages"].double(), expected, rtol=1e-5, atol=1e-6)
        # each rank trains on its own slice of the global advantages, times the token weights (first token only)
        for local, rows in ((l0, slice(0, 8)), (l1, slice(8, 16))):
            assert torch.equal(local[:, 0], b0["advantages"][rows]) and not bool(local[:, 1:].any())
