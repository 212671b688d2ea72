"""Composition: the methods a run enables, in order, and the calls that run their hooks.

A run names its methods as a list; each item is a name, ``{name: {config}}``, or a ``Method``
instance. The list order is the composition order for chained hooks. The built-in ``grpo`` method
(plain group-normalised advantages) is always present as the default ``compute_advantages``
provider; naming it in the list configures it.

Adapters call the ``run_*`` methods at the points of a trainer step documented in
``docs/lifecycle.md``; every output is checked against the hook's contract, and any exception a
method raises is re-raised naming the method, the hook and the distribution.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import pluggy
import torch

from grpo_plugins import hookspecs
from grpo_plugins.batch import GRPOBatch, LossInputs, PromptRound
from grpo_plugins.config import build_config
from grpo_plugins.errors import BatchError, CompositionError, GRPOPluginsError, PluginError
from grpo_plugins.method import Method
from grpo_plugins.padding import clean_batch_padding, clean_loss_padding
from grpo_plugins.registry import disabled_names, resolve
from grpo_plugins.validation import check_output, check_plain_state, validate_batch

logger = logging.getLogger("grpo_plugins")
BUILTIN_DISTRIBUTION = "grpo-plugins"
MethodSpec = str | Mapping[str, Any] | Method


@dataclass(frozen=True)
class EnabledMethod:
    """One enabled method: its instance and where it comes from."""

    name: str
    distribution: str
    version: str
    method: Method
    builtin: bool = False


@dataclass
class LossParts:
    """The loss-stage output: the policy's per-token loss and the added per-token terms, all ``(B, T)``."""

    policy: torch.Tensor
    terms: dict[str, torch.Tensor]


def parse_specs(specs: Iterable[MethodSpec] | None) -> list[tuple[str, Any]]:
    """Normalise a run's method list to ``[(name, config dict | Method instance)]``.

    Accepts ``"spo"``, ``{"spo": {...}}``, ``{"spo": None}`` or a ``Method`` instance per item.
    """
    parsed: list[tuple[str, Any]] = []
    for item in specs or ():
        if isinstance(item, Method):
            if not item.name:
                raise CompositionError(f"method object {type(item).__name__} has no name: set the class attribute `name`")
            parsed.append((item.name, item))
        elif isinstance(item, str):
            parsed.append((item, {}))
        elif isinstance(item, Mapping) and len(item) == 1:
            (name, config), = item.items()
            if config is not None and not isinstance(config, Mapping):
                raise CompositionError(f"method '{name}': its config must be a mapping, got {config!r}")
            parsed.append((str(name), dict(config or {})))
        else:
            raise CompositionError(
                f"cannot read method entry {item!r}: use a name, {{name: {{config}}}} or a Method instance"
            )
    names = [name for name, _ in parsed]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise CompositionError(f"method(s) {repeated} are enabled more than once")
    return parsed


def methods_from_config(config: Mapping[str, Any]) -> list[Any]:
    """The method list under a run config's ``grpo_plugins`` key (empty when absent)."""
    value = config.get("grpo_plugins") or []
    if not isinstance(value, (list, tuple)):
        raise CompositionError(f"'grpo_plugins' must be a list of methods, got {type(value).__name__}")
    return list(value)


