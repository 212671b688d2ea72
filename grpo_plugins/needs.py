"""What a method needs and what a trainer provides, and the one comparison of the two.

A method declares its needs with :meth:`grpo_plugins.Method.needs` (a :class:`Needs`); the core adds
what follows from the hooks it implements (each hook's ``feature`` in the hook table), from
:meth:`~grpo_plugins.Method.requires` and from keeping state. An adapter describes what it provides
for the trainer settings of a run with a :class:`TrainerCapabilities`. Before the first step the
adapter calls :func:`check_capabilities` (or :meth:`grpo_plugins.Composition.check_capabilities`),
which refuses the pairing with **every** problem at once, each naming the method, the need and the
trainer setting responsible::

    capabilities = (
        TrainerCapabilities.standard("TRL GRPOTrainer", settings={"loss_aggregation": "token_mean"},
                                     setting_names={"loss_aggregation": "loss_type"})
        .without("variable_budgets", because="vllm_mode='server'")
        .with_columns(dataset.column_names)
    )
    composition.check_capabilities(capabilities)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import torch

from grpo_plugins.batch import GRPOBatch, LossInputs
from grpo_plugins.config import Range
from grpo_plugins.errors import CompositionError
from grpo_plugins.hooktable import TABLE
from grpo_plugins.hookspecs import HOOK_NAMES
from grpo_plugins.probe import ProbeRequest

if TYPE_CHECKING:
    from grpo_plugins.composition import Composition

FEATURES: Mapping[str, str] = {
    # provided by the adapters today (at their default settings)
    "prompt_selection": "choosing the prompts of each round (hook sample_prompts)",
    "variable_budgets": "a different number of completions per prompt (hook allocate_rollouts)",
    "prompt_rewriting": "rewriting prompts before generation (hook augment_prompts)",
    "advantage_hooks": "replacing or changing the trainer's rewards and advantages (hooks shape_rewards, "
    "compute_advantages, adjust_advantages)",
    "token_weights": "per-token weights on the policy loss (hook mask_tokens)",
    "token_loss": "a per-token loss assembled from the method's hooks (policy_surrogate, gate_loss, loss_terms)",
    "after_step": "a call after each optimiser step (hook observe)",
    "method_state": "method state saved with every checkpoint and restored on resume",
    # the designed surface (docs/design.md): each adapter says which it provides (grpo-plugins list --json)
    "method_setup": "a call before the first step with the tokenizer and trainer settings (hook setup)",
    "step_generator": "a seeded per-step generator identical on every rank (Method.step_generator; needs the "
    "run's seed from setup)",
    "batch_editing": "dropping rows after scoring and refilling the batch with new prompts (hook keep_rows)",
    "row_injection": "adding rows the policy did not generate, e.g. demonstrations (hook inject_rows)",
    "loss_normalisers": "loss terms reduced with their own normaliser (hook loss_objectives)",
    "whole_groups": "every completion of a group in the same loss micro-batch (LossInputs.group_index)",
    "update_control": "scaling the optimiser step's update (hook scale_update)",
    "old_policy_probe": "the old policy's hidden states and logits over the batch at the advantage stage, streamed in "
    "chunks (Needs.probes, GRPOBatch.probes)",
    "update_preview": "the optimiser's coming update of the LM head: its weight, optimiser state and learning rate "
    "(ProbeRequest.update_preview, GRPOBatch.update_preview)",
}
"""Trainer features a method may need, with what each means."""

PROVIDED_FEATURES: frozenset[str] = frozenset(
    ("prompt_selection", "variable_budgets", "prompt_rewriting", "advantage_hooks", "token_weights",
     "token_loss", "after_step", "method_state")
)
"""Features both adapters provide today at their default settings (:meth:`TrainerCapabilities.standard`)."""

DESIGNED_BATCH_FIELDS: frozenset[str] = frozenset(("old_entropies", "old_log_probs_at", "gradient_statistics",
                                                   "probes", "update_preview", "steps"))
DESIGNED_LOSS_FIELDS: frozenset[str] = frozenset(("group_index",))
"""Fields outside the standard set: an adapter fills each only where its capabilities add it (e.g. ``probes``
with the old-policy probe; ``gradient_statistics`` and ``update_preview`` on TRL only)."""

BATCH_FIELDS: frozenset[str] = frozenset(f.name for f in dataclasses.fields(GRPOBatch))
LOSS_FIELDS: frozenset[str] = frozenset(f.name for f in dataclasses.fields(LossInputs))

SETTINGS: Mapping[str, str] = {
    "loss_aggregation": "how per-token losses become the loss: 'token_mean' (over every token of the batch), "
    "'sequence_mean' (each sequence's token mean, then the mean over sequences), 'sequence_sum' (token sums "
    "divided by a constant, Dr. GRPO)",
    "importance_sampling": "the level of the importance ratio: 'token' or 'sequence'",
    "on_policy": "True when each generation batch feeds exactly one optimiser step (old policy = current policy)",
    "group_size": "completions per prompt the trainer generates by default",
    "reference_model": "True when the trainer runs a reference policy",
}
"""Trainer-neutral settings a method may restrict (``Needs.settings``), reported by the adapter."""


def _names(value: Iterable[str] | str | None) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        return frozenset((value,))
    return frozenset(value)


@dataclass(frozen=True)
class Needs:
    """What a method needs from the trainer, the data and the other enabled methods.

    Every field accepts any iterable of names (a set, list or tuple) and is stored as a frozenset.

    Attributes:
        batch_fields: ``GRPOBatch`` fields at the advantage stage (adds to :meth:`Method.requires`).
        loss_fields: ``LossInputs`` fields in the loss stage that an adapter may leave empty:
            ``row_data``, ``entropies``, ``ref_log_probs``, ``step``, ``group_index``.
        features: trainer features (:data:`FEATURES`) beyond those its hooks already imply.
        columns: dataset columns every row must have.
        settings: ``{setting: allowed}`` restrictions on trainer-neutral settings (:data:`SETTINGS`);
            ``allowed`` is a tuple of values or a :class:`~grpo_plugins.Range`.
        methods: other methods that must be enabled with it (checked when the run is built).
        excludes: methods it cannot run with (an active one is refused when the run is built; the
            built-in ``grpo`` is active when it estimates the advantages).
        excludes_hooks: hooks whose output the method makes meaningless (e.g. ``mask_tokens`` and
            ``gate_loss`` when its objective replaces the policy loss they scale): any other enabled
            method implementing one is refused when the run is built.
        runs_first: chain hooks whose chained input the method ignores (e.g. a ``shape_rewards`` that
            rebuilds the reward from ``reward_components``): another method implementing one listed
            before it is refused when the run is built (its output would be lost).
        temperatures: temperatures of ``batch.old_log_probs_at`` it reads.
        probes: ``{name: ProbeRequest}`` old-policy probes it reads as ``batch.probes[name]``
            (:mod:`grpo_plugins.probe`); they imply the feature ``old_policy_probe``, and ``update_preview``
            when a request sets it.
        why: ``{need: reason}``, quoted in the error messages.
    """

    batch_fields: frozenset[str] = frozenset()
    loss_fields: frozenset[str] = frozenset()
    features: frozenset[str] = frozenset()
    columns: frozenset[str] = frozenset()
    settings: Mapping[str, Any] = field(default_factory=dict)
    methods: frozenset[str] = frozenset()
    excludes: frozenset[str] = frozenset()
    excludes_hooks: frozenset[str] = frozenset()
    runs_first: frozenset[str] = frozenset()
    temperatures: frozenset[float] = frozenset()
    probes: Mapping[str, ProbeRequest] = field(default_factory=dict)
    why: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "probes", dict(self.probes))
        implied = {"old_policy_probe"} if self.probes else set()
        if any(isinstance(r, ProbeRequest) and r.update_preview for r in self.probes.values()):
            implied.add("update_preview")
        object.__setattr__(self, "features", _names(self.features) | implied)
        for name in ("batch_fields", "loss_fields", "features", "columns", "methods", "excludes", "excludes_hooks",
                     "runs_first"):
            object.__setattr__(self, name, _names(getattr(self, name)))
        object.__setattr__(self, "temperatures", frozenset(float(t) for t in self.temperatures))
        object.__setattr__(self, "settings", dict(self.settings))
        object.__setattr__(self, "why", dict(self.why))

    def __or__(self, other: "Needs") -> "Needs":
        """The union of two declarations (settings: ``other`` wins for a setting both restrict)."""
        return Needs(
            batch_fields=self.batch_fields | other.batch_fields,
            loss_fields=self.loss_fields | other.loss_fields,
            features=self.features | other.features,
            columns=self.columns | other.columns,
            settings={**self.settings, **other.settings},
            methods=self.methods | other.methods,
            excludes=self.excludes | other.excludes,
            excludes_hooks=self.excludes_hooks | other.excludes_hooks,
            runs_first=self.runs_first | other.runs_first,
            temperatures=self.temperatures | other.temperatures,
            probes={**self.probes, **other.probes},
            why={**self.why, **other.why},
        )

    def unknown(self) -> list[str]:
        """Names this declaration uses that the core does not know (typos), as messages."""
        problems = []
        for label, names, known in (
            ("batch field", self.batch_fields, BATCH_FIELDS),
            ("loss field", self.loss_fields, LOSS_FIELDS),
            ("feature", self.features, FEATURES),
            ("setting", set(self.settings), SETTINGS),
            ("hook", self.excludes_hooks | self.runs_first, HOOK_NAMES),
        ):
            for name in sorted(set(names) - set(known)):
                problems.append(f"unknown {label} '{name}' (known: {', '.join(sorted(known))})")
        for name, request in self.probes.items():
            if not isinstance(request, ProbeRequest):
                problems.append(f"probe '{name}' must be a grpo_plugins.probe.ProbeRequest, got {type(request).__name__}")
            else:
                problems.extend(f"probe '{name}': {text}" for text in request.problems())
        for name, allowed in self.settings.items():
            if not isinstance(allowed, (tuple, Range)):
                problems.append(f"setting '{name}' must be restricted to a tuple of values or a Range, got {allowed!r}")
        return problems

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form (sorted lists; settings as text); empty fields left out."""
        out: dict[str, Any] = {}
        for name in ("batch_fields", "loss_fields", "features", "columns", "methods", "excludes", "excludes_hooks",
                     "runs_first"):
            if getattr(self, name):
                out[name] = sorted(getattr(self, name))
        if self.temperatures:
            out["temperatures"] = sorted(self.temperatures)
        if self.probes:
            out["probes"] = {name: request.text() for name, request in sorted(self.probes.items())}
        if self.settings:
            out["settings"] = {k: _allowed_text(v) for k, v in sorted(self.settings.items())}
        return out

    def lines(self) -> list[str]:
        """One readable line per kind of need (for ``grpo-plugins show``)."""
        labels = {"batch_fields": "batch fields", "loss_fields": "loss fields", "features": "trainer features",
                  "columns": "dataset columns", "methods": "methods", "excludes": "excludes methods",
                  "excludes_hooks": "excludes other methods implementing", "runs_first": "must run first in hooks",
                  "temperatures": "temperatures", "probes": "old-policy probes", "settings": "settings"}
        out = []
        for key, value in self.as_dict().items():
            text = ", ".join(f"{k} in {v}" for k, v in value.items()) if isinstance(value, dict) else ", ".join(map(str, value))
            out.append(f"{labels[key]}: {text}")
        return out


