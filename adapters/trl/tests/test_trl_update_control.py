"""scale_update and gradient_statistics in the TRL adapter: the factor multiplies the learning rate of one
optimiser step; the statistics describe the step's micro-batch gradients."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402

from grpo_plugins import Method, hookimpl  # noqa: E402
from grpo_plugins_trl.testing import GradientRecorder, tiny_grpo_run  # noqa: E402


class Scale(Method):
    name = "scale"

    def __init__(self, config=None, factor=1.0):
        super().__init__(config)
        self.factor = factor
        self.statistics = []

    def requires(self):
        return {"gradient_statistics"}

    @hookimpl
    def scale_update(self, batch, step):
        self.statistics.append(batch.gradient_statistics)
        return torch.tensor(self.factor)


def weights(trainer):
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


def test_factor_zero_leaves_the_weights_and_the_schedule_alone():
    initial = weights(tiny_grpo_run(None, max_steps=1, train=False))
    trainer = tiny_grpo_run([Scale(factor=0.0)], max_steps=2)
    assert torch.equal(weights(trainer), initial)
    assert [row["learning_rate"] for row in trainer.state.log_history if "learning_rate" in row] == [1e-3, 5e-4]
    assert [row["plugins/update_scale"] for row in trainer.state.log_history if "plugins/update_scale" in row] == [0.0, 0.0]


def test_factor_scales_the_sgd_step_exactly():
    initial = weights(tiny_grpo_run(None, max_steps=1, train=False, optim="sgd"))
    full = weights(tiny_grpo_run([Scale(factor=1.0)], max_steps=1, optim="sgd", max_grad_norm=0.0))
    half = weights(tiny_grpo_run([Scale(factor=0.5)], max_steps=1, optim="sgd", max_grad_norm=0.0))
    assert torch.allclose(half - initial, (full - initial) / 2, atol=1e-7)


def test_gradient_statistics_match_the_step_gradient():
    recorder = GradientRecorder()
    method = Scale()
    tiny_grpo_run([method], max_steps=2, callbacks=[recorder], max_grad_norm=0.0, gradient_accumulation_steps=2)
    for stats, grads in zip(method.statistics, recorder.gradients):
        total = sum(float(g.double().pow(2).sum()) for g in grads)
        assert stats.unit_sq_norms.shape == (2,)  # K = 2 micro-batches, one process
        assert float(stats.mean_sq_norm) == pytest.approx(total, rel=1e-5)
        assert float(stats.unit_sq_norms.sum()) >= 2 * total * (1 - 1e-6)  # sum |u|^2 >= M |mean u|^2


def test_not_installed_without_a_method():
    assert tiny_grpo_run(None, max_steps=1, train=False)._plugin_update_control is None
