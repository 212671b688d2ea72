"""Injected rows through verl's own training loop (``PPOTrainer.fit``) on CPU: ``hpt``'s demonstrations (scored
by the run's reward loop) and ``dagrpo``'s anchors (given reward) join each step's batch, get old log-probs,
reach the advantage stage with their kind and train with verl's mini-batching.
See :mod:`grpo_plugins_verl.cpu_fit` for the stand-ins."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

import grpo_plugins_verl
from grpo_plugins.testing import BatchRecorder
from grpo_plugins.injection import INJECTED_KEY, kind_code
from grpo_plugins_verl.cpu_fit import compose_config, run_fit

pytestmark = pytest.mark.e2e

REWARD = Path(__file__).with_name("reward.py")
STEPS = ("trainer.total_training_steps=2", "trainer.save_freq=-1", "trainer.resume_mode=disable")
ROWS = 8
"""Rows of a step before injection: ``data.train_batch_size=2`` prompts times ``rollout.n=4``."""


@pytest.fixture
def work(tiny_assets, tmp_path) -> Path:
    """The tiny assets with a ``solution`` column in the training set: the exact answer (``reward.py`` scores it
    ``acc + digits = 2``)."""
    train = pd.read_parquet(tiny_assets / "train.parquet")
    train["solution"] = [str(row["ground_truth"]) for row in train["reward_model"]]
    train.to_parquet(tmp_path / "train.parquet")
    for linked in ("model", "val.parquet"):
        (tmp_path / linked).symlink_to(tiny_assets / linked)
    return tmp_path


def run(methods: list, work: Path):
    recorder = BatchRecorder()
    grpo_plugins_verl.configure([*methods, recorder])
    config = compose_config(methods, work, REWARD, STEPS)
    return run_fit(config), recorder


def check_steps(result, kind: str) -> list:
    """Every step injected one row per prompt, trained them with verl's mini-batches, and logged it."""
    mini = ROWS  # ppo_mini_batch_size=2 prompts x rollout.n=4
    for step in result.metrics:
        assert step["injection/rows"] == 2 and step[f"injection/{kind}"] == 2
        assert math.isfinite(step["actor/pg_loss"]) and math.isfinite(step["actor/grad_norm"])
    assert result.rollout_counts == [[5, 5], [5, 5]]  # each group: 4 rollouts + its injected row
    engine = result.trainer.actor_rollout_wg.worker.actor.engine
    assert engine.optimizer_steps == 2 * math.ceil((ROWS + 2) / mini)  # 10 rows: verl pads to 2 mini-batches
    return result.trainer.injection.last_rows


def injected(batch) -> torch.Tensor:
    return batch.row_data[INJECTED_KEY] != 0


def test_hpt_demonstrations_train_through_verl_fit(work, ray_cluster):
    # no rollout of the random model reaches reward 10: every prompt is in SFT mode
    result, recorder = run([{"hpt": {"success_threshold": 10.0}}], work)
    rows = check_steps(result, "demonstration")
    assert [r.kind for r in rows] == ["demonstration"] * 2 and all(r.reward is None for r in rows)
    assert len(recorder.batches) == 2
    for batch, step in zip(recorder.batches, result.metrics):
        demo = injected(batch)
        assert batch.num_completions == ROWS + 2 and int(demo.sum()) == 2
        assert set(batch.row_data[INJECTED_KEY][demo].tolist()) == {kind_code("demonstration")}
        # each demonstration joins its prompt's group, scored by the run's reward loop (reward.py)
        for i in demo.nonzero().flatten().tolist():
            pid = int(batch.prompt_ids[i])
            assert int((batch.prompt_ids == pid).sum()) == 5
            assert batch.rows[i]["solution"] == batch.rows[i]["reward_model"]["ground_truth"]
        assert torch.equal(batch.rewards[demo], torch.full((2,), 2.0))  # acc 1 + digits 1
        names = list(batch.reward_names)
        assert torch.equal(batch.reward_components[demo][:, [names.index("acc"), names.index("digits")]], torch.ones(2, 2))
        assert bool((batch.rewards[~demo] < 2.0).all())  # no rollout of the random model is exact
        # old log-probs were computed for the demonstrations (verl's old-log-prob pass)
        assert bool((batch.old_log_probs[demo] * batch.completion_mask[demo]).ne(0).any())
        # hpt: demonstrations carry the SFT weight, rollouts of SFT prompts none
        assert bool((batch.row_data["hpt_sft_weight"][demo] > 0).all())
        assert bool((batch.row_data["hpt_policy_weight"] == 0).all())
        assert math.isfinite(step["actor/plugins/hpt/sft"]) and step["actor/plugins/hpt/sft"] > 0


def test_dagrpo_anchors_train_through_verl_fit(work, ray_cluster):
    # every group counts as failed (no reward above 10, reward.py gives at most 2): each gets its reference
    # solution with the given reward 20
    result, recorder = run([{"dagrpo": {"failure_reward": 10.0, "anchor_reward": 20.0}}], work)
    rows = check_steps(result, "anchor")
    assert all(r.kind == "anchor" and r.reward == 20.0 for r in rows)
    for batch in recorder.batches:
        anchor = injected(batch)
        assert batch.num_completions == ROWS + 2
        assert set(batch.row_data[INJECTED_KEY][anchor].tolist()) == {kind_code("anchor")}
        assert torch.equal(batch.rewards[anchor], torch.full((2,), 20.0))  # the given reward, not the reward loop's
        assert bool(torch.isnan(batch.reward_components[anchor]).all())  # did not apply
        # the anchor is the best row of its all-failed group: a positive advantage
        assert bool((batch.advantages[anchor] > 0).all())
