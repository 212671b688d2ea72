"""REC on the real TRL trainer (alone and with round-1 methods), and against verl's own gpg and dro losses."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("trl")
pytest.importorskip("grpo_plugin_rec")

import torch  # noqa: E402

from grpo_plugins import Composition, LossInputs  # noqa: E402
from grpo_plugins_trl.testing import digit_overlap_reward, tiny_grpo_run  # noqa: E402


def rows(trainer, key):
    return [row[key] for row in trainer.state.log_history if key in row]


def test_rec_alone_and_composed_off_policy():
    trainer = tiny_grpo_run([{"rec": {"clip_mode": "one-side"}}], max_steps=2, num_iterations=2,
                            reward_funcs=digit_overlap_reward)
    losses = rows(trainer, "loss")
    assert losses and all(math.isfinite(v) for v in losses) and rows(trainer, "plugins/rec/clip_frac")
    composed = tiny_grpo_run(["unlikeliness", {"rec": {"variant": "asymre"}}, "llds"], max_steps=2,
                             reward_funcs=digit_overlap_reward)
    assert rows(composed, "plugins/llds/llds") and rows(composed, "plugins/rec/clip_frac")


@pytest.mark.parametrize("loss", ["gpg", "dro"])
def test_equals_verl_gpg_and_dro(loss):
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    from verl.workers.config.actor import ActorConfig, PolicyLossConfig

    gen = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 5, generator=gen, dtype=torch.float64)
    log_probs = old + 0.3 * torch.randn(4, 5, generator=gen, dtype=torch.float64)
    mask = (torch.arange(5) < torch.tensor([[5], [3], [1], [4]])).double()
    adv = torch.tensor([[0.7], [-0.4], [1.1], [-1.2]], dtype=torch.float64).expand(4, 5)
    config = {} if loss == "gpg" else {"regularizer": "k2", "regularizer_coef": 0.5 * 0.3}
    policy = PolicyLossConfig(loss_mode=loss, dro_beta=0.3) if loss == "dro" else PolicyLossConfig(loss_mode=loss)
    actor = ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=4, policy_loss=policy)
    theirs_lp = log_probs.clone().requires_grad_(True)
    theirs, _ = core_algos.get_policy_loss_fn(loss)(old_log_prob=old, log_prob=theirs_lp, advantages=adv,
                                                    response_mask=mask.bool(), loss_agg_mode="token-mean", config=actor)
    ours_lp = log_probs.clone().requires_grad_(True)
    parts = Composition([{"rec": config}]).run_loss_stage(
        LossInputs(log_probs=ours_lp, old_log_probs=old, advantages=adv, mask=mask), None)
    ours = torch.where(mask > 0, parts.policy, 0.0).sum() / mask.sum()
    torch.testing.assert_close(ours, theirs.to(ours.dtype))
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_lp.grad, torch.where(mask > 0, theirs_lp.grad, 0.0))
