"""Fixtures of the integration tests: tiny real TRL runs on the multi-turn corridor
(``examples/multi_turn/corridor.py``), shared by the multi-turn methods' tests."""

import importlib.util
from pathlib import Path

import pytest

CORRIDOR = Path(__file__).resolve().parents[2] / "examples" / "multi_turn" / "corridor.py"
CORRIDOR_SETTINGS = dict(max_completion_length=16, per_device_train_batch_size=8, num_generations=4,
                         gradient_accumulation_steps=1)
"""Eight trajectories a step, four per start cell, up to 16 completion tokens (several turns)."""


@pytest.fixture(scope="session")
def corridor():
    """The example's corridor module (environment, rollout function, reward, dataset)."""
    spec = importlib.util.spec_from_file_location("corridor", CORRIDOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def corridor_run(corridor):
    """``corridor_run(methods, **overrides)``: a seeded ``tiny_grpo_run`` on eight corridor prompts with the
    example's rollout and reward (``CORRIDOR_SETTINGS`` unless overridden)."""
    import torch

    from grpo_plugins_trl.testing import tiny_grpo_run

    def run(methods, **overrides):
        torch.manual_seed(0)
        return tiny_grpo_run(methods, **{"dataset": corridor.corridor_dataset(8), "reward_funcs": corridor.reached_goal,
                                         "rollout_func": corridor.make_rollout(), **CORRIDOR_SETTINGS, **overrides})

    return run
