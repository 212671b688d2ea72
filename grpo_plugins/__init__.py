"""grpo-plugins: the methods of recent GRPO papers as plugins for TRL and verl.

Method authors need only::

    from grpo_plugins import Method, hookimpl, option, Range, POSITIVE, NON_NEGATIVE, UNIT, FINITE
"""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("grpo_plugins")

from grpo_plugins.batch import GradientStatistics, GRPOBatch, LossInputs, LossTerm, LossTotals, PromptRound, RunContext  # noqa: E402
from grpo_plugins.composition import Composition, LossParts, methods_from_config  # noqa: E402
from grpo_plugins.config import FINITE, NON_NEGATIVE, POSITIVE, UNIT, NoConfig, Range, option  # noqa: E402
from grpo_plugins.example import Example  # noqa: E402
from grpo_plugins.errors import BatchError, CompositionError, ConfigError, GRPOPluginsError, PluginError  # noqa: E402
from grpo_plugins.method import Method  # noqa: E402
from grpo_plugins.needs import Needs, TrainerCapabilities, capability_problems, check_capabilities  # noqa: E402
from grpo_plugins.parallel import ParallelContext  # noqa: E402
from grpo_plugins.prompt_table import PromptTable  # noqa: E402
from grpo_plugins.steps import Steps  # noqa: E402

__all__ = [
    "FINITE",
    "NON_NEGATIVE",
    "POSITIVE",
    "UNIT",
    "BatchError",
    "Composition",
    "CompositionError",
    "ConfigError",
    "Example",
    "GRPOBatch",
    "GradientStatistics",
    "GRPOPluginsError",
    "LossInputs",
    "LossParts",
    "LossTerm",
    "LossTotals",
    "Method",
    "Needs",
    "NoConfig",
    "ParallelContext",
    "PluginError",
    "PromptRound",
    "PromptTable",
    "Range",
    "RunContext",
    "Steps",
    "TrainerCapabilities",
    "capability_problems",
    "check_capabilities",
    "hookimpl",
    "methods_from_config",
    "option",
]
