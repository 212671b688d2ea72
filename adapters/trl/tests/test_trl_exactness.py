"""With no method but the built-in default, PluginGRPOTrainer reproduces GRPOTrainer bit for bit."""

from __future__ import annotations

import functools

import pytest
import torch
from trl import GRPOTrainer

from grpo_plugins import LossInputs, Method, hookimpl
from grpo_plugins_trl.testing import GradientRecorder, digit_overlap_reward, tiny_grpo_run

SETTINGS = dict(max_steps=5, num_iterations=2, gradient_accumulation_steps=2, reward_funcs=digit_overlap_reward)


def run(plugins, trainer_cls=None, **overrides):
    recorder = GradientRecorder()
    trainer = tiny_grpo_run(plugins, trainer_cls=trainer_cls, callbacks=[recorder], **{**SETTINGS, **overrides})
    params = [p.detach().clone() for p in trainer.model.parameters()]
    logs = [row for row in trainer.state.log_history if "loss" in row and "train_runtime" not in row]
    return logs, recorder.gradients, params


@functools.lru_cache(maxsize=None)
def vanilla(loss_type: str, beta: float = 0.0):
    return run(None, trainer_cls=GRPOTrainer, loss_type=loss_type, beta=beta)


def assert_identical(vanilla_run, plugin_run):
    (v_logs, v_grads, v_params), (p_logs, p_grads, p_params) = vanilla_run, plugin_run
    assert len(v_logs) == len(p_logs) == SETTINGS["max_steps"]
    for v_row, p_row in zip(v_logs, p_logs):
        for key, value in v_row.items():
            if key in ("step_time",):  # wall-clock
                continue
            assert p_row[key] == value, f"step {v_row['step']}: {key} {p_row[key]!r} != {value!r}"
        assert all(k.startswith("plugins/") for k in set(p_row) - set(v_row)), set(p_row) - set(v_row)
    assert len(v_grads) == len(p_grads) == SETTINGS["max_steps"]
    for v_step, p_step in zip(v_grads, p_grads):
        assert all(torch.equal(a, b) for a, b in zip(v_step, p_step, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(v_params, p_params, strict=True))
    assert any(row["loss"] != 0 for row in v_logs)  # the comparison has signal


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("plugins", [None, [], ["grpo"]], ids=["none", "empty", "grpo"])
def test_default_path_equals_trl(loss_type, plugins):
    assert_identical(vanilla(loss_type), run(plugins, loss_type=loss_type))


def test_default_path_equals_trl_with_kl():
    assert_identical(vanilla("dapo", 0.05), run([], loss_type="dapo", beta=0.05))


class UnitGate(Method):
    """Gates every token by 1: the adapter's own loss path must then equal TRL's loss exactly."""

    name = "unit_gate"

    @hookimpl
    def gate_loss(self, inputs: LossInputs) -> torch.Tensor:
        return torch.ones_like(inputs.log_probs)


@pytest.mark.parametrize(
    "loss_type,beta", [("dapo", 0.0), ("grpo", 0.0), ("dr_grpo", 0.0), ("bnpo", 0.0), ("grpo", 0.05), ("sapo", 0.0)]
)
def test_adapter_loss_path_equals_trl(loss_type, beta):
    plugin_run = run([UnitGate()], loss_type=loss_type, beta=beta)
    assert_identical(vanilla(loss_type, beta), plugin_run)


def test_adapter_loss_path_equals_trl_with_trl_extras():
    """Clip-higher, two-sided clipping (delta) and the top-entropy token mask go through the adapter's loss too."""
    extras = dict(loss_type="dapo", epsilon_high=0.28, delta=1.5, top_entropy_quantile=0.5)
    assert_identical(run(None, trainer_cls=GRPOTrainer, **extras), run([UnitGate()], **extras))


def length_reward(completions, **kwargs):
    """A second reward function, for multi_objective_aggregation."""
    return [len(c if isinstance(c, str) else c[0]["content"]) / 8.0 for c in completions]


@pytest.mark.parametrize("settings", [
    dict(scale_rewards="batch"), dict(scale_rewards="none"),
    dict(multi_objective_aggregation="normalize_then_sum", reward_funcs=[digit_overlap_reward, length_reward]),
], ids=["scale_batch", "scale_none", "normalize_then_sum"])
def test_core_estimator_gives_trls_advantages(settings):
    """With a method enabled the core's ``grpo`` estimates (in TRL's arithmetic): the training is TRL's, bit for bit."""
    settings = dict(loss_type="dapo", **settings)
    assert_identical(run(None, trainer_cls=GRPOTrainer, **settings), run([UnitGate()], **settings))
