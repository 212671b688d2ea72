"""Batch fields methods require, the run length, prompt ids read before any rewrite, rounds with more
prompts than ``generation_batch_size // num_generations``, and ``loss_type='sapo'`` with loss hooks."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_plugins.testing import BatchRecorder
from grpo_plugins import Composition, CompositionError, Method, PromptRound, hookimpl
from grpo_plugins_trl.testing import arithmetic_dataset, digit_overlap_reward, tiny_grpo_run
from grpo_plugins_trl.trainer import INDEX_KEY, stable_prompt_id


def finite_losses(trainer) -> bool:
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row and "train_runtime" not in row]
    return bool(losses) and all(math.isfinite(x) for x in losses)


# --------------------------------------------------------------------------- required old log-probs
def test_required_old_log_probs_are_computed_like_trls_own():
    """On-policy (num_iterations=1) TRL skips the old log-probs; a method requiring them gets them from the
    adapter. With num_iterations=2 TRL computes them itself: the first generation batch is the same in
    both runs, so the two tensors must agree bit for bit (same forward, temperature and micro-batches)."""
    ours = tiny_grpo_run([BatchRecorder({"old_log_probs"})], max_steps=1, temperature=0.7).last_plugin_batch
    theirs = tiny_grpo_run([BatchRecorder()], max_steps=1, num_iterations=2, temperature=0.7).last_plugin_batch
    assert torch.equal(ours.completion_ids, theirs.completion_ids)
    assert theirs.old_log_probs is not None and torch.equal(ours.old_log_probs, theirs.old_log_probs)
    not_required = tiny_grpo_run([BatchRecorder()], max_steps=1, temperature=0.7).last_plugin_batch
    assert not_required.old_log_probs is None  # nothing is computed that no method needs


def test_methods_declare_the_old_log_probs_they_need():
    assert Composition(["unlikeliness"]).required_fields() == {"old_log_probs"}
    assert Composition(["spo"]).required_fields() == {"old_log_probs"}
    assert Composition([{"spo": {"rho_mode": "constant"}}]).required_fields() == set()
    # gtpo always reads the completion ids (conflict tokens); the old log-probs only for 'sampled' entropy
    assert Composition([{"gtpo": {"entropy_source": "sampled"}}]).required_fields() == {"old_log_probs", "completion_ids"}
    assert Composition(["gtpo"]).required_fields() == {"completion_ids"}  # 'auto' falls back to the policy's entropy


# --------------------------------------------------------------------------- run length
class RoundRecorder(Method):
    name = "round_recorder"

    def __init__(self):
        super().__init__()
        self.rounds: list[PromptRound] = []

    @hookimpl
    def augment_prompts(self, round: PromptRound, prompts: list) -> list:
        self.rounds.append(round)
        return prompts


def test_total_steps_reach_the_round_and_the_batch():
    rounds, recorder = RoundRecorder(), BatchRecorder()
    tiny_grpo_run([rounds, recorder], max_steps=2)
    assert [r.total_steps for r in rounds.rounds] == [2, 2]
    assert [b.total_steps for b in recorder.batches] == [2, 2]


def test_scaf_grpo_warmup_follows_max_steps_without_config():
    """warmup_fraction 0.5 of max_steps=4 -> 2 hint-free steps, with no total_steps in the config."""
    dataset = arithmetic_dataset(2).add_column("hint_knowledge", ["x", "y"]).add_column("hint_planning", ["x", "y"])
    dataset = dataset.add_column("hint_solution", ["x", "y"])
    trainer = tiny_grpo_run([{"scaf_grpo": {"warmup_fraction": 0.5}}], max_steps=4, dataset=dataset)
    assert trainer.composition.method("scaf_grpo").warmup_for(trainer.total_steps()) == 2
    hinted = [row["plugins/scaf_grpo/hinted_prompt_frac"] for row in trainer.state.log_history if "loss" in row]
    assert hinted[:2] == [0.0, 0.0]
    assert finite_losses(trainer)


# --------------------------------------------------------------------------- prompt ids
class Hint(Method):
    name = "hint"

    @hookimpl
    def augment_prompts(self, prompts: list) -> list:
        return [p + " 0" for p in prompts]


def test_hashed_prompt_ids_come_from_the_dataset_prompt_not_the_rewritten_one():
    recorder = BatchRecorder()
    dataset = arithmetic_dataset(32).remove_columns("prompt_id")
    tiny_grpo_run([Hint(), recorder], max_steps=1, dataset=dataset)
    batch = recorder.batches[0]
    assert all(p.endswith(" 0") for p in batch.prompts)  # generation saw the rewrite
    assert batch.prompt_ids.tolist() == [stable_prompt_id(row["prompt"]) for row in batch.rows]
    assert batch.group_sizes.tolist() == [4, 4]


class Sampler(Method):
    """Draws ``count`` prompts (default: the trainer's number) without replacement."""

    name = "sampler"

    def __init__(self, count=None):
        super().__init__()
        self.count = count

    @hookimpl
    def sample_prompts(self, round: PromptRound, generator: torch.Generator) -> torch.Tensor:
        return torch.randperm(round.dataset_size, generator=generator)[: self.count or round.num_prompts]


def test_without_a_prompt_id_column_the_sampled_dataset_index_is_the_prompt_id():
    seen_keys = set()

    def reward(completions, **kwargs):
        seen_keys.update(kwargs)
        return digit_overlap_reward(completions, **kwargs)

    recorder = BatchRecorder()
    dataset = arithmetic_dataset(32).remove_columns("prompt_id")
    trainer = tiny_grpo_run([Sampler(), Hint(), recorder], max_steps=2, dataset=dataset, reward_funcs=reward)
    for planned, batch in zip(trainer._plugin_rounds, recorder.batches):
        assert torch.equal(batch.prompt_ids, planned)  # the indices the sampler chose
        assert [row["prompt"] for row in batch.rows] == [dataset[int(i)]["prompt"] for i in planned]
    assert INDEX_KEY not in seen_keys and all(INDEX_KEY not in row for row in recorder.batches[0].rows)


# --------------------------------------------------------------------------- P' prompts per round
def test_a_round_of_budget_prompts_gets_one_completion_each_by_default():
    """generation_batch_size 8 with num_generations 4 would be 2 prompts of 4; the sampler asks for 8 prompts,
    and without an allocator the budget splits evenly: 8 groups of one."""
    recorder = BatchRecorder()
    trainer = tiny_grpo_run([Sampler(8), {"spo": {"use_sampler": False}}, recorder], max_steps=2, reward_funcs=digit_overlap_reward)
    assert all(r.numel() == 8 and torch.unique(r).numel() == 8 for r in trainer._plugin_rounds)
    assert all(b.num_groups == 8 and bool((b.group_sizes == 1).all()) for b in recorder.batches)
    assert finite_losses(trainer)


def test_a_round_that_cannot_split_the_budget_is_a_clear_error():
    with pytest.raises(CompositionError, match=r"3 prompts \(from \['sampler'\]\).*budget of 8"):
        tiny_grpo_run([Sampler(3)], max_steps=1)


# --------------------------------------------------------------------------- loss_type sapo
def test_sapo_method_runs_with_trls_sapo_loss_type():
    pytest.importorskip("grpo_plugin_sapo")
    trainer = tiny_grpo_run(["sapo"], max_steps=2, loss_type="sapo", num_iterations=2, reward_funcs=digit_overlap_reward)
    assert finite_losses(trainer)
    logged = set().union(*trainer.state.log_history)
    assert "plugins/sapo/gate_weight_mean" in logged
    assert not any(key.startswith("clip_ratio/") for key in logged)  # as TRL's own sapo loss logs


# --------------------------------------------------------------------------- the no-method path
def test_without_methods_grpotrainers_own_path_runs():
    for plugins in (None, [], ["grpo"]):
        trainer = tiny_grpo_run(plugins, train=False)
        assert trainer._plugin_passthrough  # no hook, gather or callback of the adapter runs
    assert not tiny_grpo_run([{"grpo": {"scale": "none"}}], train=False)._plugin_passthrough


def test_grpo_configured_otherwise_than_trl_sets_the_advantages():
    """TRL scales by the group std; grpo with scale 'none' (Dr. GRPO) must give r - group mean instead."""
    trainer = tiny_grpo_run([{"grpo": {"scale": "none"}}], max_steps=1, reward_funcs=digit_overlap_reward)
    batch = trainer.last_plugin_batch
    ids, rewards = batch.prompt_ids.tolist(), batch.rewards.tolist()
    means = {p: sum(r for q, r in zip(ids, rewards) if q == p) / ids.count(p) for p in set(ids)}
    expected = torch.tensor([r - means[p] for p, r in zip(ids, rewards)])
    torch.testing.assert_close(batch.advantages, expected.to(batch.advantages.dtype))
    assert bool((batch.advantages != 0).any())
