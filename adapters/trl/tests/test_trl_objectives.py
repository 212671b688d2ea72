"""The TRL adapter's loss terms with their own normaliser, whole-group micro-batches, reference
log-probs at beta=0 and the setup call (grpo_plugins_trl.objectives), on the tiny local model."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402

from grpo_plugins import CompositionError, Method, TrainerCapabilities, hookimpl  # noqa: E402
from grpo_plugins_trl.objectives import GROUP_INDEX_KEY  # noqa: E402
from grpo_plugins_trl.testing import digit_overlap_reward, tiny_grpo_run, trl_loss_on_batch  # noqa: E402
from grpo_plugins_trl.trainer import trl_capabilities  # noqa: E402

pytest.importorskip("grpo_plugin_llds")
pytest.importorskip("grpo_plugin_copg")


def fixed_batch():
    gen = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float32)
    old = -torch.rand(4, 4, generator=gen) - 0.5
    return dict(prompt_ids=torch.tensor([1, 1, 1, 1]), rewards=torch.tensor([1.0, 0.0, 0.5, 0.0]),
                completion_ids=torch.randint(4, 14, (4, 4), generator=gen), completion_mask=mask,
                log_probs=old + 0.3 * torch.randn(4, 4, generator=gen), old_log_probs=old)


def test_llds_token_normaliser_keeps_its_numbers_under_dapo():
    """The declared 'token' normaliser over the step's tokens equals the old aggregation like the
    policy loss under TRL's token-mean loss (dapo): same loss, same gradient."""
    token = trl_loss_on_batch(["llds"], loss_type="dapo", **fixed_batch())
    policy = trl_loss_on_batch([{"llds": {"normaliser": "policy"}}], loss_type="dapo", **fixed_batch())
    torch.testing.assert_close(token.loss, policy.loss, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(token.grad, policy.grad, rtol=1e-6, atol=1e-9)
    plain = trl_loss_on_batch([], loss_type="dapo", **fixed_batch())
    assert abs(token.loss.item() - plain.loss.item()) > 1e-6  # the term is really there


def test_capabilities_provide_the_features_and_refuse_split_groups():
    args = tiny_grpo_run([], train=False).args
    caps = trl_capabilities(args)
    assert {"loss_normalisers", "whole_groups", "method_setup", "step_generator"} <= caps.features
    assert "group_index" in caps.loss_fields
    # an adapter that has not implemented them (verl today) refuses these methods at start-up
    assert not {"loss_normalisers", "whole_groups", "method_setup"} & TrainerCapabilities.standard("x").features
    with pytest.raises(CompositionError, match="per_device_train_batch_size=6 is not a multiple of num_generations=4"):
        tiny_grpo_run(["copg"], train=False, per_device_train_batch_size=6, num_generations=4, gradient_accumulation_steps=2)


def test_whole_groups_refused_with_round_planning():
    pytest.importorskip("grpo_plugin_knapsack_rl")
    with pytest.raises(CompositionError, match="whole groups"):
        tiny_grpo_run(["knapsack_rl", "copg"], train=False)


class Recorder(Method):
    """Records the run context given at setup."""

    name = "recorder"

    @hookimpl
    def setup(self, context):
        self.seen = context


def test_setup_runs_once_with_tokenizer_and_settings_and_whole_groups_stay_together():
    recorder = Recorder()
    trainer = tiny_grpo_run([recorder, "copg"], max_steps=2, reward_funcs=digit_overlap_reward, seed=3)
    assert recorder.seen.tokenizer is trainer.processing_class and recorder.seen.seed == 3
    assert recorder.seen.settings["group_size"] == 4 and recorder.context is recorder.seen
    # every micro-batch holds whole groups: each group id appears num_generations times
    for micro in trainer._buffered_inputs:
        counts = torch.unique(micro[GROUP_INDEX_KEY], return_counts=True)[1]
        assert counts.tolist() == [4] * len(counts)
    # the reference model exists at beta=0 and stays at the initial weights while the policy moves
    assert trainer.beta == 0.0 and trainer.ref_model is not None
    ratios = [row["plugins/copg/log_ratio_to_ref"] for row in trainer.state.log_history if "plugins/copg/log_ratio_to_ref" in row]
    assert ratios[0] == 0.0 and ratios[-1] != 0.0


def test_without_whole_group_methods_batching_is_trls():
    trainer = tiny_grpo_run(["llds"], train=False)
    assert trainer._plugin_whole_groups is False and trainer._plugin_reference is False and trainer.ref_model is None
