"""Every installed method of the project, alone, through the verl adapter's whole step on CPU.

For each method: plan a round (``sample_prompts`` / ``allocate_rollouts``), run verl's advantage
estimator on a verl-shaped batch of that round (ragged groups, a padding row, the fields the
``grpo_plugins`` trainer fetches), ``observe``, then verl's policy loss with a backward pass.
Checks: finite advantages that are 0 off the response and on padding, a finite loss whose gradient
reaches only response tokens, and plugin state that survives a save/load round trip.
"""

from __future__ import annotations

from importlib import metadata

import pytest
import torch
from omegaconf import OmegaConf

import grpo_plugins_verl
from grpo_plugins import PromptRound
from grpo_plugins_verl.advantage import compute_grpo_plugins_advantage
from grpo_plugins_verl.loss import compute_grpo_plugins_policy_loss
from grpo_plugins_verl.testing import actor_config, isolate, verl_batch

CONFIGS = {"scaf_grpo": {"total_steps": 10}}
"""Options a method cannot start without (the run length)."""
INSTALLED = sorted({ep.name for ep in metadata.entry_points(group="grpo_plugins")} - {"grpo"})


@pytest.fixture(autouse=True)
def clean_runtime(monkeypatch):
    isolate(monkeypatch)
    yield
    grpo_plugins_verl.configure(None)


@pytest.mark.parametrize("name", INSTALLED)
def test_method_runs_through_the_verl_step(name):
    grpo_plugins_verl.configure([{name: CONFIGS.get(name, {})}])
    runtime = grpo_plugins_verl.get_runtime(OmegaConf.create({}))
    runtime.trainer_attached = True
    composition = runtime.composition
    runtime.total_steps = 10
    runtime.rows_for = lambda ids: [{"data_source": "toy", "answer": "2"} for _ in ids]
    round = PromptRound(num_prompts=4, budget=16, dataset_size=20, step=0, default_rollouts=4, total_steps=10)
    ids = composition.run_sample_prompts(round, torch.Generator().manual_seed(0))
    ids = torch.arange(4) if ids is None else ids
    sizes = tuple(composition.rollout_counts(round, ids).tolist())  # what the trainer sends as __rollout_n__
    rewards, mask, uids = verl_batch(sizes, num_tokens=6, seed=1, num_padding=1)
    rewards = (rewards > 0).float()  # 0/1 outcome on the last token
    rows, tokens = mask.shape
    gen = torch.Generator().manual_seed(2)
    runtime.prompt_ids.update({f"uid-1-{g}": int(ids[g]) for g in range(len(sizes))})  # as the trainer registers them
    runtime.extras = {
        "completion_ids": torch.randint(3, 50, (rows, tokens), generator=gen) * mask,
        "old_log_probs": -torch.rand(rows, tokens, generator=gen) * mask,
        "reward_components": torch.stack([rewards.sum(-1), torch.rand(rows, generator=gen).round()], 1),
        "reward_names": ("acc", "format"),
        "prompts": [[{"role": "user", "content": "what is 1 + 1 ?"}]] * rows,
        "completions": ["2"] * rows,
    }
    advantages, _ = compute_grpo_plugins_advantage(rewards, mask, uids, OmegaConf.create({}))
    runtime.extras = None
    assert torch.isfinite(advantages).all()
    assert advantages[mask == 0].abs().sum() == 0 and advantages[-1].abs().sum() == 0
    composition.run_observe(runtime.last_batch, step=1)

    old = -torch.rand(rows, tokens, generator=gen)
    log_prob = (old + 0.1 * torch.randn(rows, tokens, generator=gen)).requires_grad_(True)
    loss, metrics = compute_grpo_plugins_policy_loss(
        old_log_prob=old, log_prob=log_prob, advantages=advantages, response_mask=mask.bool(),
        loss_agg_mode="token-mean", config=actor_config(),
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(log_prob.grad).all()
    assert log_prob.grad[mask == 0].abs().sum() == 0
    assert all(isinstance(value, float) for value in metrics.values())

    state = composition.state_dict()
    grpo_plugins_verl.configure([{name: CONFIGS.get(name, {})}])
    grpo_plugins_verl.get_runtime(OmegaConf.create({})).composition.load_state_dict(state)
