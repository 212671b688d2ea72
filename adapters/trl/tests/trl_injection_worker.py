"""One process of the two-process injection test (torchrun, gloo on CPU): every group gets one injected row,
and each rank saves the global batch and what its loss micro-batches saw."""

from __future__ import annotations

import os
import sys

import torch

from grpo_plugins import Method, Needs, hookimpl
from grpo_plugins.injection import INJECTED_KEY
from grpo_plugins.testing import BatchRecorder
from grpo_plugins_trl.testing import digit_overlap_reward, tiny_grpo_run
from grpo_plugins_trl.trainer import PluginGRPOTrainer


class EveryGroup(Method):
    name = "every_group"

    @hookimpl
    def inject_rows(self, batch):
        return [{"prompt_id": p, "completion": [5, 6, 7], "kind": "tokens", "reward": 0.5}
                for p in batch.group_prompt_ids.tolist()]


class LossRecorder(Method):
    name = "loss_recorder"

    def __init__(self):
        super().__init__()
        self.micro_batches = []

    def needs(self):
        return Needs(loss_fields={"row_data"})

    @hookimpl
    def gate_loss(self, inputs):
        self.micro_batches.append({"kind": inputs.row_data[INJECTED_KEY].clone(), "tokens": inputs.mask.sum(-1).clone()})
        return torch.ones_like(inputs.log_probs[:, :1])


class CountingTrainer(PluginGRPOTrainer):
    def _run_advantage_stage(self, out, n):
        super()._run_advantage_stage(out, n)
        self.num_items = getattr(self, "num_items", []) + [int(out["num_items_in_batch"])]
        self.local_rows = getattr(self, "local_rows", []) + [n]


def main(out_dir: str) -> None:
    recorder, losses = BatchRecorder(), LossRecorder()
    trainer = tiny_grpo_run(
        [EveryGroup(), recorder, losses], trainer_cls=CountingTrainer, max_steps=2, per_device_train_batch_size=3,
        num_generations=2, gradient_accumulation_steps=2, reward_funcs=digit_overlap_reward,
        output_dir=os.path.join(out_dir, "run"),
    )
    torch.save({
        "world": trainer.accelerator.num_processes,
        "batches": [{"prompt_ids": b.prompt_ids, "rewards": b.rewards, "mask": b.completion_mask,
                     "kinds": b.row_data[INJECTED_KEY], "advantages": b.advantages} for b in recorder.batches],
        "micro_batches": losses.micro_batches,
        "num_items": trainer.num_items,
        "local_rows": trainer.local_rows,
        "fillers": [row["injection/filler_rows"] for row in trainer.state.log_history if "injection/filler_rows" in row],
    }, os.path.join(out_dir, f"rank{trainer.accelerator.process_index}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
