"""Methods verl also ships, run through the adapter and compared with verl's own implementation.

- ``sapo`` (plugins/sapo) as a ``policy_surrogate`` through the ``grpo_plugins`` loss == verl's
  ``loss_mode=sapo``. verl always aggregates SAPO with ``seq-mean-token-mean`` (whatever
  ``loss_agg_mode`` says), so the adapter run uses that mode.
- ``gdpo`` (plugins/gdpo) through the ``grpo_plugins`` estimator vs verl's ``gdpo`` estimator. Both
  normalise each reward component within its group (unbiased std, epsilon 1e-6 here) and sum them
  with the reward weights. They differ in the last step: verl whitens the summed advantage over
  *tokens* (``masked_whiten``: token-weighted mean and variance with Bessel's correction over the
  token count, ``rsqrt(var + 1e-8)``), the plugin z-scores it over *sequences* (the paper's batch
  normalisation). The test runs the plugin without its batch step, applies verl's token whitening,
  and compares; it also checks that the two final steps differ exactly by that choice.
"""

from __future__ import annotations

from importlib import metadata

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from verl.trainer.ppo.core_algos import compute_gdpo_outcome_advantage, get_policy_loss_fn
from verl.utils import torch_functional as verl_F

import grpo_plugins_verl
from grpo_plugins_verl.advantage import compute_grpo_plugins_advantage
from grpo_plugins_verl.testing import actor_config


def installed(name: str) -> bool:
    return any(ep.name == name for ep in metadata.entry_points(group="grpo_plugins"))


@pytest.mark.skipif(not installed("sapo"), reason="plugins/sapo (grpo-plugin-sapo) is not installed")
@pytest.mark.parametrize("with_weights", [False, True])
def test_sapo_plugin_equals_verl_sapo_loss(with_weights):
    gen = torch.Generator().manual_seed(5)
    rows, tokens = 6, 7
    old = -torch.rand(rows, tokens, generator=gen) * 3
    new = old + (torch.rand(rows, tokens, generator=gen) - 0.5) * 2
    advantages = (torch.randn(rows, 1, generator=gen) * torch.ones(rows, tokens)).contiguous()
    advantages[1] = 0.0  # A = 0 takes tau_neg in both
    mask = torch.arange(tokens) < torch.tensor([7, 3, 5, 1, 6, 2])[:, None]
    weights = torch.rand(rows, tokens, generator=gen) + 0.5 if with_weights else None
    tau_pos, tau_neg = 1.3, 2.1

    def run(loss_mode, config):
        log_prob = new.clone().requires_grad_(True)
        loss, _ = get_policy_loss_fn(loss_mode)(
            old_log_prob=old, log_prob=log_prob, advantages=advantages, response_mask=mask,
            loss_agg_mode="seq-mean-token-mean", config=config, rollout_is_weights=weights,
        )
        loss.backward()
        return loss.detach(), log_prob.grad

    expected = run("sapo", actor_config("sapo", "seq-mean-token-mean", tau_pos=tau_pos, tau_neg=tau_neg))
    grpo_plugins_verl.configure([{"sapo": {"tau_pos": tau_pos, "tau_neg": tau_neg}}])
    ours = run("grpo_plugins", actor_config("grpo_plugins", "seq-mean-token-mean"))
    assert torch.equal(ours[0], expected[0]), (ours[0], expected[0])
    torch.testing.assert_close(ours[1], expected[1], rtol=0, atol=0)


@pytest.mark.skipif(not installed("gdpo"), reason="plugins/gdpo (grpo-plugin-gdpo) is not installed")
def test_gdpo_plugin_matches_verl_gdpo_up_to_verl_token_whitening():
    gen = torch.Generator().manual_seed(9)
    sizes = [4, 3, 5, 4]
    uids = np.repeat(np.array([f"u{g}" for g in range(len(sizes))], dtype=object), sizes)
    perm = torch.randperm(len(uids), generator=gen).numpy()
    uids = uids[perm]
    n, tokens, prompt_len = len(uids), 6, 3
    lengths = torch.randint(1, tokens + 1, (n,), generator=gen)
    mask = (torch.arange(tokens) < lengths[:, None]).long()
    acc = torch.randint(0, 2, (n,), generator=gen).float()
    fmt = torch.randint(0, 3, (n,), generator=gen).float() / 2
    weights = [1.0, 0.5]

    verl_adv, _ = compute_gdpo_outcome_advantage(
        token_level_rewards=torch.zeros(n, tokens),
        response_mask=mask,
        index=uids,
        epsilon=1e-6,
        config=OmegaConf.create({"gdpo_reward_keys": ["acc", "fmt"], "gdpo_reward_weights": weights}),
        non_tensor_batch={"acc": acc.numpy(), "fmt": fmt.numpy(), "uid": uids},
        batch={
            "prompts": torch.ones(n, prompt_len, dtype=torch.long),
            "attention_mask": torch.cat([torch.ones(n, prompt_len, dtype=torch.long), mask], dim=1),
        },
    )

    def ours(batch_normalize):
        grpo_plugins_verl.configure([{"gdpo": {"epsilon": 1e-6, "batch_normalize": batch_normalize}}])
        runtime = grpo_plugins_verl.get_runtime()
        runtime.extras = {  # what the grpo_plugins trainer fetches from reward_extra_info
            "reward_components": torch.stack([acc, fmt], dim=1),
            "reward_names": ("acc", "fmt"),
            "reward_weights": torch.tensor(weights),
        }
        rewards = torch.zeros(n, tokens)
        rewards[torch.arange(n), lengths - 1] = acc + fmt
        return compute_grpo_plugins_advantage(rewards, mask, uids, None)[0]

    summed = ours(batch_normalize=False)
    whitened = verl_F.masked_whiten(summed, mask) * mask
    torch.testing.assert_close(whitened, verl_adv, rtol=1e-5, atol=1e-5)
    # the plugin's own last step is the paper's sequence-level z-score, not verl's token whitening
    per_sequence = summed[:, 0]
    expected = (per_sequence - per_sequence.mean()) / (per_sequence.std() + 1e-6)
    torch.testing.assert_close(ours(batch_normalize=True)[:, 0], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours(batch_normalize=True), verl_adv, atol=1e-3)
