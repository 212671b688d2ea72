"""DCPO in real TRL runs (alone and with Unlikeliness) and its dual clip against verl's ``vanilla`` policy loss."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")
pytest.importorskip("grpo_plugin_dcpo", reason="grpo-plugin-dcpo is not installed")

import torch  # noqa: E402

from grpo_plugins import Composition, LossInputs  # noqa: E402
from grpo_plugins_trl.testing import digit_overlap_reward, tiny_grpo_run  # noqa: E402


def logged(trainer, key):
    return [row[key] for row in trainer.state.log_history if key in row]


@pytest.mark.parametrize("methods", [["dcpo"], ["unlikeliness", "dcpo"]])
def test_two_steps(methods):
    pytest.importorskip("grpo_plugin_unlikeliness")
    trainer = tiny_grpo_run(methods, max_steps=2, reward_funcs=digit_overlap_reward)
    # the tiny random model's entropy (~2.7 nats) is above H0 = 0.5: the target is cooled
    assert logged(trainer, "plugins/dcpo/target_temperature") == [0.8, 0.8]
    assert logged(trainer, "plugins/dcpo/entropy")[0] > 2
    batch = trainer.last_plugin_batch
    assert sorted(batch.old_log_probs_at) == [0.8, 1.0, 1.2] and batch.advantages.dim() == 2
    assert all(torch.isfinite(torch.tensor(logged(trainer, "loss"))))


def test_dual_clip_equals_verl_vanilla_loss_and_gradient():
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    from verl.workers.config.actor import ActorConfig

    torch.manual_seed(0)
    n, width = 6, 7
    mask = (torch.arange(width) < torch.randint(1, width + 1, (n,))[:, None]).float()
    old = -torch.rand(n, width) * 3
    log_probs = old + torch.randn(n, width) * 0.8  # ratios far outside the clip range, both sides
    adv = torch.randn(n, width) * 2
    ours_lp, verl_lp = log_probs.clone().requires_grad_(True), log_probs.clone().requires_grad_(True)
    inputs = LossInputs(log_probs=ours_lp, old_log_probs=old, advantages=adv, mask=mask, clip_low=0.2, clip_high=0.28)
    parts = Composition(["dcpo"]).run_loss_stage(inputs, lambda i: torch.zeros_like(i.log_probs))
    ours = (parts.policy * mask).sum() / mask.sum()
    config = ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=4, clip_ratio_low=0.2,
                         clip_ratio_high=0.28, clip_ratio_c=3.0)
    theirs, _ = core_algos.get_policy_loss_fn("vanilla")(
        old_log_prob=old, log_prob=verl_lp, advantages=adv, response_mask=mask.bool(), loss_agg_mode="token-mean",
        config=config, rollout_is_weights=None)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_lp.grad, verl_lp.grad * mask, rtol=1e-5, atol=1e-8)
