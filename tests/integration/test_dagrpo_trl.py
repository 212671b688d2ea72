"""DaGRPO in TRL's GRPOTrainer: pair-masked advantages from a fine-grained score, reference solutions
injected as anchors into failed groups; alone and composed with the unlikeliness reward, tiny CPU runs."""

import math

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("grpo_plugin_dagrpo")

from grpo_plugins.injection import INJECTED_KEY, kind_code  # noqa: E402
from grpo_plugins.testing import BatchRecorder  # noqa: E402
from grpo_plugins_trl.testing import arithmetic_dataset, digit_overlap_reward, exact_answer_reward, tiny_grpo_run  # noqa: E402
from grpo_plugin_dagrpo import pair_masked_advantages  # noqa: E402

CONFIG = {"score": "digit_overlap_reward", "tau": 0.05}


def dataset():
    data = arithmetic_dataset(32, 0)
    return data.add_column("solution", list(data["answer"]))


def logged(trainer, key):
    return [row[key] for row in trainer.state.log_history if key in row]


def run(plugins, **settings):
    return tiny_grpo_run(plugins, dataset=dataset(), max_steps=2, reward_funcs=[exact_answer_reward, digit_overlap_reward],
                         reward_weights=[1.0, 0.0], **settings)


def test_dagrpo_alone_masks_indistinct_pairs_and_anchors_failed_groups():
    recorder = BatchRecorder()
    trainer = run([{"dagrpo": CONFIG}, recorder])
    for batch in recorder.batches:
        anchor = batch.row_data[INJECTED_KEY] == kind_code("anchor")
        generated = batch.row_data[INJECTED_KEY] == 0
        failed = [p for p in batch.prompt_ids[generated].unique().tolist()
                  if float(batch.rewards[generated & (batch.prompt_ids == p)].max()) <= 0]
        assert sorted(batch.prompt_ids[anchor].tolist()) == sorted(failed) and len(failed) >= 1
        assert batch.rewards[anchor].eq(1.0).all() and torch.isnan(batch.reward_components[anchor]).all()
        scores = batch.reward_components[:, 1]
        expected, _ = pair_masked_advantages(batch.rewards, scores, batch.group_index, batch.num_groups, 0.05, 1e-6)
        assert torch.allclose(batch.advantages, expected)
        for p in failed:  # GRPO would give the failed group 0; the anchor gives it a signal
            group = batch.prompt_ids == p
            assert batch.advantages[group & anchor].gt(0).all() and batch.advantages[group & generated].lt(0).all()
    assert logged(trainer, "plugins/dagrpo/masked_pair_fraction") and logged(trainer, "injection/anchor")
    assert all(math.isfinite(x) for x in logged(trainer, "loss"))


def test_dagrpo_with_unlikeliness():
    pytest.importorskip("grpo_plugin_unlikeliness", reason="the composition partner is not installed")
    recorder = BatchRecorder()
    trainer = run([{"dagrpo": CONFIG}, "unlikeliness", recorder])
    assert trainer.composition.providers("shape_rewards") == ["unlikeliness"]
    assert recorder.batches and all(bool((b.row_data[INJECTED_KEY] != 0).any()) for b in recorder.batches)
    assert all(math.isfinite(x) for x in logged(trainer, "loss"))
