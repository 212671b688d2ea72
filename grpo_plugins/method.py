"""The base class of a method plugin: its name, config, paper link, metrics and state."""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from grpo_plugins.config import NoConfig
from grpo_plugins.needs import Needs

if TYPE_CHECKING:
    from grpo_plugins.batch import RunContext
    from grpo_plugins.example import Example


class Method:
    """A GRPO method: a pluggy plugin object whose ``@hookimpl`` methods implement hooks.

    Subclasses set ``name`` (the name runs enable it by), ``Config`` (a frozen dataclass built with
    :func:`grpo_plugins.option`), ``paper`` (a link) and implement hooks as methods decorated with
    ``@hookimpl``. A distribution registers the class under the ``grpo_plugins`` entry-point group.

    Stateful methods override :meth:`state_dict` / :meth:`load_state_dict` with tensors and plain
    Python values only; adapters save them with every trainer checkpoint.

    What a method needs beyond its hooks (loss-stage fields, data columns, trainer settings, other
    methods) it declares in :meth:`needs`; the adapter refuses a run that cannot provide it.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig
    paper: ClassVar[str] = ""
    plugin_api: ClassVar[str] = ">=1.0,<2"
    """The plugin-API versions the method supports (:mod:`grpo_plugins.api`); a core outside the range
    refuses it at start-up. Raise the lower bound when the method starts using a newer hook or field."""

    def __init__(self, config: Any = None):
        self.config = self.Config() if config is None else config
        self._metrics: dict[str, float] = {}
        self.context: RunContext | None = None  # set before the ``setup`` hook runs

    @classmethod
    def summary(cls) -> str:
        """First line of the class docstring."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    @classmethod
    def example(cls) -> "Example":
        """The data and config the conformance suite exercises the method with (an
        :class:`~grpo_plugins.example.Example`): named reward components, dataset columns, completion
        texts, the smallest group it accepts, ... The default is a generic batch with two 0/1 rewards."""
        from grpo_plugins.example import Example

        return Example()

    def disabled_hooks(self) -> set[str]:
        """Hooks this instance switches off under its config (e.g. to leave a single-provider slot to
        another method). The default keeps every implemented hook on."""
        return set()

    def requires(self) -> set[str]:
        """``GRPOBatch`` fields this instance needs under its config (e.g. ``{"old_log_probs"}``), so that
        an adapter fills them even where its trainer would not compute them. The default needs none."""
        return set()

    def needs(self) -> Needs:
        """What this instance needs under its config beyond what its hooks imply (a :class:`Needs`):
        loss-stage fields (``Needs(loss_fields={"row_data"})``), trainer features, dataset columns,
        trainer settings it cannot run with, methods it needs or excludes. The core adds the feature of
        every hook it implements and the fields of :meth:`requires`. The default declares nothing."""
        return Needs()

    def step_generator(self, step: int) -> torch.Generator:
        """A CPU ``torch.Generator`` for ``step``, identical on every rank and on a resumed run: seeded
        from the run's seed, the step and the method's name (feature ``step_generator``).

        Raises:
            RuntimeError: the adapter has not given the run's seed (``Composition.run_setup``).
        """
        context = getattr(self, "context", None)
        if context is None or context.seed is None:
            raise RuntimeError(
                f"method '{self.name}' asked for a step generator, but the adapter gave no run seed "
                "(declare Needs(features={'step_generator'}) so that such a trainer is refused at start-up)"
            )
        return torch.Generator().manual_seed(step_seed(context.seed, step, self.name))

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


def step_seed(seed: int, step: int, name: str) -> int:
    """A 63-bit seed from ``(seed, step, name)``, the same in every process (no Python ``hash``)."""
    text = f"{seed}:{step}:{name}".encode()
    return (zlib.crc32(text) << 31 | zlib.crc32(text[::-1]) >> 1) & (2**63 - 1)
