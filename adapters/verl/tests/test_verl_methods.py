"""Every installed method, alone, through the verl adapter's whole step on CPU, with its example data.

For each method (found through the ``grpo_plugins`` entry points) and the data its
:meth:`~grpo_plugins.Method.example` declares: plan a round (``sample_prompts`` / ``allocate_rollouts``),
run the trainer's start-up capability check, verl's advantage estimator on the round's batch (shuffled
groups of the planned sizes, the fields the ``grpo_plugins`` trainer fetches) and the actor loss the
trainer installs, with a backward pass; ``observe``; then a save/load round trip of the state. A method
verl cannot serve must be refused at start-up with its name (never at its first hook call).
"""

from __future__ import annotations

import pytest
import torch

import grpo_plugins_verl
from grpo_plugins import CompositionError
from grpo_plugins.conformance import Subject, installed_methods, plan_round, round_batch
from grpo_plugins_verl.runtime import get_runtime
from grpo_plugins_verl.testing import verl_loss_on_batch

INSTALLED = [name for name in installed_methods() if name != "grpo"]


@pytest.mark.parametrize("name", INSTALLED)
def test_method_runs_through_the_verl_step(name):
    subject = Subject.of(name)
    example, methods = subject.example, subject.run_list()
    grpo_plugins_verl.configure(methods)
    planned = plan_round(get_runtime().composition, example, step=0, seed=0)
    assert int(planned["counts"].sum()) == example.round_prompts * example.rollouts_per_prompt  # the budget
    batch = round_batch(example, planned, seed=1, step=0)
    keep = batch.completion_mask > 0
    current = torch.where(keep, batch.old_log_probs + 0.1 * torch.randn(keep.shape, generator=torch.Generator().manual_seed(2)), 0.0)
    try:
        result = verl_loss_on_batch(
            methods, prompt_ids=batch.prompt_ids, rewards=batch.rewards, completion_ids=batch.completion_ids,
            completion_mask=keep.long(), log_probs=current, old_log_probs=batch.old_log_probs,
            entropies=torch.where(keep, torch.rand(keep.shape), 0.0), ref_log_probs=batch.ref_log_probs,
            reward_components=batch.reward_components, reward_names=batch.reward_names, prompts=batch.prompts,
            completions=batch.completions, rows=batch.rows, total_steps=example.total_steps,
            old_entropies=torch.where(keep, batch.old_entropies, 0.0), old_log_probs_at=batch.old_log_probs_at,
        )
    except CompositionError as refused:  # what verl cannot provide is refused at start-up, naming the method
        assert f"method '{name}'" in str(refused) and "verl lacks it" in str(refused), refused
        return
    assert torch.isfinite(result.advantages).all() and torch.isfinite(result.loss)
    assert torch.isfinite(result.grad).all() and not result.grad[~keep].any()
    runtime = get_runtime()
    runtime.composition.run_observe(runtime.last_batch, step=1)
    state = runtime.composition.state_dict()
    grpo_plugins_verl.configure(methods)
    get_runtime().composition.load_state_dict(state)
