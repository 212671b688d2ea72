"""The old-policy probe (``GRPOBatch.probes``) through verl's own ``fit()`` on CPU.

``tw_grpo`` weights each token by its group's divergence at that position, computed from the old policy's
full next-token distributions: the actor workers' ``probe_old_policy`` runs (the adapter's worker class, the
rows fetched from TransferQueue by key), the weights reach verl's loss, and the probe's log-probs of the
sampled tokens are verl's own old log-probs. ``capo`` (the update preview) stays refused before Ray starts.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from grpo_plugins import CompositionError
from grpo_plugins.conformance import installed_methods
from grpo_plugins_verl.cpu_fit import compose_config, run_fit

pytestmark = pytest.mark.e2e

REWARD = Path(__file__).with_name("reward.py")
TWO_STEPS = ("trainer.total_training_steps=2", "trainer.save_freq=-1", "trainer.resume_mode=disable")


def sampled_log_probs(chunk):
    picked = chunk.log_probs().gather(-1, chunk.completion_ids.unsqueeze(-1)).squeeze(-1)
    return {"log_probs": torch.where(chunk.completion_mask > 0, picked, 0.0)}


def test_tw_grpo_trains_through_verl_fit_with_the_probe(tiny_assets, ray_cluster):
    if "tw_grpo" not in installed_methods():
        pytest.skip("tw_grpo is not installed")
    config = compose_config(["tw_grpo"], tiny_assets, REWARD, TWO_STEPS)
    jobs, seen = [], []

    def record(trainer):
        group = trainer.actor_rollout_wg
        probe = group.probe_old_policy

        def recording(job):
            jobs.append((job.name, job.mode, len(job.keys), len(job.chunks)))
            return probe(job)

        group.probe_old_policy = recording
        advantage = trainer._compute_advantage

        def checking(batch, metrics):
            out = advantage(batch, metrics)
            stage = trainer.grpo_plugins.last_batch
            # the probe's old log-probs of the sampled tokens: verl's old-log-prob pass, row by row (by key)
            seen.append((stage, stage.probes["tw_grpo"].map(sampled_log_probs)["log_probs"]))
            return out

        trainer._compute_advantage = checking

    result = run_fit(config, before_fit=record)
    assert type(result.trainer.actor_rollout_wg.worker).__name__ == "ProbeActorRolloutRefWorker"
    assert len(result.metrics) == 2
    # per step: tw_grpo's map, then the test's own; 8 rows in chunks of whole groups (<= 8 rows: one chunk)
    assert jobs == [("tw_grpo", "map", 8, 1)] * 4
    for stage, log_probs in seen:
        mask = stage.completion_mask > 0
        torch.testing.assert_close(torch.where(mask, log_probs, 0.0), torch.where(mask, stage.old_log_probs, 0.0),
                                   rtol=1e-5, atol=1e-5)
        weights = stage.token_weights
        assert weights is not None and bool((weights[mask] >= 1).all())
        assert bool((weights[mask] > 1).any())  # the divergence differs between positions: weights above 1
    for step in result.metrics:
        assert math.isfinite(step["actor/pg_loss"]) and math.isfinite(step["actor/grad_norm"])
        assert step["plugins/tw_grpo/mean_weight"] > 1


def test_capo_stays_refused_on_verl_for_the_update_preview(tiny_assets):
    with pytest.raises(CompositionError, match=r"method 'capo' needs trainer feature 'update_preview'.*verl lacks it"):
        compose_config(["capo"], tiny_assets, REWARD, TWO_STEPS)
