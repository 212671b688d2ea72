"""pytest fixtures of the TRL adapter: a tiny real ``GRPOTrainer`` run for a method's integration tests.

Loaded by pytest through the adapter's ``pytest11`` entry point
(``grpo_plugins_trl = "grpo_plugins_trl.pytest_plugin"``), or explicitly with
``pytest -p grpo_plugins_trl.pytest_plugin``; a method's unit tests (core + torch only) never need them.

Fixtures:
    ``tiny_grpo_run``: :func:`grpo_plugins_trl.testing.tiny_grpo_run`: trains the tiny local model
        (word-level tokenizer, random 2-layer Qwen2) for a few steps on CPU in fp32 with the given
        methods and returns the trainer. Nothing is downloaded.
    ``trl_test_kit``: the module :mod:`grpo_plugins_trl.testing` (the tiny tokenizer, model and
        arithmetic dataset, the reward functions, ``GradientRecorder``, ``trl_loss_on_batch``).

Example::

    def test_my_method_in_trl(tiny_grpo_run, trl_test_kit):
        trainer = tiny_grpo_run(["my_method"], max_steps=2, reward_funcs=trl_test_kit.digit_overlap_reward)
        assert any("plugins/my_method/" in key for row in trainer.state.log_history for key in row)
"""

from __future__ import annotations

from types import ModuleType
from typing import Callable

import pytest


@pytest.fixture(scope="session")
def trl_test_kit() -> ModuleType:
    """The module :mod:`grpo_plugins_trl.testing` (imported on first use: trl loads only when needed)."""
    from grpo_plugins_trl import testing

    return testing


@pytest.fixture
def tiny_grpo_run(trl_test_kit: ModuleType) -> Callable:
    """``tiny_grpo_run(methods, max_steps=2, **grpo_config_overrides) -> trainer``: a tiny real TRL run
    (see :func:`grpo_plugins_trl.testing.tiny_grpo_run` for every argument)."""
    return trl_test_kit.tiny_grpo_run
