"""MY METHOD is discovered through its entry point and its hook does what the paper says.

Install the plugin first (`pip install -e .`): the tests enable it by name, like a user's run.
"""

import pytest
import torch

from grpo_plugins import ConfigError
from grpo_plugins.registry import resolve
from grpo_plugins.testing import make_batch


def test_discovered():
    info = resolve("my_method")
    assert info.distribution == "grpo-plugin-my-method"
    assert info.load().name == "my_method"


def test_clips_the_estimators_advantages(enable_methods):
    # two groups, contiguous: rewards (0, 0, 0, 3) and (1, 2)
    batch = make_batch(group_sizes=(4, 2), rewards=[0.0, 0.0, 0.0, 3.0, 1.0, 2.0], shuffle=False)
    composition = enable_methods([{"my_method": {"clip": 1.0}}])
    composition.run_advantage_stage(batch)
    # grpo: group 1 mean 0.75, std 1.5 -> (-0.5, -0.5, -0.5, 1.5); group 2 -> (-0.7071, 0.7071)
    expected = torch.tensor([-0.5, -0.5, -0.5, 1.0, -0.707107, 0.707107])
    torch.testing.assert_close(batch.advantages, expected, atol=1e-5, rtol=0)
    assert composition.pop_metrics()["plugins/my_method/frac_clipped"] == pytest.approx(1 / 6)


def test_rejects_a_bad_config(enable_methods):
    with pytest.raises(ConfigError, match="clip must be > 0"):
        enable_methods([{"my_method": {"clip": 0.0}}])
