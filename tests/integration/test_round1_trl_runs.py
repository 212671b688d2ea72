"""Round 1's methods in the real TRL GRPOTrainer: tiny runs (2-4 steps, the tiny local model, CPU), each
method alone and composed with another round-1 method. The methods' unit tests (torch and the core only)
are in ``plugins/<name>/tests/``."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("trl")
for _plugin in ("gdpo", "knapsack_rl", "llds", "ngrpo", "sapo", "scaf_grpo", "spo", "unlikeliness", "vade"):
    pytest.importorskip(f"grpo_plugin_{_plugin}", reason=f"grpo-plugin-{_plugin} (round 1) is not installed")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from grpo_plugins import Composition, Method, hookimpl  # noqa: E402
from grpo_plugins_trl.testing import (  # noqa: E402
    GradientRecorder,
    finite_losses,
    arithmetic_dataset,
    completion_text,
    digit_overlap_reward,
    exact_answer_reward,
    tiny_grpo_run,
)
from grpo_plugin_gdpo import gdpo_advantages  # noqa: E402


def plugin_rows(trainer, key: str) -> list:
    return [row[key] for row in trainer.state.log_history if key in row]


def even_length_reward(completions, **_):
    """A binary reward that varies even for a random model: 1 when the completion has even length."""
    return [float(len(completion_text(c)) % 2 == 0) for c in completions]


# ----------------------------------------------------------------------------- GDPO
@pytest.mark.parametrize(
    "methods", [["gdpo"], ["gdpo", {"scaf_grpo": {"warmup_steps": 0}}]], ids=["alone", "with_scaf_grpo"]
)
def test_gdpo_tiny_trl_run(methods):
    dataset = arithmetic_dataset(8).map(
        lambda row: {"hint_knowledge": "1", "hint_planning": "2", "hint_solution": row["answer"]}
    )
    trainer = tiny_grpo_run(
        methods, max_steps=2, dataset=dataset, reward_funcs=[exact_answer_reward, digit_overlap_reward]
    )
    assert finite_losses(trainer)
    assert any("plugins/gdpo/distinct_advantages_per_group" in row for row in trainer.state.log_history)
    batch = trainer.last_plugin_batch  # the global batch the loss used
    expected = gdpo_advantages(batch.reward_components, batch.reward_weights, batch.group_index, batch.num_groups)
    torch.testing.assert_close(batch.advantages, expected)


# ----------------------------------------------------------------------------- SAPO
@pytest.mark.parametrize("methods", [["sapo"], ["unlikeliness", "sapo"]], ids=["alone", "with-unlikeliness"])
def test_sapo_short_trl_run(methods):
    """Two optimiser steps over one generation batch (num_iterations=2): the second step is off-policy,
    so the gate weights drop below 1. loss_type="grpo" gives SAPO's sequence-mean of token-means."""
    trainer = tiny_grpo_run(methods, max_steps=2, loss_type="grpo", num_iterations=2, reward_funcs=even_length_reward)
    rows = [row for row in trainer.state.log_history if "plugins/sapo/gate_weight_mean" in row]
    assert len(rows) == 2
    assert all(math.isfinite(row["loss"]) and row["grad_norm"] > 0 for row in rows)
    assert rows[0]["plugins/sapo/gate_weight_mean"] == pytest.approx(1.0)  # on-policy: w(1) = 1
    assert 0.5 < rows[1]["plugins/sapo/gate_weight_mean"] < 1.0
    if "unlikeliness" in methods:
        assert any("plugins/unlikeliness/frac_flat_groups_after" in row for row in trainer.state.log_history)