def _join(reason: str | None, more: str) -> str:
    return more if not reason or more in reason else f"{reason}; {more}"


def _allowed_text(allowed: Any) -> str:
    if isinstance(allowed, Range):
        return str(allowed)
    return " | ".join(repr(a) for a in allowed) if isinstance(allowed, tuple) else repr(allowed)


@dataclass(frozen=True)
class TrainerCapabilities:
    """What an adapter provides for the trainer settings of one run.

    Attributes:
        trainer: the adapter's name, as error messages show it (``"TRL GRPOTrainer"``).
        features: trainer features (:data:`FEATURES`) it provides.
        batch_fields: ``GRPOBatch`` fields it fills (or computes) at the advantage stage.
        loss_fields: ``LossInputs`` fields it fills in the loss stage.
        columns: the training dataset's columns; None when unknown (then not checked).
        settings: values of the trainer-neutral settings (:data:`SETTINGS`) in this run.
        setting_names: how the trainer spells each neutral setting (``{"loss_aggregation": "loss_type"}``).
        why_not: for a feature or field it does not provide: the trainer setting responsible and what to
            change (``{"variable_budgets": "vllm_mode='server' (use vllm_mode='colocate')"}``).
    """

    trainer: str
    features: frozenset[str] = frozenset()
    batch_fields: frozenset[str] = frozenset()
    loss_fields: frozenset[str] = frozenset()
    columns: frozenset[str] | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    setting_names: Mapping[str, str] = field(default_factory=dict)
    why_not: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("features", "batch_fields", "loss_fields"):
            object.__setattr__(self, name, _names(getattr(self, name)))
        if self.columns is not None:
            object.__setattr__(self, "columns", _names(self.columns))
        for name in ("settings", "setting_names", "why_not"):
            object.__setattr__(self, name, dict(getattr(self, name)))

    @classmethod
    def standard(cls, trainer: str, **fields: Any) -> "TrainerCapabilities":
        """What both adapters provide today at their default settings: :data:`PROVIDED_FEATURES`, every
        ``GRPOBatch`` and ``LossInputs`` field but the designed ones. Narrow it with :meth:`without`."""
        base = dict(
            features=PROVIDED_FEATURES,
            batch_fields=BATCH_FIELDS - DESIGNED_BATCH_FIELDS,
            loss_fields=LOSS_FIELDS - DESIGNED_LOSS_FIELDS,
        )
        return cls(trainer, **{**base, **fields})

    def without(self, *names: str, because: str) -> "TrainerCapabilities":
        """A copy that no longer provides the named features or fields (batch and loss), each for the
        reason ``because`` (the trainer setting responsible). Reasons accumulate: a feature two settings
        take away names both."""
        unknown = sorted(set(names) - set(FEATURES) - BATCH_FIELDS - LOSS_FIELDS)
        if unknown:
            raise ValueError(f"unknown feature(s) or field(s) {unknown}")
        drop = set(names)
        return dataclasses.replace(
            self,
            features=self.features - drop,
            batch_fields=self.batch_fields - drop,
            loss_fields=self.loss_fields - drop,
            why_not={**self.why_not, **{name: _join(self.why_not.get(name), because) for name in names}},
        )

    def with_features(self, *names: str) -> "TrainerCapabilities":
        """A copy that also provides the named features (an adapter that implements a designed one)."""
        unknown = sorted(set(names) - set(FEATURES))
        if unknown:
            raise ValueError(f"unknown feature(s) {unknown}")
        return dataclasses.replace(self, features=self.features | set(names))

    def with_columns(self, columns: Iterable[str] | None) -> "TrainerCapabilities":
        """A copy that knows the training dataset's columns (None: unknown, not checked)."""
        return dataclasses.replace(self, columns=None if columns is None else _names(columns))

    def with_settings(self, **settings: Any) -> "TrainerCapabilities":
        """A copy with these neutral setting values."""
        return dataclasses.replace(self, settings={**self.settings, **settings})


