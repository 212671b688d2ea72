"""CurES in TRL's GRPOTrainer: alone and composed with NGRPO, tiny 2-step runs on CPU."""

import math

import pytest

pytest.importorskip("trl")
pytest.importorskip("grpo_plugin_cures")

from grpo_plugins_trl.testing import tiny_grpo_run  # noqa: E402


def logged(trainer, prefix):
    return {key: value for row in trainer.state.log_history for key, value in row.items() if key.startswith(prefix)}


def test_cures_alone_plans_rounds_with_the_exact_budget():
    trainer = tiny_grpo_run(["cures"], max_steps=2)
    assert "plugins/cures/mixed_group_fraction" in logged(trainer, "plugins/cures/")
    rounds = list(trainer._plugin_rounds)
    assert rounds and all(r.numel() == trainer.args.generation_batch_size for r in rounds)
    assert all(math.isfinite(row["loss"]) for row in trainer.state.log_history if "loss" in row)
    counts = trainer.composition.method("cures").counts(rounds[0].unique())[1]
    assert float(counts.sum()) > 0  # observe has counted the completions of the visited prompts


def test_cures_composed_with_ngrpo():
    pytest.importorskip("grpo_plugin_ngrpo", reason="the composition partner grpo-plugin-ngrpo is not installed")
    trainer = tiny_grpo_run([{"cures": {"probe_rollouts": 2}}, "ngrpo"], max_steps=2)
    assert trainer.composition.providers("compute_advantages") == ["ngrpo"]
    assert trainer.composition.providers("allocate_rollouts") == ["cures"]
    assert logged(trainer, "plugins/cures/") and logged(trainer, "plugins/ngrpo/")
    assert all(math.isfinite(row["loss"]) for row in trainer.state.log_history if "loss" in row)