# ----------------------------------------------------------------------------- unlikeliness
@pytest.mark.parametrize("methods", [["unlikeliness"], ["unlikeliness", "sapo"]], ids=["alone", "with-sapo"])
def test_unlikeliness_short_trl_run(methods):
    """The paper's recipe runs 2 epochs per batch (num_iterations=2), which is also when TRL computes
    the old log-probs the ranking needs."""
    trainer = tiny_grpo_run(methods, max_steps=2, num_iterations=2, reward_funcs=even_length_reward)
    logged = [row for row in trainer.state.log_history if "plugins/unlikeliness/mean_reward_scale" in row]
    assert logged, "the shaping metrics were not logged"
    # the scale is 1 - 0.25 * rank / 4 averaged over rewarded completions: within [1 - 0.25 * 3/4, 1]
    assert all(1 - 0.25 * 3 / 4 <= row["plugins/unlikeliness/mean_reward_scale"] <= 1.0 for row in logged)
    assert all(math.isfinite(row["loss"]) for row in trainer.state.log_history if "loss" in row)


def test_unlikeliness_short_on_policy_trl_run_gets_old_log_probs_from_the_adapter():
    """With one iteration per batch TRL skips the old log-probs; the method requires them, so the adapter
    computes them and the ranking runs."""
    assert Composition(["unlikeliness"]).required_fields() == {"old_log_probs"}
    trainer = tiny_grpo_run(["unlikeliness"], max_steps=1, reward_funcs=even_length_reward)
    batch = trainer.last_plugin_batch
    assert batch.old_log_probs is not None and batch.old_log_probs.shape == batch.completion_mask.shape
    real = batch.old_log_probs[batch.completion_mask > 0]
    assert bool(torch.isfinite(real).all()) and bool((real <= 0).all())
    assert any("plugins/unlikeliness/mean_reward_scale" in row for row in trainer.state.log_history)


# ----------------------------------------------------------------------------- SPO
def test_spo_trainer_run_alone():
    trainer = tiny_grpo_run(["spo"], max_steps=2, reward_funcs=digit_overlap_reward)
    assert finite_losses(trainer)
    logged = set().union(*trainer.state.log_history)
    assert {"plugins/spo/mean_value", "plugins/spo/rho", "plugins/spo/sampled_value_variance"} <= logged
    method = trainer.composition.method("spo")
    visits = method.table.get("visits", method.table.keys)
    assert method.table.keys.numel() > 0 and bool((visits > 0).all())
    assert set(method.table.keys.tolist()) <= set(torch.cat(list(trainer._plugin_rounds)).tolist())


def test_spo_trainer_run_with_one_completion_per_prompt():
    """TRL needs num_generations >= 2, but the sampler fills the round's budget of 8 with 8 prompts of one
    completion each: every group of the batch has size 1."""
    trainer = tiny_grpo_run(
        [{"spo": {"single_rollout": True}}], max_steps=2, num_generations=2, reward_funcs=digit_overlap_reward,
    )
    assert finite_losses(trainer)
    rounds = list(trainer._plugin_rounds)
    assert rounds and all(r.numel() == 8 and torch.unique(r).numel() == 8 for r in rounds)
    batch = trainer.last_plugin_batch
    assert batch.num_groups == 8 and bool((batch.group_sizes == 1).all())
    assert batch.old_log_probs is not None  # on-policy run: the adapter computed them for the forgetting factor
    logged = set().union(*trainer.state.log_history)
    assert {"plugins/spo/rho", "plugins/spo/policy_distance", "plugins/spo/mean_value"} <= logged
    assert all(row.get("plugins/spo/frac_zero_advantage", 0.0) < 1.0 for row in trainer.state.log_history)


def test_spo_trainer_run_with_groups_of_one():
    class MostlySingles(Method):
        """An allocator for this test: one completion per prompt, the first prompt takes the rest."""

        name = "mostly_singles"

        @hookimpl
        def allocate_rollouts(self, round, prompt_ids):
            counts = torch.ones_like(prompt_ids)
            counts[0] += round.budget - prompt_ids.numel()
            return counts

    trainer = tiny_grpo_run(["spo", MostlySingles()], max_steps=2, reward_funcs=digit_overlap_reward)
    assert finite_losses(trainer)
    sizes = [torch.bincount(r) for r in list(trainer._plugin_rounds)]
    assert all(sorted(c[c > 0].tolist()) == [1, 7] for c in sizes)  # GRPO's group baseline fails on these
    assert all(row.get("plugins/spo/frac_zero_advantage", 0.0) < 1.0 for row in trainer.state.log_history)


