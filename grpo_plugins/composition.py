"""Composition: the methods a run enables, in order, and the calls adapters make to run their hooks.

A run names its methods as a list; each item is a name, ``{name: {config}}``, or a ``Method``
instance (a single name alone is a list of one). The list order is the composition order. The
built-in ``grpo`` method (plain group-normalised advantages) is always present as the default
``compute_advantages`` provider; naming it in the list configures it.

:class:`Composition` is the stable facade the adapters call; the work lives in short modules:

- building the run from its method list: :mod:`grpo_plugins.build`;
- what the core does with each hook's output: the table :mod:`grpo_plugins.hooktable`, run by one
  dispatcher per combine mode in :mod:`grpo_plugins.dispatch`;
- what each ``run_*`` call does: :mod:`grpo_plugins.stages`;
- what methods need and trainers provide: :mod:`grpo_plugins.needs`;
- method state and checkpoint files: :mod:`grpo_plugins.state`.

Adapters call the ``run_*`` methods at the points of a trainer step documented in
``docs/lifecycle.md``; every output is checked against its hook's contract, and any exception a
method raises is re-raised naming the method, the hook and the distribution.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping

import torch

from grpo_plugins import hookspecs, stages
from grpo_plugins import state as checkpoints
from grpo_plugins.batch import GRPOBatch, LossInputs, PromptRound, RunContext
from grpo_plugins.build import (  # noqa: F401  (re-exported: the names adapters and tools import from here)
    BUILTIN_DISTRIBUTION,
    EnabledMethod,
    MethodSpec,
    collect_impls,
    collect_required,
    enable,
    hooks_of,
    methods_from_config,
    parse_specs,
    register,
)
from grpo_plugins.dispatch import Caller
from grpo_plugins.dispatch import summary as _summary  # noqa: F401
from grpo_plugins.errors import CompositionError
from grpo_plugins.method import Method
from grpo_plugins.needs import Needs, TrainerCapabilities, capability_problems, check_capabilities, needs_of, relation_problems
from grpo_plugins.stages import LossParts  # noqa: F401
from grpo_plugins.validation import check_output, validate_batch  # noqa: F401  (kept importable here)

LOSS_HOOKS = ("policy_surrogate", "gate_loss", "loss_terms", "loss_objectives")
"""The loss hooks that make an adapter assemble the loss (``has_loss_hooks``)."""


class Composition:
    """The enabled methods of one run and the dispatch of every hook.

    Args:
        methods: the run's method list, in composition order (see :func:`parse_specs`).
        defaults: per-method config defaults an adapter derives from the trainer's own settings
            (e.g. ``{"grpo": {"epsilon": 1e-4}}``); the run's config overrides them.

    Raises:
        CompositionError: an unknown or doubly registered method, a bad config, a misspelt hook
            implementation, a pluggy ordering option, two methods claiming a single-provider hook, an
            unknown declared need, or a method another one excludes or needs.
    """

    def __init__(self, methods: Iterable[MethodSpec] | MethodSpec | None = None, defaults: Mapping[str, Mapping] | None = None):
        self.enabled: list[EnabledMethod] = enable(methods, defaults or {})
        self._manager = register(self.enabled)
        self._impls = collect_impls(self._manager, self.enabled)
        self._required = collect_required(self.enabled)
        self._needs = {e.name: needs_of(e, [h for h in hookspecs.HOOK_NAMES if e.name in self.providers(h)]) for e in self.enabled}
        problems = relation_problems(self._needs, self.active_names(),
                                     {h: self.providers(h) for h in hookspecs.HOOK_NAMES})
        if problems:
            raise CompositionError("the run's methods cannot be composed: " + "; ".join(problems))
        self._trace = os.environ.get("GRPO_PLUGINS_TRACE", "") not in ("", "0")
        self._caller = Caller(self._trace)

    # ----------------------------------------------------------------- queries
    @property
    def names(self) -> list[str]:
        """Names of the enabled methods, in composition order (the built-in ``grpo`` included)."""
        return [e.name for e in self.enabled]

    @property
    def user_methods(self) -> list[EnabledMethod]:
        """The enabled methods other than the built-in default."""
        return [e for e in self.enabled if not e.builtin]

    def active_names(self) -> list[str]:
        """The user methods, and the built-in ``grpo`` when it runs a hook (it estimates advantages)."""
        return [e.name for e in self.enabled if not e.builtin or any(e.name in self.providers(h) for h in hookspecs.HOOK_NAMES)]

    def method(self, name: str) -> Method:
        """The enabled method instance called ``name``."""
        return self._entry(name).method

    def implements(self, hook: str) -> bool:
        """Whether any enabled method (the built-in default included) implements ``hook``."""
        return bool(self._impls[hook])

    def providers(self, hook: str) -> list[str]:
        """Names of the enabled methods implementing ``hook``, in the order they run."""
        return [entry.name for entry, _ in self._impls[hook]]

    def required_fields(self) -> set[str]:
        """The ``GRPOBatch`` fields the enabled methods need (union of :meth:`Method.requires` and
        ``Method.needs().batch_fields``); an adapter must fill each of them, computing it when its
        trainer would not."""
        return set(self._required)

    def requirers(self, field: str) -> list[str]:
        """Names of the enabled methods that require the batch field ``field``."""
        return [e.name for e in self.enabled if field in self._needs[e.name].batch_fields]

    def temperatures(self) -> tuple[float, ...]:
        """The temperatures of ``old_log_probs_at`` the enabled methods read (``Needs.temperatures``),
        sorted; empty when no method reads the field."""
        return tuple(sorted(set().union(*(self._needs[name].temperatures for name in self.requirers("old_log_probs_at")))))

    @property
    def has_loss_hooks(self) -> bool:
        """Whether the loss must be assembled by the adapter (a surrogate, gates or added terms)."""
        return any(self._impls[h] for h in LOSS_HOOKS)

    def needs(self) -> dict[str, Needs]:
        """``{method: Needs}`` of every enabled method: what its hooks imply plus what it declares."""
        return dict(self._needs)

    def needers(self, kind: str, name: str) -> list[str]:
        """Methods whose needs of ``kind`` (``"features"``, ``"loss_fields"``, ``"batch_fields"``,
        ``"columns"``, ...) include ``name``."""
        return [method for method, needs in self._needs.items() if name in getattr(needs, kind)]

    def capability_problems(self, capabilities: TrainerCapabilities) -> list[str]:
        """Every reason the enabled methods cannot run on the trainer ``capabilities`` describes."""
        return capability_problems(self, capabilities)

    def check_capabilities(self, capabilities: TrainerCapabilities) -> None:
        """Raise one :class:`CompositionError` listing every problem of :meth:`capability_problems`."""
        check_capabilities(self, capabilities)

    def describe(self) -> str:
        """One line per enabled method: name, distribution and the hooks it implements."""
        lines = []
        for entry in self.enabled:
            hooks = [h for h in hookspecs.HOOK_NAMES if entry.name in self.providers(h)]
            lines.append(f"{entry.name} ({entry.distribution} {entry.version}): {', '.join(hooks) or 'no active hook'}")
        return "\n".join(lines)

    def _entry(self, name: str) -> EnabledMethod:
        return next(e for e in self.enabled if e.name == name)

    # ----------------------------------------------------------------- start (designed)
    def run_setup(self, context: RunContext) -> None:
        """Give every method the run's context (``method.context``: seed, tokenizer, settings) and run
        the ``setup`` hooks. Designed: no adapter calls it yet (feature ``method_setup``)."""
        stages.setup(self._impls, self._caller, self.enabled, context)

    # ----------------------------------------------------------------- round planning
    def run_sample_prompts(self, round: PromptRound, generator: torch.Generator) -> torch.Tensor | None:
        """``(P',)`` dataset indices from the ``sample_prompts`` provider (``1 <= P' <= round.budget``),
        or None without one."""
        return stages.sample_prompts(self._impls, self._caller, round, generator)

    def run_allocate_rollouts(self, round: PromptRound, prompt_ids: torch.Tensor) -> torch.Tensor | None:
        """``(P,)`` completions per prompt from the ``allocate_rollouts`` provider, or None without one."""
        return stages.allocate_rollouts(self._impls, self._caller, round, prompt_ids)

    def rollout_counts(self, round: PromptRound, prompt_ids: torch.Tensor) -> torch.Tensor:
        """``(P',)`` completions per prompt: the ``allocate_rollouts`` provider's counts, or without one
        the budget split evenly (``budget // P'`` each).

        Raises:
            CompositionError: no provider and the budget is not a multiple of ``P'``.
        """
        return stages.rollout_counts(self._impls, self._caller, round, prompt_ids)

    def run_augment_prompts(self, round: PromptRound, prompt_ids: torch.Tensor, prompts: list, rows: list[dict]) -> list:
        """The prompts after every ``augment_prompts`` method, in order."""
        return stages.augment_prompts(self._impls, self._caller, round, prompt_ids, prompts, rows)

    # ----------------------------------------------------------------- batch editing (designed)
    def run_keep_rows(self, batch: GRPOBatch) -> torch.Tensor | None:
        """``(N,)`` bool rows every ``keep_rows`` method keeps, or None. Designed (``batch_editing``)."""
        return stages.keep_rows(self._impls, self._caller, batch)

    def run_inject_rows(self, batch: GRPOBatch) -> list[dict]:
        """Rows the ``inject_rows`` methods add, in order. Designed (``row_injection``)."""
        return stages.inject_rows(self._impls, self._caller, batch)

    # ----------------------------------------------------------------- advantage stage
    def run_advantage_stage(self, batch: GRPOBatch) -> GRPOBatch:
        """Run ``shape_rewards`` -> ``compute_advantages`` -> ``adjust_advantages`` -> ``mask_tokens``.

        Fills ``batch.rewards`` (shaped), ``batch.advantages`` ``(N,)`` or ``(N, T)`` and
        ``batch.token_weights`` ``(N, T)`` (None when no method masks tokens), and returns the batch.

        Raises:
            BatchError: the batch is malformed, or the methods' masks drop every token.
            PluginError: a method raised or broke its hook's contract.
        """
        return stages.advantage_stage(self._impls, self._caller, batch)

    # ----------------------------------------------------------------- loss stage
    def run_loss_stage(self, inputs: LossInputs, trainer_surrogate: Callable[[LossInputs], torch.Tensor]) -> LossParts:
        """The per-token policy loss (surrogate x gates) and the added terms, all ``(B, T)``.

        ``trainer_surrogate`` computes the trainer's own per-token loss; it is used when no method
        provides ``policy_surrogate``.
        """
        return stages.loss_stage(self._impls, self._caller, inputs, trainer_surrogate)

    # ----------------------------------------------------------------- optimiser step and after
    def run_scale_update(self, batch: GRPOBatch, step: int) -> torch.Tensor | None:
        """``()`` factor for the step's update, or None. Designed (``update_control``)."""
        return stages.scale_update(self._impls, self._caller, batch, step)

    def run_observe(self, batch: GRPOBatch, step: int) -> None:
        """Let every ``observe`` method update its state from the finished step."""
        stages.observe(self._impls, self._caller, batch, step)

    def pop_metrics(self) -> dict[str, float]:
        """Every method's metrics since the last call, keyed ``plugins/<method>/<key>``."""
        return {
            f"plugins/{entry.name}/{key}": value
            for entry in self.enabled
            for key, value in entry.method.pop_metrics().items()
        }

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """``{method name: state}`` of every method with state; tensors and plain values only."""
        return checkpoints.state_dict(self.enabled)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output.

        State of a method this run does not enable is an error; a method the checkpoint holds no
        state for keeps its fresh state (with a warning when it has state to lose).
        """
        checkpoints.load_state_dict(self.enabled, state)

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` to ``path`` (a torch file loadable with ``weights_only=True``)."""
        checkpoints.save(self.enabled, path)

    def load(self, path: str | os.PathLike) -> None:
        """Restore the state written by :meth:`save` (no pickled objects are loaded)."""
        checkpoints.load(self.enabled, path)