class Composition:
    """The enabled methods of one run and the dispatch of every hook.

    Args:
        methods: the run's method list, in composition order (see :func:`parse_specs`).
        defaults: per-method config defaults an adapter derives from the trainer's own settings
            (e.g. ``{"grpo": {"epsilon": 1e-4}}``); the run's config overrides them.

    Raises:
        CompositionError: an unknown or doubly registered method, a bad config, a misspelt hook
            implementation, or two methods claiming a single-provider hook.
    """

    def __init__(self, methods: Iterable[MethodSpec] | None = None, defaults: Mapping[str, Mapping] | None = None):
        defaults = defaults or {}
        parsed = parse_specs(methods)
        if "grpo" not in {name for name, _ in parsed} and "grpo" not in disabled_names():
            parsed.append(("grpo", {}))
        self.enabled: list[EnabledMethod] = [self._instantiate(name, spec, defaults) for name, spec in parsed]
        self._manager = pluggy.PluginManager(hookspecs.PROJECT)
        self._manager.add_hookspecs(hookspecs)
        for entry in self.enabled:
            try:
                self._manager.register(entry.method, name=entry.name)
            except pluggy.PluginValidationError as error:
                raise CompositionError(f"method '{entry.name}' (distribution {entry.distribution}): {error}") from error
        self._check_pending()
        self._impls = self._collect_impls()
        self._check_single_providers()
        if not self._impls["compute_advantages"]:
            raise CompositionError(
                "GRPO_PLUGINS_DISABLED blocks the built-in 'grpo', the default advantage estimator, and no enabled "
                "method implements 'compute_advantages': enable one or unblock 'grpo'"
            )
        self._required = self._collect_required()
        self._trace = os.environ.get("GRPO_PLUGINS_TRACE", "") not in ("", "0")

    # ----------------------------------------------------------------- construction
    @staticmethod
    def _instantiate(name: str, spec: Any, defaults: Mapping[str, Mapping]) -> EnabledMethod:
        from grpo_plugins import __version__
        from grpo_plugins.default import GRPO

        if isinstance(spec, Method):
            if type(spec) is GRPO:  # the built-in default, configured by hand
                return EnabledMethod(name, BUILTIN_DISTRIBUTION, __version__, spec, builtin=True)
            module = type(spec).__module__.split(".")[0]
            return EnabledMethod(name, f"<object from {module}>", "", spec)
        if name == "grpo" and "grpo" in disabled_names():
            raise CompositionError("method 'grpo' is disabled by GRPO_PLUGINS_DISABLED")
        if name == "grpo":
            cls, distribution, version, builtin = GRPO, BUILTIN_DISTRIBUTION, __version__, True
        else:
            info = resolve(name)
            cls, distribution, version, builtin = info.load(), info.distribution, info.version, False
        values = {**dict(defaults.get(name, {})), **spec}
        config = build_config(cls.Config, values, name, distribution)
        try:
            method = cls(config)
        except Exception as error:
            raise CompositionError(
                f"method '{name}' (distribution {distribution}) failed to start: {type(error).__name__}: {error}"
            ) from error
        return EnabledMethod(name, distribution, version, method, builtin)

    def _entry(self, name: str) -> EnabledMethod:
        return next(e for e in self.enabled if e.name == name)

    def _check_pending(self) -> None:
        try:
            self._manager.check_pending()
        except pluggy.PluginValidationError as error:
            plugin_name = self._manager.get_name(error.plugin)
            entry = self._entry(plugin_name)
            raise CompositionError(
                f"method '{entry.name}' (distribution {entry.distribution}) implements an unknown hook: {error}. "
                f"Valid hooks: {', '.join(hookspecs.HOOK_NAMES)}"
            ) from error

    def _collect_impls(self) -> dict[str, list[tuple[EnabledMethod, Any]]]:
        order = {e.name: i for i, e in enumerate(self.enabled)}
        impls: dict[str, list[tuple[EnabledMethod, Any]]] = {}
        for hook in hookspecs.HOOK_NAMES:
            found = getattr(self._manager.hook, hook).get_hookimpls()
            ranked = sorted(found, key=lambda impl: order[impl.plugin_name])
            for impl in ranked:
                if impl.hookwrapper or impl.wrapper:
                    entry = self._entry(impl.plugin_name)
                    raise CompositionError(
                        f"method '{entry.name}' (distribution {entry.distribution}): hook '{hook}' is declared as a "
                        "pluggy wrapper; grpo_plugins calls plain hook implementations only (use @hookimpl)"
                    )
            entries = [(self._entry(impl.plugin_name), impl) for impl in ranked]
            impls[hook] = [(e, impl) for e, impl in entries if hook not in e.method.disabled_hooks()]
        return impls

    def _check_single_providers(self) -> None:
        for hook in hookspecs.SINGLE_PROVIDER_HOOKS:
            providers = [entry for entry, _ in self._impls[hook] if not entry.builtin]
            if len(providers) > 1:
                who = " and ".join(f"'{e.name}' (distribution {e.distribution})" for e in providers)
                raise CompositionError(
                    f"methods {who} both implement hook '{hook}', which takes a single provider; enable only one, "
                    "or switch the hook off in one method's config (`grpo-plugins show NAME` lists the switches)"
                )
            if providers:  # a user provider replaces the built-in default
                self._impls[hook] = [(e, impl) for e, impl in self._impls[hook] if not e.builtin]

    def _collect_required(self) -> frozenset[str]:
        known = {f.name for f in dataclasses.fields(GRPOBatch)}
        required: set[str] = set()
        for entry in self.enabled:
            fields = set(entry.method.requires())
            unknown = sorted(fields - known)
            if unknown:
                raise CompositionError(
                    f"method '{entry.name}' (distribution {entry.distribution}) requires unknown batch field(s) "
                    f"{unknown}; valid GRPOBatch fields: {', '.join(sorted(known))}"
                )
            required |= fields
        return frozenset(required)

    # ----------------------------------------------------------------- queries
    @property
    def names(self) -> list[str]:
        """Names of the enabled methods, in composition order (the built-in ``grpo`` included)."""
        return [e.name for e in self.enabled]

    @property
    def user_methods(self) -> list[EnabledMethod]:
        """The enabled methods other than the built-in default."""
        return [e for e in self.enabled if not e.builtin]

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
        """The ``GRPOBatch`` fields the enabled methods need (union of :meth:`Method.requires`); an
        adapter must fill each of them, computing it when its trainer would not."""
        return set(self._required)

    def requirers(self, field: str) -> list[str]:
        """Names of the enabled methods that require the batch field ``field``."""
        return [e.name for e in self.enabled if field in e.method.requires()]

    @property
    def has_loss_hooks(self) -> bool:
        """Whether the loss must be assembled by the adapter (a surrogate, gates or added terms)."""
        return any(self._impls[h] for h in ("policy_surrogate", "gate_loss", "loss_terms"))

    # ----------------------------------------------------------------- calling
    def _call(self, hook: str, entry: EnabledMethod, impl: Any, **kwargs: Any) -> Any:
        args = {name: kwargs[name] for name in impl.argnames}
        start = time.perf_counter() if self._trace else 0.0
        try:
            output = impl.function(**args)
        except PluginError:
            raise
        except Exception as error:
            raise PluginError(entry.name, hook, entry.distribution, f"raised {type(error).__name__}: {error}") from error
        if self._trace:
            elapsed = (time.perf_counter() - start) * 1e3
            print(
                f"[grpo_plugins] {hook} <- {entry.name} ({entry.distribution}): {_summary(output)} in {elapsed:.2f} ms",
                file=sys.stderr,
            )
        return output

    def _checked(self, hook: str, entry: EnabledMethod, impl: Any, expect: dict, **kwargs: Any) -> Any:
        output = self._call(hook, entry, impl, **kwargs)
        problem = check_output(output, **expect)
        if problem:
            raise PluginError(entry.name, hook, entry.distribution, problem)
        return output

    # ----------------------------------------------------------------- round planning
    def run_sample_prompts(self, round: PromptRound, generator: torch.Generator) -> torch.Tensor | None:
        """``(P',)`` dataset indices from the ``sample_prompts`` provider (``1 <= P' <= round.budget``),
        or None without one."""
        for entry, impl in self._impls["sample_prompts"]:
            output = self._call("sample_prompts", entry, impl, round=round, generator=generator)
            problem = None
            if isinstance(output, torch.Tensor) and (output.dim() != 1 or not 1 <= output.numel() <= round.budget):
                problem = (
                    f"returned shape {tuple(output.shape)}, expected (P',) with 1 <= P' <= the round's budget "
                    f"{round.budget}"
                )
            problem = problem or check_output(output, integer=True, low=0, high=round.dataset_size - 1)
            if problem:
                raise PluginError(entry.name, "sample_prompts", entry.distribution, problem)
            return output.long()
        return None

    def run_allocate_rollouts(self, round: PromptRound, prompt_ids: torch.Tensor) -> torch.Tensor | None:
        """``(P,)`` completions per prompt from the ``allocate_rollouts`` provider, or None without one."""
        for entry, impl in self._impls["allocate_rollouts"]:
            expect = dict(shape=tuple(prompt_ids.shape), integer=True, low=0, total=round.budget)
            return self._checked("allocate_rollouts", entry, impl, expect, round=round, prompt_ids=prompt_ids).long()
        return None

    def rollout_counts(self, round: PromptRound, prompt_ids: torch.Tensor) -> torch.Tensor:
        """``(P',)`` completions per prompt: the ``allocate_rollouts`` provider's counts, or without one
        the budget split evenly (``budget // P'`` each).

        Raises:
            CompositionError: no provider and the budget is not a multiple of ``P'``.
        """
        counts = self.run_allocate_rollouts(round, prompt_ids)
        if counts is not None:
            return counts
        num = int(prompt_ids.numel())
        if num < 1 or round.budget % num:
            raise CompositionError(
                f"the round has {num} prompts (from {self.providers('sample_prompts') or 'the trainer'}) and a budget "
                f"of {round.budget} completions, which does not split evenly; return a number of prompts that divides "
                "the budget or enable a method that implements 'allocate_rollouts'"
            )
        return torch.full((num,), round.budget // num, dtype=torch.long, device=prompt_ids.device)

    def run_augment_prompts(
        self, round: PromptRound, prompt_ids: torch.Tensor, prompts: list, rows: list[dict]
    ) -> list:
        """The prompts after every ``augment_prompts`` method, in order."""
        for entry, impl in self._impls["augment_prompts"]:
            out = self._call("augment_prompts", entry, impl, round=round, prompt_ids=prompt_ids, prompts=prompts, rows=rows)
            if not isinstance(out, list) or len(out) != len(prompts):
                raise PluginError(entry.name, "augment_prompts", entry.distribution,
                                  f"must return a list of {len(prompts)} prompts, got {type(out).__name__} "
                                  f"of length {len(out) if hasattr(out, '__len__') else '?'}")
            prompts = out
        return prompts

    # ----------------------------------------------------------------- advantage stage
    def run_advantage_stage(self, batch: GRPOBatch) -> GRPOBatch:
        """Run ``shape_rewards`` -> ``compute_advantages`` -> ``adjust_advantages`` -> ``mask_tokens``.

        Fills ``batch.rewards`` (shaped), ``batch.advantages`` ``(N,)`` or ``(N, T)`` and
        ``batch.token_weights`` ``(N, T)`` (None when no method masks tokens), and returns the batch.

        Raises:
            BatchError: the batch is malformed, or the methods' masks drop every token.
            PluginError: a method raised or broke its hook's contract.
        """
        validate_batch(batch)
        clean_batch_padding(batch)
        n = batch.num_completions
        tokens = None if batch.completion_mask is None else tuple(batch.completion_mask.shape)
        for entry, impl in self._impls["shape_rewards"]:
            batch.rewards = self._checked("shape_rewards", entry, impl, dict(shape=(n,)), batch=batch, rewards=batch.rewards)
        adv_shapes = [(n,)] + ([tokens] if tokens else [])
        for entry, impl in self._impls["compute_advantages"]:
            batch.advantages = self._checked("compute_advantages", entry, impl, dict(shape=adv_shapes), batch=batch)
        for entry, impl in self._impls["adjust_advantages"]:
            batch.advantages = self._checked(
                "adjust_advantages", entry, impl, dict(shape=adv_shapes), batch=batch, advantages=batch.advantages
            )
        batch.token_weights = None
        for entry, impl in self._impls["mask_tokens"]:
            if tokens is None:
                raise BatchError(f"method '{entry.name}' masks tokens but the adapter gave no completion tokens")
            weights = self._checked("mask_tokens", entry, impl, dict(shape=tokens, low=0), batch=batch)
            batch.token_weights = weights if batch.token_weights is None else batch.token_weights * weights
        if batch.token_weights is not None and not bool((batch.token_weights * batch.token_mask).gt(0).any()):
            raise BatchError(
                f"the token masks of {self.providers('mask_tokens')} drop every token of the batch; nothing is left to learn from"
            )
        for key, value in batch.row_data.items():
            if not isinstance(value, torch.Tensor) or value.shape[:1] != (n,):
                raise BatchError(f"row_data['{key}'] must be a tensor with first dimension N={n}")
        return batch

    # ----------------------------------------------------------------- loss stage
    def run_loss_stage(self, inputs: LossInputs, trainer_surrogate: Callable[[LossInputs], torch.Tensor]) -> LossParts:
        """The per-token policy loss (surrogate x gates) and the added terms, all ``(B, T)``.

        ``trainer_surrogate`` computes the trainer's own per-token loss; it is used when no method
        provides ``policy_surrogate``.
        """
        shape = tuple(inputs.log_probs.shape)
        inputs = clean_loss_padding(inputs)
        policy = None
        for entry, impl in self._impls["policy_surrogate"]:
            policy = self._checked("policy_surrogate", entry, impl, dict(shape=shape), inputs=inputs)
        if policy is None:
            policy = trainer_surrogate(inputs)
        for entry, impl in self._impls["gate_loss"]:
            gate = self._checked("gate_loss", entry, impl, dict(shape=[shape, (shape[0], 1)], low=0), inputs=inputs)
            policy = policy * gate
        terms: dict[str, torch.Tensor] = {}
        for entry, impl in self._impls["loss_terms"]:
            out = self._call("loss_terms", entry, impl, inputs=inputs)
            if not isinstance(out, Mapping):
                raise PluginError(entry.name, "loss_terms", entry.distribution, "must return a dict of (B, T) tensors")
            for key, value in out.items():
                problem = check_output(value, shape=shape)
                if problem:
                    raise PluginError(entry.name, "loss_terms", entry.distribution, f"term '{key}': {problem}")
                terms[f"{entry.name}/{key}"] = value
        return LossParts(policy=policy, terms=terms)

    # ----------------------------------------------------------------- after the step
    def run_observe(self, batch: GRPOBatch, step: int) -> None:
        """Let every ``observe`` method update its state from the finished step."""
        for entry, impl in self._impls["observe"]:
            self._call("observe", entry, impl, batch=batch, step=step)

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
        state = {}
        for entry in self.enabled:
            method_state = entry.method.state_dict()
            if method_state:
                problem = check_plain_state(method_state)
                if problem:
                    raise PluginError(entry.name, "state_dict", entry.distribution, problem)
                state[entry.name] = method_state
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output.

        State of a method this run does not enable is an error; a method the checkpoint holds no
        state for keeps its fresh state (with a warning when it has state to lose).
        """
        unknown = sorted(set(state) - set(self.names))
        if unknown:
            raise CompositionError(f"checkpoint holds state of method(s) {unknown} that this run does not enable")
        for entry in self.enabled:
            if entry.name not in state:
                if entry.method.state_dict():
                    logger.warning("checkpoint holds no state of method '%s': it starts fresh", entry.name)
                continue
            try:
                entry.method.load_state_dict(dict(state[entry.name]))
            except GRPOPluginsError:
                raise
            except Exception as error:
                raise PluginError(entry.name, "load_state_dict", entry.distribution, f"{type(error).__name__}: {error}") from error

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` to ``path`` (a torch file loadable with ``weights_only=True``)."""
        torch.save(self.state_dict(), path)

    def load(self, path: str | os.PathLike) -> None:
        """Restore the state written by :meth:`save` (no pickled objects are loaded)."""
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def describe(self) -> str:
        """One line per enabled method: name, distribution and the hooks it implements."""
        lines = []
        for entry in self.enabled:
            hooks = [h for h in hookspecs.HOOK_NAMES if entry.name in self.providers(h)]
            lines.append(f"{entry.name} ({entry.distribution} {entry.version}): {', '.join(hooks) or 'no active hook'}")
        return "\n".join(lines)


def _summary(output: Any) -> str:
    """A short description of a hook's output for the trace."""
    if isinstance(output, torch.Tensor):
        return f"tensor {tuple(output.shape)} {str(output.dtype).replace('torch.', '')}"
    if isinstance(output, Mapping):
        return "{" + ", ".join(f"{k}: {_summary(v)}" for k, v in output.items()) + "}"
    if isinstance(output, list):
        return f"list of {len(output)}"
    return type(output).__name__


def hooks_of(cls: type) -> list[str]:
    """Names of the hooks a method class implements (in hook-spec order)."""
    marker = f"{hookspecs.PROJECT}_impl"
    return [h for h in hookspecs.HOOK_NAMES if hasattr(getattr(cls, h, None), marker)]
