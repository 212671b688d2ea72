"""PRS + VSPO in TRL's GRPOTrainer: staged rewards, zero-advantage groups replaced inside the step, prompts
drawn by task value; alone and composed with SAPO, tiny CPU runs."""

import math
import zlib

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("grpo_plugin_prs_vspo")

from grpo_plugins.testing import BatchRecorder  # noqa: E402
from grpo_plugins_trl.testing import completion_text, exact_answer_reward, tiny_grpo_run  # noqa: E402

CONFIG = {"format_reward": "well_formed", "correct_reward": "exact_answer_reward"}


def well_formed(completions, **kwargs):
    """A 0/1 hash of the completion text (1 in 4 on average): the tiny random model's stand-in for a parseable answer."""
    return [float(zlib.crc32(completion_text(c).encode()) % 4 == 0) for c in completions]


def logged(trainer, key):
    return [row[key] for row in trainer.state.log_history if key in row]


def run(plugins, **settings):
    return tiny_grpo_run(plugins, max_steps=3, reward_funcs=[well_formed, exact_answer_reward], **settings)


def test_prs_vspo_alone_replaces_zero_advantage_groups_and_samples_by_value():
    recorder = BatchRecorder()
    trainer = run([{"prs_vspo": CONFIG}, recorder])
    assert trainer.plugin_refill is not None and trainer.plans_rounds  # batch editing and value sampling installed
    # the pass rates count every generated completion once, the dropped groups included (keep_rows, each round)
    table = trainer.composition.method("prs_vspo").table
    seen_total = table.get("seen", torch.arange(len(trainer.train_dataset))).sum().item()
    assert seen_total == trainer.plugin_refill.total_rollouts > 3 * trainer.args.generation_batch_size
    assert len(recorder.batches) == 3
    for batch in recorder.batches:  # the trained batches: shaped rewards, no group with all-equal PRS rewards
        method = trainer.composition.method("prs_vspo")
        prs = method.prs_rewards(batch)
        assert batch.rewards.tolist() == prs.tolist()
        assert bool(method.keep_rows(batch).all())
        assert batch.num_completions == trainer.args.generation_batch_size
    assert logged(trainer, "plugins/prs_vspo/format_valid_fraction")
    assert logged(trainer, "plugins/prs_vspo/replaced_group_fraction")
    assert logged(trainer, "plugins/prs_vspo/sampled_task_value")
    rounds = logged(trainer, "batch_editing/generation_rounds")
    assert len(rounds) == 3 and sum(rounds) > 3  # some batch was refilled, and the cost is logged
    assert sum(logged(trainer, "batch_editing/rollouts")) == trainer.plugin_refill.total_rollouts
    assert all(value == 0.0 for value in logged(trainer, "plugins/grpo/frac_zero_advantage"))
    seen = trainer.composition.method("prs_vspo").table.get("seen", batch.group_prompt_ids)
    assert bool((seen > 0).all())  # observe counted the trained prompts for the task value
    assert all(math.isfinite(loss) for loss in logged(trainer, "loss"))


def test_prs_vspo_with_filter_groups_and_sapo():
    pytest.importorskip("grpo_plugin_sapo", reason="the composition partner grpo-plugin-sapo is not installed")
    trainer = run([{"prs_vspo": CONFIG}, "sapo"], filter_groups=True, filter_groups_metric="well_formed",
                  max_num_gen_batches=0)
    assert trainer.composition.providers("policy_surrogate") == ["sapo"]
    assert logged(trainer, "batch_editing/dropped_groups") and logged(trainer, "plugins/prs_vspo/format_valid_fraction")
    assert all(math.isfinite(loss) for loss in logged(trainer, "loss"))


def test_prs_vspo_needs_its_reward_functions():
    with pytest.raises(Exception, match="prs_vspo needs the reward function 'format'"):
        tiny_grpo_run(["prs_vspo"], max_steps=1)


def test_refused_on_verl_without_the_grpo_plugins_trainer():
    """verl's own trainer (estimator and loss registered by hand) cannot refill groups: refused, naming the
    feature; the adapter's trainer runs it (adapters/verl/tests/e2e/test_verl_batch_editing.py)."""
    pytest.importorskip("grpo_plugins_verl")
    from grpo_plugins import Composition
    from grpo_plugins_verl.capabilities import verl_capabilities

    problems = Composition(["prs_vspo"]).capability_problems(verl_capabilities())
    assert any("method 'prs_vspo' needs trainer feature 'batch_editing'" in p and "verl lacks it" in p for p in problems)
    without = Composition([{"prs_vspo": {"replace_zero_advantage_groups": False}}]).capability_problems(verl_capabilities())
    assert not any("batch_editing" in p for p in without)