def test_spo_trainer_run_spo_knapsack_gdpo_composed():
    methods = [{"spo": {"use_advantage": False}}, {"knapsack_rl": {"min_rewards": 4}}, "gdpo"]
    composition = Composition(methods)
    assert composition.providers("sample_prompts") == ["spo"]
    assert composition.providers("allocate_rollouts") == ["knapsack_rl"]
    assert composition.providers("compute_advantages") == ["gdpo"]
    trainer = tiny_grpo_run(methods, max_steps=3, reward_funcs=[exact_answer_reward, digit_overlap_reward])
    assert finite_losses(trainer)
    logged = set().union(*trainer.state.log_history)
    assert {"plugins/spo/rho", "plugins/knapsack_rl/max_rollouts", "plugins/gdpo/frac_zero_advantage"} <= logged
    assert "plugins/spo/mean_value" not in logged  # SPO's advantage is switched off
    spo, knapsack = trainer.composition.method("spo"), trainer.composition.method("knapsack_rl")
    assert torch.equal(spo.table.keys, knapsack.table.keys)  # both observed the same prompts
    assert all(int(r.numel()) == 8 for r in list(trainer._plugin_rounds))


# ----------------------------------------------------------------------------- Knapsack RL
def test_knapsack_rl_trainer_run_allocates_by_the_knapsack():
    trainer = tiny_grpo_run(
        [{"knapsack_rl": {"min_rewards": 4, "max_n": 6}}], max_steps=4,
        reward_funcs=digit_overlap_reward, dataset=arithmetic_dataset(4, 0),
    )
    assert finite_losses(trainer)
    assert any("plugins/knapsack_rl/max_rollouts" in row for row in trainer.state.log_history)
    method = trainer.composition.method("knapsack_rl")
    assert int(method.table.get("reward_count", torch.arange(4)).sum()) > 0
    # once estimates exist, a round's completions are no longer split evenly (GRPO: 4 and 4)
    counts = [torch.bincount(r) for r in list(trainer._plugin_rounds)]
    assert all(int(c.sum()) == 8 for c in counts)
    assert any(len(set(c[c > 0].tolist())) > 1 for c in counts)


def test_knapsack_rl_trainer_run_composed_with_a_prompt_sampler():
    trainer = tiny_grpo_run(["vade", "knapsack_rl"], max_steps=2, reward_funcs=digit_overlap_reward)
    assert finite_losses(trainer)
    logged = set().union(*trainer.state.log_history)
    assert {"plugins/vade/selected_expected_variance", "plugins/knapsack_rl/max_rollouts"} <= logged


# ----------------------------------------------------------------------------- VADE
def test_vade_trainer_run_alone_and_with_spo_advantages():
    trainer = tiny_grpo_run(["vade"], max_steps=2, reward_funcs=digit_overlap_reward)
    assert finite_losses(trainer)
    assert any("plugins/vade/mixed_group_fraction" in row for row in trainer.state.log_history)
    # the prompts the sampler chose are the ones whose posterior moved
    visited = trainer.composition.method("vade").table.keys
    assert visited.numel() > 0 and set(visited.tolist()) <= set(torch.cat(list(trainer._plugin_rounds)).tolist())
    composed = tiny_grpo_run(["vade", {"spo": {"use_sampler": False}}], max_steps=2, reward_funcs=digit_overlap_reward)
    logged = set().union(*composed.state.log_history)
    assert {"plugins/vade/selected_expected_variance", "plugins/spo/mean_value"} <= logged


