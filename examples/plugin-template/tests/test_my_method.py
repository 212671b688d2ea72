"""MY METHOD: the conformance suite, and the paper's worked example.

Install the distribution first (`pip install -e .[test]`): the tests enable the method by name, as a
run does. `grpo-plugins test my_method` runs the conformance suite alone.
"""

import torch

from grpo_plugins.conformance import MethodConformance
from grpo_plugins.testing import make_batch


class TestConformance(MethodConformance):
    """Every guarantee of grpo-plugins: hook contracts, constant groups, padding, row order, state,
    data-parallel ranks, config domains, declared needs."""

    method = "my_method"

def test_worked_example(enable_methods):
    """Replace with the paper's worked example: numbers computed by hand, never by the code."""
    # two groups of two, contiguous: rewards (0, 1) and (1, 3)
    batch = make_batch(group_sizes=(2, 2), rewards=[0.0, 1.0, 1.0, 3.0], shuffle=False)
    enable_methods([{"my_method": {"weight": 1.0}}]).run_advantage_stage(batch)
    # the placeholder hooks with weight 1 leave GRPO's advantages: (r - group mean) / group std (unbiased),
    # (0 - 0.5) / 0.7071 = -0.7071 and (1 - 2) / 1.4142 = -0.7071
    expected = torch.tensor([-0.707107, 0.707107, -0.707107, 0.707107])
    torch.testing.assert_close(batch.advantages, expected, atol=1e-5, rtol=0)