# ----------------------------------------------------------------------------- a method's needs
def implied_needs(entry: Any, active_hooks: Iterable[str]) -> Needs:
    """What an enabled method needs because of what it does: the feature of every hook it runs (the
    built-in ``grpo`` excepted: it is the trainer's own estimator), the batch fields of
    :meth:`Method.requires`, and ``method_state`` when it keeps state."""
    from grpo_plugins.method import Method

    method = entry.method
    features = set()
    if not entry.builtin:
        rows = {hook.name: hook for hook in TABLE}
        features = {rows[hook].feature for hook in active_hooks}
        if type(method).state_dict is not Method.state_dict:
            features.add("method_state")
    return Needs(batch_fields=method.requires(), features=features)


def needs_of(entry: Any, active_hooks: Iterable[str]) -> Needs:
    """Everything an enabled method needs: :func:`implied_needs` and its own :meth:`Method.needs`.

    Raises:
        CompositionError: the declaration names an unknown field, feature or setting.
    """
    if not callable(getattr(entry.method, "needs", None)):
        raise CompositionError(
            f"method '{entry.name}' (distribution {entry.distribution}): its attribute 'needs' shadows "
            "Method.needs(), which declares what the method needs; rename the attribute"
        )
    declared = entry.method.needs()
    if not isinstance(declared, Needs):
        raise CompositionError(
            f"method '{entry.name}' (distribution {entry.distribution}): needs() must return a grpo_plugins.Needs, "
            f"got {type(declared).__name__}"
        )
    unknown = declared.unknown()
    if unknown:
        raise CompositionError(f"method '{entry.name}' (distribution {entry.distribution}) declares " + "; ".join(unknown))
    return implied_needs(entry, active_hooks) | declared


