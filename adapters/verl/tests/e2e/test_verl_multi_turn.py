"""Multi-turn trajectories through verl's own training loop (``PPOTrainer.fit``) on CPU: the corridor of
``examples/multi_turn`` played by a verl agent loop (one row per turn, ``{uid}_{session}_{turn}``), GiGPO's
advantages from the rows' ``GRPOBatch.steps``. See :mod:`grpo_plugins_verl.cpu_fit` for the stand-ins."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("grpo_plugin_gigpo")

import grpo_plugins_verl  # noqa: E402
from grpo_plugins.testing import BatchRecorder  # noqa: E402
from grpo_plugins.steps import token_step_index  # noqa: E402
from grpo_plugins_verl.cpu_fit import run_fit  # noqa: E402

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parents[4] / "examples" / "multi_turn"


def _load(name: str):
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))  # the agent loop's module, as PYTHONPATH would hold it
    spec = importlib.util.spec_from_file_location(name, EXAMPLE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_verl = _load("train_verl")
corridor = _load("corridor")


@pytest.fixture(scope="module")
def corridor_assets(tmp_path_factory) -> Path:
    return train_verl.build_assets(tmp_path_factory.mktemp("verl_corridor"), train_size=16)


def test_gigpo_trains_on_agent_loop_turns_in_verl_fit(corridor_assets, ray_cluster):
    recorder = BatchRecorder()
    grpo_plugins_verl.configure([{"gigpo": {"gamma": 0.9}}, recorder])
    result = run_fit(train_verl.corridor_config([], corridor_assets, steps=2))
    assert len(result.metrics) == 2 and len(recorder.batches) == 2
    for batch in recorder.batches:
        steps, mask = batch.steps, batch.completion_mask > 0
        n = mask.shape[0]
        # a row is one turn: one step per row, its whole response
        assert steps.num_steps == n and torch.equal(steps.row, torch.arange(n))
        assert torch.equal(token_step_index(steps, *mask.shape) >= 0, mask)
        # 2 prompts x 4 sessions, each an episode of 1-4 turns
        assert int(torch.unique(steps.trajectory).numel()) == 8 and int(steps.turn.max()) < 4
        # the agent loop's step keys: the start cell and the cell each turn acted in; turn 0 at the start cell
        start = torch.tensor([int(p[-1]["content"].split()[0]) for p in batch.prompts])
        first = steps.turn == 0
        assert steps.key[first].tolist() == (start[first] * corridor.CELLS + start[first]).tolist()
        assert bool(((steps.key // corridor.CELLS) == start).all())
        # verl copies the episode's reward to every turn row of the session
        for t in torch.unique(steps.trajectory):
            assert torch.unique(batch.rewards[steps.trajectory == t]).numel() == 1
        # one advantage per turn row, 0 off the response
        advantages = batch.advantages
        assert bool((advantages[~mask] == 0).all())
        for row in range(n):
            assert bool((advantages[row][mask[row]] == advantages[row][mask[row]][0]).all())
    assert any(int(b.steps.turn.max()) >= 1 for b in recorder.batches)  # some episodes took several turns
    assert any(bool(b.advantages.ne(0).any()) for b in recorder.batches)  # episodes reached the goal and failed
    for step in result.metrics:
        assert math.isfinite(step["actor/pg_loss"]) and math.isfinite(step["actor/grad_norm"])
        assert "plugins/gigpo/frac_shared_state_steps" in step and step["plugins/gigpo/frac_shared_state_steps"] > 0
    assert result.trainer.actor_rollout_wg.worker.actor.engine.optimizer_steps >= 2


def test_without_a_method_needing_steps_the_stage_sees_each_session_last_turn(corridor_assets, ray_cluster):
    """No method reads steps: the turn rows are scored as verl's multi-trajectory GRPO scores them (the
    exactness itself: tests/test_verl_steps.py), so the advantage stage holds one row per session."""
    recorder = BatchRecorder()
    grpo_plugins_verl.configure([recorder])
    result = run_fit(train_verl.corridor_config([], corridor_assets, steps=2))
    assert [b.rewards.numel() for b in recorder.batches] == [8, 8]  # 2 prompts x 4 sessions
    assert all(b.steps is None for b in recorder.batches)
    assert all(math.isfinite(step["actor/pg_loss"]) for step in result.metrics)


def test_verl_multi_trajectory_grpo_runs_on_the_same_agent_loop(corridor_assets, ray_cluster):
    """The comparison run of ``train_verl.py``: verl's own GRPO (no adapter) on the corridor's turn rows."""
    result = run_fit(train_verl.corridor_config(None, corridor_assets, steps=1))
    assert len(result.metrics) == 1 and math.isfinite(result.metrics[0]["actor/pg_loss"])
