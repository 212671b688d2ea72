"""The hook table: what the core does with every hook's output, in one place.

One row per hook of :mod:`grpo_plugins.hookspecs`: the stage it runs in, how the outputs of several
enabled methods combine, the output contract the core checks (kind, shape, dtype, bounds,
finiteness, sum), the trainer feature an adapter must provide to run it, and whether the adapters
provide that feature today. The dispatchers (:mod:`grpo_plugins.dispatch`), the capability check
(:mod:`grpo_plugins.needs`) and the reference page ``docs/hooks.md`` (:mod:`grpo_plugins.docs`) all
read this table; nothing about a hook's semantics is written anywhere else.

Shape symbols: ``N`` completions of the generation batch, ``T`` completion tokens, ``B`` rows of a
loss micro-batch, ``P`` prompts of the round, ``P'`` a number of prompts from 1 to the round's
budget. Bounds may name a value of the call: ``dataset_size - 1``, ``budget``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

Combine = Literal["single", "chain", "multiply", "add", "all"]
Kind = Literal["tensor", "prompts", "terms", "objectives", "rows", "none"]
DType = Literal["float", "count", "bool", "any"]

COMBINE_MODES: Mapping[str, str] = {
    "single": "at most one enabled method implements the hook (two is a start-up error); its output is used, "
    "or the default when none implements it",
    "chain": "every implementation runs in the run's configured order; each receives the previous output as "
    "its chained argument and returns the next",
    "multiply": "every implementation runs; the outputs are multiplied together (keep-masks: a row is kept "
    "only if every method keeps it)",
    "add": "every implementation runs; the outputs are added (loss terms stay separate per method, "
    "named `<method>/<term>`; rows are concatenated)",
    "all": "every implementation runs, in the run's order, for its side effects; outputs are ignored",
}

DTYPES: Mapping[str, str] = {
    "float": "a floating-point tensor (an integer or bool tensor is refused: it would truncate silently)",
    "count": "whole numbers: an integer tensor, or a float tensor holding whole numbers (cast to int64); "
    "bool is refused",
    "bool": "a bool tensor",
    "any": "any dtype",
}

STAGES: tuple[str, ...] = ("start", "round planning", "batch editing", "advantage stage", "loss stage",
                           "optimiser step", "after the step")


@dataclass(frozen=True)
class Output:
    """A hook's output contract, checked by the core after every call.

    Attributes:
        kind: ``tensor``; ``prompts`` (a list of ``P`` prompts); ``terms`` (a dict of named tensors,
            each meeting the tensor contract); ``objectives`` (a dict of named
            :class:`~grpo_plugins.batch.LossTerm`, whose values meet it); ``rows`` (a
            list of dicts, each with a ``prompt_id`` and a ``completion``); ``none`` (ignored).
        shapes: accepted shapes, in symbols (``("N",)``, ``("N", "T")``, ``("B", 1)``, ``()``).
        dtype: ``float``, ``count``, ``bool`` or ``any`` (see :data:`DTYPES`).
        finite: NaN/inf are refused (floating-point outputs).
        low, high: inclusive bounds, a number or the name of a value of the call.
        total: the name of a value the outputs must sum to exactly.
    """

    kind: Kind = "tensor"
    shapes: tuple[tuple, ...] = ()
    dtype: DType = "float"
    finite: bool = True
    low: float | str | None = None
    high: float | str | None = None
    total: str | None = None

    def text(self) -> str:
        """The contract in one line, for the docs."""
        if self.kind == "none":
            return "nothing (the return value is ignored)"
        if self.kind == "prompts":
            return "a list of `P` prompts in the trainer's format"
        if self.kind == "rows":
            return "a list of dicts, each with `prompt_id` and `completion`"
        shapes = " or ".join("(" + ", ".join(str(s) for s in shape) + (",)" if len(shape) == 1 else ")") for shape in self.shapes)
        parts = [shapes or "any shape", {"float": "floating point", "count": "whole numbers", "bool": "bool", "any": "any dtype"}[self.dtype]]
        if self.finite and self.dtype == "float":
            parts.append("finite")
        if self.low is not None:
            parts.append(f">= {self.low}")
        if self.high is not None:
            parts.append(f"<= {self.high}")
        if self.total is not None:
            parts.append(f"sum = {self.total}")
        text = ", ".join(parts)
        if self.kind == "terms":
            return f"a dict of named tensors, each {text}"
        if self.kind == "objectives":
            return f"a dict of named `LossTerm`s, values {text}"
        return text


@dataclass(frozen=True)
class Hook:
    """One row of the hook table.

    Attributes:
        name: the hook's name (a function of :mod:`grpo_plugins.hookspecs`).
        stage: when it runs (one of :data:`STAGES`).
        combine: how several methods' outputs combine (see :data:`COMBINE_MODES`).
        output: the output contract.
        effect: what the core does with the combined output (one sentence, for the docs).
        feature: the trainer feature an adapter must provide to run the hook (see
            :data:`grpo_plugins.needs.FEATURES`); a method implementing the hook needs it.
        chained: for ``chain`` hooks, the argument that carries the previous output.
        provided: whether both adapters run the hook at their default settings. A hook that is not
            provided is part of the designed surface (``docs/design.md``): the core dispatches and checks
            it, and the capability check refuses a method implementing it on a trainer whose adapter
            does not declare its feature.
        runs_on: for a hook that is not provided, the adapters that already run it (their
            capabilities declare its feature); the others refuse it at start-up.
    """

    name: str
    stage: str
    combine: Combine
    output: Output
    effect: str
    feature: str
    chained: str | None = None
    provided: bool = True
    runs_on: tuple[str, ...] = ()


FLOAT_PER_COMPLETION = Output(shapes=(("N",),))
FLOAT_ADVANTAGES = Output(shapes=(("N",), ("N", "T")))

TABLE: tuple[Hook, ...] = (
    Hook("setup", "start", "all", Output(kind="none"),
         "Each method sees the run's context (tokenizer, trainer settings, seed) once, before the first step.",
         feature="method_setup", provided=False, runs_on=("TRL", "verl")),
    Hook("sample_prompts", "round planning", "single",
         Output(shapes=(("P'",),), dtype="count", low=0, high="dataset_size - 1"),
         "The round's prompts (cast to int64); without a provider the trainer's own sampler draws them.",
         feature="prompt_selection"),
    Hook("allocate_rollouts", "round planning", "single",
         Output(shapes=(("P",),), dtype="count", low=0, total="budget"),
         "Completions per prompt (cast to int64); without a provider the budget is split evenly.",
         feature="variable_budgets"),
    Hook("augment_prompts", "round planning", "chain", Output(kind="prompts"),
         "The prompts the trainer generates from.", feature="prompt_rewriting", chained="prompts"),
    Hook("keep_rows", "batch editing", "multiply", Output(shapes=(("N",),), dtype="bool"),
         "Rows kept for training (a row is kept only if every method keeps it); the adapter drops the others "
         "and refills the batch with new prompts.", feature="batch_editing", provided=False, runs_on=("TRL", "verl")),
    Hook("inject_rows", "batch editing", "add", Output(kind="rows"),
         "Extra rows (e.g. demonstrations) the adapter tokenises, scores unless given a reward and appends to "
         "their prompt's group; each row's kind is in `row_data['injected']`.",
         feature="row_injection", provided=False, runs_on=("TRL", "verl")),
    Hook("shape_rewards", "advantage stage", "chain", FLOAT_PER_COMPLETION,
         "Becomes `batch.rewards`, which the estimator reads (the trainer's stay in `batch.unshaped_rewards`).",
         feature="advantage_hooks", chained="rewards"),
    Hook("compute_advantages", "advantage stage", "single", FLOAT_ADVANTAGES,
         "Becomes `batch.advantages`; the built-in `grpo` method is the default provider.",
         feature="advantage_hooks"),
    Hook("adjust_advantages", "advantage stage", "chain", FLOAT_ADVANTAGES,
         "Replaces `batch.advantages`.", feature="advantage_hooks", chained="advantages"),
    Hook("mask_tokens", "advantage stage", "multiply", Output(shapes=(("N", "T"),), low=0),
         "Becomes `batch.token_weights`: each weight multiplies its token's policy-loss term; the loss's "
         "normaliser (token counts) stays the trainer's completion mask.", feature="token_weights"),
    Hook("policy_surrogate", "loss stage", "single", Output(shapes=(("B", "T"),)),
         "The per-token policy loss; without a provider the trainer's own clipped surrogate.",
         feature="token_loss"),
    Hook("gate_loss", "loss stage", "multiply", Output(shapes=(("B", "T"), ("B", 1)), low=0),
         "Multiplies the per-token policy loss.", feature="token_loss"),
    Hook("loss_terms", "loss stage", "add", Output(kind="terms", shapes=(("B", "T"),)),
         "Each term is aggregated like the policy loss (same normaliser) and added to it; logged as "
         "`plugins/<method>/<term>`.", feature="token_loss"),
    Hook("loss_objectives", "loss stage", "add", Output(kind="objectives", shapes=(("B", "T"), ("B",))),
         "Each `LossTerm` is reduced with the normaliser it declares (token, sequence, group, sum) over the "
         "global batch and added to the loss.", feature="loss_normalisers", provided=False, runs_on=("TRL", "verl")),
    Hook("scale_update", "optimiser step", "multiply", Output(shapes=((),), low=0),
         "Multiplies the learning rate of the step's optimiser update (for that one step; Adam would undo a "
         "gradient scale).", feature="update_control", provided=False, runs_on=("TRL",)),
    Hook("observe", "after the step", "all", Output(kind="none"),
         "Nothing: methods update their state.", feature="after_step"),
)

HOOKS: Mapping[str, Hook] = {hook.name: hook for hook in TABLE}


def hook(name: str) -> Hook:
    """The table row of hook ``name``."""
    return HOOKS[name]