def class_needs(cls: type) -> Needs | None:
    """The needs of a method class under its default config (for ``grpo-plugins list`` / ``show``), or
    None when it cannot be built with its defaults."""
    from grpo_plugins.build import EnabledMethod, hooks_of

    try:
        method = cls(cls.Config())
        disabled = method.disabled_hooks()
    except Exception:
        return None
    entry = EnabledMethod(cls.name, "", "", method, builtin=cls.name == "grpo")
    return needs_of(entry, [h for h in hooks_of(cls) if h not in disabled])


# ----------------------------------------------------------------------------- the comparison
def capability_problems(composition: "Composition", capabilities: TrainerCapabilities) -> list[str]:
    """Every reason the enabled methods cannot run on the trainer described by ``capabilities``;
    empty when they can. Each message names the method, the need and the trainer setting."""
    caps = capabilities
    problems: list[str] = []
    for name, needs in composition.needs().items():
        who = f"method '{name}'"

        def missing(kind: str, need: str, described: str = "") -> str:
            reason = needs.why.get(need)
            because = caps.why_not.get(need, "this adapter does not provide it yet")
            what = f"{kind} '{need}'" + (f" ({described})" if described else "")
            return f"{who} needs {what}" + (f" for {reason}" if reason else "") + f"; {caps.trainer} lacks it: {because}"

        for feature in sorted(needs.features - caps.features):
            problems.append(missing("trainer feature", feature, FEATURES.get(feature, "")))
        for name_ in sorted(needs.batch_fields - caps.batch_fields):
            problems.append(missing("batch field", name_, "GRPOBatch." + name_ + " at the advantage stage"))
        for name_ in sorted(needs.loss_fields - caps.loss_fields):
            problems.append(missing("loss field", name_, "LossInputs." + name_ + " in the loss stage"))
        if caps.columns is not None:
            for column in sorted(needs.columns - caps.columns):
                problems.append(
                    f"{who} needs dataset column '{column}', which the training dataset of {caps.trainer} lacks "
                    f"(columns: {', '.join(sorted(caps.columns)) or 'none'})"
                )
        for setting, allowed in sorted(needs.settings.items()):
            spelled = caps.setting_names.get(setting, setting)
            if setting not in caps.settings:
                problems.append(
                    f"{who} needs setting '{setting}' in {_allowed_text(allowed)}, which {caps.trainer} does not report"
                )
                continue
            value = caps.settings[setting]
            fits = allowed.problem(value) is None if isinstance(allowed, Range) else value in allowed
            if not fits:
                reason = needs.why.get(setting)
                problems.append(
                    f"{who} cannot run with {caps.trainer} setting {spelled} = {value!r} ({setting} must be in "
                    f"{_allowed_text(allowed)})" + (f": {reason}" if reason else "")
                )
    return problems


