"""Method state is saved with every trainer checkpoint and restored on resume."""

from __future__ import annotations

import os

import torch

from grpo_plugins import GRPOBatch, Method, hookimpl
from grpo_plugins_trl.testing import digit_overlap_reward, tiny_grpo_run
from grpo_plugins_trl.trainer import STATE_FILE


class Counter(Method):
    """Stateful: counts observed batches and sums their rewards; the count shifts the advantages."""

    name = "counter"

    def __init__(self, config=None):
        super().__init__(config)
        self.seen = 0
        self.total = torch.zeros(())

    @hookimpl
    def adjust_advantages(self, batch: GRPOBatch, advantages: torch.Tensor) -> torch.Tensor:
        return advantages + 0.1 * self.seen

    @hookimpl
    def observe(self, batch: GRPOBatch, step: int) -> None:
        self.seen += 1
        self.total = self.total + batch.rewards.sum()

    def state_dict(self):
        return {"seen": self.seen, "total": self.total.clone()}

    def load_state_dict(self, state):
        self.seen, self.total = state["seen"], state["total"].clone()


def losses(trainer):
    return {row["step"]: row["loss"] for row in trainer.state.log_history if "loss" in row}


def test_resume_restores_method_state_and_continues_identically(tmp_path):
    settings = dict(max_steps=4, reward_funcs=digit_overlap_reward, save_strategy="steps", save_steps=2)
    full_counter = Counter()
    full = tiny_grpo_run([full_counter], output_dir=str(tmp_path / "full"), **settings)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    saved = torch.load(checkpoint / STATE_FILE, weights_only=True)
    assert saved["counter"]["seen"] == 2

    resumed_counter = Counter()
    resumed = tiny_grpo_run(
        [resumed_counter], output_dir=str(tmp_path / "resumed"), resume_from_checkpoint=str(checkpoint), **settings
    )
    assert resumed_counter.seen == full_counter.seen == 4
    assert torch.equal(resumed_counter.total, full_counter.total)
    full_losses, resumed_losses = losses(full), losses(resumed)
    assert [resumed_losses[s] for s in (3, 4)] == [full_losses[s] for s in (3, 4)]
    assert os.path.exists(tmp_path / "resumed" / "checkpoint-4" / STATE_FILE)
