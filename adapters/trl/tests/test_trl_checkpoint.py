"""Method state is saved with every trainer checkpoint and restored on resume."""

from __future__ import annotations

import os

import pytest
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


def checkpoint_of_a_counter_run(tmp_path, **settings):
    run = dict(max_steps=2, reward_funcs=digit_overlap_reward, save_strategy="steps", save_steps=2)
    tiny_grpo_run([Counter()], output_dir=str(tmp_path / "first"), **{**run, **settings})
    return tmp_path / "first" / "checkpoint-2"


def test_resume_without_method_state_is_refused_unless_fresh_state_is_asked_for(tmp_path):
    from grpo_plugins import CompositionError

    checkpoint = checkpoint_of_a_counter_run(tmp_path)
    os.remove(checkpoint / STATE_FILE)  # deleted, or a checkpoint of a run without these methods
    resume = dict(max_steps=3, reward_funcs=digit_overlap_reward, resume_from_checkpoint=str(checkpoint))
    with pytest.raises(CompositionError, match=f"holds no {STATE_FILE}.*'counter'.*grpo_plugins_fresh_state"):
        tiny_grpo_run([Counter()], output_dir=str(tmp_path / "refused"), **resume)
    fresh = Counter()
    tiny_grpo_run([fresh], output_dir=str(tmp_path / "fresh"), grpo_plugins_fresh_state=True, **resume)
    assert fresh.seen == 1  # started from 0 at step 2, as asked
    # stateless methods lose nothing: no flag needed
    tiny_grpo_run(["ngrpo"], output_dir=str(tmp_path / "stateless"), **resume)


def test_a_run_without_methods_writes_trls_checkpoint_and_a_stateful_resume_of_it_is_refused(tmp_path):
    from grpo_plugins import CompositionError

    run = dict(max_steps=2, reward_funcs=digit_overlap_reward, save_strategy="steps", save_steps=2)
    tiny_grpo_run([], output_dir=str(tmp_path / "plain"), **run)
    checkpoint = tmp_path / "plain" / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").exists() and not (checkpoint / STATE_FILE).exists()
    with pytest.raises(CompositionError, match=f"holds no {STATE_FILE}.*'counter'"):
        tiny_grpo_run([Counter()], output_dir=str(tmp_path / "resumed"), resume_from_checkpoint=str(checkpoint),
                      **{**run, "max_steps": 3})


def test_a_corrupt_state_file_is_named(tmp_path):
    from grpo_plugins import CompositionError

    checkpoint = checkpoint_of_a_counter_run(tmp_path)
    path = checkpoint / STATE_FILE
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(CompositionError, match=f"{path}.*truncated or corrupt") as caught:
        tiny_grpo_run([Counter()], max_steps=3, reward_funcs=digit_overlap_reward, output_dir=str(tmp_path / "r"),
                      resume_from_checkpoint=str(checkpoint))
    assert "weights_only" not in str(caught.value)


class StepCounter(Counter):
    """A Counter that also records the optimiser step of every observe (not part of its state)."""

    name = "counter"

    def __init__(self, config=None):
        super().__init__(config)
        self.steps: list[int] = []

    @hookimpl
    def observe(self, batch: GRPOBatch, step: int) -> None:
        super().observe(batch, step)
        self.steps.append(step)


@pytest.mark.parametrize("resume_at", [1, 3])
def test_a_checkpoint_inside_a_generation_batch_keeps_its_observe(tmp_path, resume_at):
    # one generation batch spans two optimiser steps (steps_per_generation 4, gradient accumulation 2)
    settings = dict(max_steps=4, reward_funcs=digit_overlap_reward, save_strategy="steps", save_steps=1,
                    steps_per_generation=4, gradient_accumulation_steps=2)
    full = StepCounter()
    tiny_grpo_run([full], output_dir=str(tmp_path / "full"), **settings)
    assert full.steps == [2, 4]
    checkpoint = tmp_path / "full" / f"checkpoint-{resume_at}"
    assert torch.load(checkpoint / STATE_FILE, weights_only=True)["counter"]["seen"] == resume_at // 2
    resumed = StepCounter()
    tiny_grpo_run([resumed], output_dir=str(tmp_path / "resumed"), resume_from_checkpoint=str(checkpoint), **settings)
    # the batch in flight at the checkpoint is regenerated and observed after the step that finishes it
    assert resumed.seen == full.seen == 2
    assert resumed.steps == [s for s in full.steps if s > resume_at]