def relation_problems(needs: Mapping[str, Needs], active: Iterable[str],
                      providers: Mapping[str, Iterable[str]] | None = None) -> list[str]:
    """Every method a method needs that is not enabled, every active method it excludes, every other
    method implementing a hook it excludes and every method listed before it in a hook it must run first
    in (``providers``: hook -> the methods implementing it, in the order they run). These depend on the
    run's list only, so :class:`~grpo_plugins.Composition` checks them at start-up."""
    active = list(active)
    problems = []
    for name, declared in needs.items():
        for hook in sorted(declared.runs_first):
            order = list((providers or {}).get(hook, ()))
            for other in order[:order.index(name)] if name in order else ():
                reason = declared.why.get(hook)
                problems.append(f"method '{name}' must run first among the methods implementing hook '{hook}'"
                                + (f" ({reason})" if reason else "") + f", but method '{other}' is listed before "
                                f"it: list '{name}' before '{other}'")
        for hook in sorted(declared.excludes_hooks):
            for other in (providers or {}).get(hook, ()):
                if other != name:
                    reason = declared.why.get(hook)
                    problems.append(f"method '{name}' cannot run together with method '{other}', which implements "
                                    f"hook '{hook}'" + (f": {reason}" if reason else ""))
        for other in sorted(declared.methods - set(active)):
            reason = declared.why.get(other)
            problems.append(f"method '{name}' needs method '{other}' enabled in the same run" + (f" ({reason})" if reason else ""))
        for other in sorted(declared.excludes & set(active) - {name}):
            reason = declared.why.get(other)
            problems.append(f"method '{name}' cannot run together with method '{other}'" + (f": {reason}" if reason else ""))
    return problems