# ----------------------------------------------------------------------------- Scaf-GRPO
@pytest.mark.parametrize("extra", [[], ["gdpo"]], ids=["alone", "with_gdpo"])
def test_scaf_grpo_tiny_trl_run_hints_stuck_prompts(extra):
    # two prompts, so both are drawn every step; a random tiny model fails them -> hints from step 2 on
    dataset = Dataset.from_dict({
        "prompt": ["3 + 4 =", "5 + 2 ="], "answer": ["7", "7"], "prompt_id": [0, 1],
        "hint_knowledge": [["3", "4"], ["5", "2"]], "hint_planning": ["7", "7"], "hint_solution": ["= 7", "= 7"],
    })
    config = {"warmup_steps": 1, "chunks_per_tier": 2, "reward_name": "exact_answer_reward"}
    trainer = tiny_grpo_run(
        [{"scaf_grpo": config}, *extra], max_steps=3, dataset=dataset,
        reward_funcs=[exact_answer_reward, digit_overlap_reward],
    )
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logs) == 3 and all(math.isfinite(float(row["loss"])) for row in logs)
    hinted = [float(row["plugins/scaf_grpo/hinted_prompt_frac"]) for row in logs]
    assert hinted[:2] == [0.0, 0.0]  # warm-up step 1 does not count; step 2's failures hint step 3
    exact = [float(row["rewards/exact_answer_reward/mean"]) for row in logs]
    last = trainer.last_plugin_batch  # step 3's batch
    if exact[1] == 0.0:  # both prompts unsolved at step 2 (a random model): step 3 hints both with level 1
        assert hinted[2] == 1.0
        assert sorted(last.prompts[::4]) == ["3 + 4 =\nKnowledge Hints: 3", "5 + 2 =\nKnowledge Hints: 5"]
        if exact[2] == 0.0:
            assert trainer.composition.method("scaf_grpo").levels_of(torch.tensor([0, 1])).tolist() == [2, 2]
    if extra:
        assert any("plugins/gdpo/distinct_advantages_per_group" in row for row in logs)


# ----------------------------------------------------------------------------- LLDS
def test_llds_real_trl_run_alone_and_composed():
    # num_iterations=2: the second pass over a generation moves the policy away from the old log-probs
    trainer = tiny_grpo_run(["llds"], max_steps=2, num_iterations=2, reward_funcs=digit_overlap_reward)
    rows = [r for r in trainer.state.log_history if "plugins/llds/llds" in r]
    assert rows and all(math.isfinite(r["plugins/llds/llds"]) and r["plugins/llds/llds"] >= 0 for r in rows)
    assert all(math.isfinite(r["loss"]) for r in rows)
    composed = tiny_grpo_run(["ngrpo", "llds"], max_steps=2, num_iterations=2)
    assert [r for r in composed.state.log_history if "plugins/llds/frac_gated_actions" in r]


# ----------------------------------------------------------------------------- NGRPO
def test_ngrpo_real_trl_run_alone_and_composed():
    # the random tiny model solves nothing: every group is all-wrong, where GRPO has zero loss
    trainer = tiny_grpo_run(["ngrpo"], max_steps=2)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert losses and all(math.isfinite(x) and x > 0 for x in losses)
    assert plugin_rows(trainer, "plugins/ngrpo/frac_uniform_groups_with_signal")
    composed = tiny_grpo_run(["ngrpo", "llds"], max_steps=2, num_iterations=2)
    assert plugin_rows(composed, "plugins/llds/llds") and plugin_rows(composed, "plugins/ngrpo/frac_zero_advantage")
    assert all(math.isfinite(row["loss"]) for row in composed.state.log_history if "loss" in row)


def test_ngrpo_reduces_to_trl_grpo_when_its_changes_are_switched_off():
    """k = 0, TRL's epsilon and symmetric 0.2 clipping: NGRPO's estimator and surrogate reproduce GRPOTrainer."""

    def gradients(plugins, **kwargs):
        recorder = GradientRecorder()
        tiny_grpo_run(plugins, max_steps=2, num_iterations=2, callbacks=[recorder],
                      reward_funcs=digit_overlap_reward, **kwargs)
        return [torch.cat([g.flatten() for g in step]) for step in recorder.gradients]

    plain = gradients(None, trainer_cls=GRPOTrainer)
    same = gradients([{"ngrpo": {"num_virtual": 0, "epsilon": 1e-4, "clip_low": 0.2, "clip_high": 0.2}}])
    assert len(plain) == len(same) == 2
    for a, b in zip(plain, same):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    calibrated = gradients(["ngrpo"])
    assert not torch.allclose(plain[0], calibrated[0], rtol=1e-3, atol=1e-5)
