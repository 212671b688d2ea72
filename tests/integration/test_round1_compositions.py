"""Round 1's methods composed with each other through the core (no trainer): which method provides each
hook, which pairs conflict, and shaped advantages flowing into another method's loss."""

from __future__ import annotations

import pytest

for _plugin in ("knapsack_rl", "sapo", "spo", "unlikeliness", "vade"):
    pytest.importorskip(f"grpo_plugin_{_plugin}", reason=f"grpo-plugin-{_plugin} (round 1) is not installed")

import torch  # noqa: E402

from grpo_plugins import Composition, CompositionError, GRPOBatch, LossInputs  # noqa: E402
from grpo_plugins.testing import make_batch  # noqa: E402


def batch_with_scores(prompt_ids, rewards, scores, lengths, num_tokens: int = 5) -> GRPOBatch:
    """A batch whose completions have the given lengths and a constant token log-prob equal to the score
    (so the mean score is exact); padding holds a large garbage value that must be ignored."""
    lengths = torch.tensor(lengths)
    mask = (torch.arange(num_tokens) < lengths[:, None]).float()
    old = torch.where(mask > 0, torch.tensor(scores, dtype=torch.float32)[:, None].expand(-1, num_tokens), torch.tensor(99.0))
    return make_batch(
        group_sizes=(1,), num_tokens=num_tokens,
        prompt_ids=torch.tensor(prompt_ids), rewards=torch.tensor(rewards, dtype=torch.float32),
        reward_components=None, completion_mask=mask, old_log_probs=old, ref_log_probs=None,
        completion_ids=torch.ones(len(prompt_ids), num_tokens, dtype=torch.long), rows=None,
    )


def test_spo_switches_leave_slots_to_knapsack_rl():
    composition = Composition([{"spo": {"use_advantage": False}}, "knapsack_rl"])
    assert composition.providers("compute_advantages") == ["grpo"]
    assert composition.providers("allocate_rollouts") == ["knapsack_rl"]
    assert composition.providers("sample_prompts") == ["spo"]
    assert composition.providers("observe") == ["spo", "knapsack_rl"]
    with pytest.raises(CompositionError, match="spo.*knapsack_rl.*allocate_rollouts"):
        Composition([{"spo": {"single_rollout": True}}, "knapsack_rl"])


def test_vade_conflicts_with_another_sampler_and_composes_with_an_allocator():
    with pytest.raises(CompositionError, match="vade.*spo.*sample_prompts"):
        Composition(["vade", "spo"])
    both = Composition(["vade", "knapsack_rl"])
    assert both.providers("allocate_rollouts") == ["knapsack_rl"]
    Composition(["vade", {"spo": {"use_sampler": False}}])  # SPO's advantages with VADE's sampler


def test_unlikeliness_composes_with_a_loss_method():
    """Composes with a loss-stage method (sapo): shaped advantages flow into the soft-gated loss."""
    composition = Composition(["unlikeliness", "sapo"])
    batch = batch_with_scores([1, 1, 1, 1], [1, 1, 1, 1], [-0.3, -2.5, -1.0, -0.1], [3, 3, 3, 3])
    batch = composition.run_advantage_stage(batch)
    metrics = composition.pop_metrics()
    assert metrics["plugins/unlikeliness/frac_flat_groups_before"] == 1.0
    assert metrics["plugins/unlikeliness/frac_flat_groups_after"] == 0.0
    assert metrics["plugins/unlikeliness/mean_reward_scale"] == pytest.approx((0.875 + 1 + 0.9375 + 0.8125) / 4)
    mask = batch.completion_mask
    log_probs = batch.old_log_probs.clone().requires_grad_(True)
    inputs = LossInputs(log_probs=log_probs, old_log_probs=batch.old_log_probs,
                        advantages=batch.advantages[:, None].expand_as(mask), mask=mask)
    parts = composition.run_loss_stage(inputs, trainer_surrogate=None)
    # on-policy SAPO: -(2 / tau) A per token, tau = 1 for A > 0 and 1.05 otherwise
    tau = torch.where(batch.advantages > 0, 1.0, 1.05)
    torch.testing.assert_close(parts.policy[:, 0].detach(), -(2 / tau) * batch.advantages)
