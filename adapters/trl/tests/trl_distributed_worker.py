"""Worker for test_trl_distributed.py: ``torchrun --nproc_per_node 2 trl_distributed_worker.py OUT``.

Trains the tiny model with sampled prompts, uneven rollout counts (a group straddles the two ranks),
rewritten prompts, a token mask and batch-scaled GRPO advantages, and writes what each rank saw to
``OUT/rank<r>.pt``.
"""

import os
import sys

import torch

from grpo_plugins import Method, hookimpl
from grpo_plugins_trl import PluginGRPOTrainer
from grpo_plugins_trl.testing import digit_overlap_reward, tiny_grpo_run


class StraddlingBudget(Method):
    name = "straddling_budget"

    @hookimpl
    def allocate_rollouts(self, round, prompt_ids):
        return torch.tensor([2, 7, 3, 4])  # rank 0 holds rows 0-7, so the 7-completion group straddles


class EvenPrompts(Method):
    name = "even_prompts"

    @hookimpl
    def sample_prompts(self, round, generator):
        return torch.randperm(round.dataset_size // 2, generator=generator)[: round.num_prompts] * 2


class Rewrite(Method):
    name = "rewrite"

    @hookimpl
    def augment_prompts(self, prompts):
        return [f"{p} 0 +" for p in prompts]


class FirstTokenOnly(Method):
    name = "first_token_only"

    @hookimpl
    def mask_tokens(self, batch):
        weights = torch.zeros_like(batch.token_mask)
        weights[:, 0] = 1.0
        return weights


class Recorder(Method):
    name = "recorder"

    def __init__(self, config=None):
        super().__init__(config)
        self.batches = []

    @hookimpl
    def observe(self, batch, step):
        record = {k: getattr(batch, k).clone() for k in ("prompt_ids", "rewards", "advantages", "completion_mask")}
        self.batches.append({**record, "prompts": list(batch.prompts)})


class LocalRecordingTrainer(PluginGRPOTrainer):
    local_advantages: list

    def _run_advantage_stage(self, out, n):
        super()._run_advantage_stage(out, n)
        self.local_advantages = getattr(self, "local_advantages", []) + [out["advantages"].clone()]
        self.num_items = getattr(self, "num_items", []) + [int(out["num_items_in_batch"])]


def main(out_dir: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    recorder = Recorder()
    trainer = tiny_grpo_run(
        [EvenPrompts(), StraddlingBudget(), Rewrite(), FirstTokenOnly(), recorder],
        trainer_cls=LocalRecordingTrainer,
        max_steps=2,
        per_device_train_batch_size=8 // world,
        reward_funcs=digit_overlap_reward,
        scale_rewards="batch",
        output_dir=os.path.join(out_dir, "run"),
    )
    rank = trainer.accelerator.process_index
    torch.save(
        {
            "world": trainer.accelerator.num_processes,
            "batches": recorder.batches,
            "local_advantages": trainer.local_advantages,
            "num_items": trainer.num_items,
            "rounds": list(trainer._plugin_rounds),
            "losses": [row["loss"] for row in trainer.state.log_history if "loss" in row],
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1])
