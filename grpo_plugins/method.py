"""The base class of a method plugin: its name, config, paper link, metrics and state."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from grpo_plugins.config import NoConfig


class Method:
    """A GRPO method: a pluggy plugin object whose ``@hookimpl`` methods implement hooks.

    Subclasses set ``name`` (the name runs enable it by), ``Config`` (a frozen dataclass built with
    :func:`grpo_plugins.option`), ``paper`` (a link) and implement hooks as methods decorated with
    ``@hookimpl``. A distribution registers the class under the ``grpo_plugins`` entry-point group.

    Stateful methods override :meth:`state_dict` / :meth:`load_state_dict` with tensors and plain
    Python values only; adapters save them with every trainer checkpoint.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig
    paper: ClassVar[str] = ""

    def __init__(self, config: Any = None):
        self.config = self.Config() if config is None else config
        self._metrics: dict[str, float] = {}

    @classmethod
    def summary(cls) -> str:
        """First line of the class docstring."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def disabled_hooks(self) -> set[str]:
        """Hooks this instance switches off under its config (e.g. to leave a single-provider slot to
        another method). The default keeps every implemented hook on."""
        return set()

    def requires(self) -> set[str]:
        """``GRPOBatch`` fields this instance needs under its config (e.g. ``{"old_log_probs"}``), so that
        an adapter fills them even where its trainer would not compute them. The default needs none."""
        return set()

    def log_metric(self, key: str, value: float | torch.Tensor) -> None:
        """Record a metric; adapters log it as ``plugins/<method>/<key>`` at the trainer's next log."""
        self._metrics[key] = float(value)

    def pop_metrics(self) -> dict[str, float]:
        """The metrics recorded since the last call (and forget them)."""
        metrics, self._metrics = self._metrics, {}
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """The method's state: tensors and plain Python values only (no pickled objects)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"method '{self.name}' is stateless but was given state {sorted(state)}")