def check_capabilities(composition: "Composition", capabilities: TrainerCapabilities) -> None:
    """Raise one :class:`CompositionError` listing every problem of :func:`capability_problems`."""
    problems = capability_problems(composition, capabilities)
    if problems:
        raise CompositionError(
            f"the enabled methods cannot run on {capabilities.trainer} as configured ({len(problems)} problem"
            f"{'s' if len(problems) > 1 else ''}):\n- " + "\n- ".join(problems)
        )


PROMPT_ID_COLUMN = "prompt_id"
"""The dataset column that, when present, is each row's prompt id (the group key) on every adapter."""


def prompt_id_problems(composition: "Composition", prompt_ids: Iterable[Any] | None) -> list[str]:
    """Why the training dataset's :data:`PROMPT_ID_COLUMN` values ``prompt_ids`` (in row order; None: no
    such column) cannot run with the enabled methods; empty when they can.

    Methods that plan the rounds (``sample_prompts``, ``allocate_rollouts``) speak of dataset row
    indices, while the adapters key the groups, and so every per-prompt state a method learns from
    ``batch.prompt_ids``, by the column: the two must be the same numbers, i.e. the column must be
    the row index. A planner that declares the column among its needs (``Needs.columns``) reads it
    itself (e.g. to draw the rows sharing an id together) and is not held to this.
    """
    needs = composition.needs()
    planners = [name for name in dict.fromkeys(composition.providers("sample_prompts")
                                               + composition.providers("allocate_rollouts"))
                if PROMPT_ID_COLUMN not in needs[name].columns]
    if not planners or prompt_ids is None:
        return []
    values = list(prompt_ids)
    if not values:
        return []
    try:
        ids = torch.as_tensor(values).double()
    except (TypeError, ValueError, RuntimeError):  # not numbers (e.g. text ids)
        ids = None
    index = 0
    if ids is not None and ids.dim() == 1 and not isinstance(values[0], bool):
        wrong = (ids != torch.arange(ids.numel(), dtype=torch.float64)).nonzero()
        if wrong.numel() == 0:
            return []
        index = int(wrong[0])
    return [f"method(s) {planners} plan the rounds by dataset row index, but the training dataset's "
            f"'{PROMPT_ID_COLUMN}' column is not the row index (row {index} has {PROMPT_ID_COLUMN}="
            f"{values[index]!r}); the groups and every method's per-prompt state are keyed by that column. "
            f"Make '{PROMPT_ID_COLUMN}' equal to the row index, or remove the column"]
