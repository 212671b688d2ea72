"""The hook specification: every extension point a GRPO method plugin can implement.

Symbols used in shapes: ``P`` prompts in a generation round, ``N`` completions in the (global)
generation batch, ``G`` groups (one per distinct prompt id), ``T`` completion tokens (padded),
``K`` reward components, ``B`` rows of one loss micro-batch.

Hooks are always called with keyword arguments; an implementation may accept any subset of them.
The order in which several methods run is the run's configured order: pluggy's ``tryfirst``,
``trylast``, ``wrapper`` and ``hookwrapper`` options are refused at start-up. What the core does
with each hook's output — its stage, how several methods combine, the output contract it checks —
is declared in one table, :mod:`grpo_plugins.hooktable`; this module holds the signatures and the
meaning of the arguments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import pluggy

from grpo_plugins.hooktable import HOOKS, TABLE

if TYPE_CHECKING:
    import torch

    from grpo_plugins.batch import GRPOBatch, LossInputs, LossTerm, PromptRound, RunContext

PROJECT = "grpo_plugins"
hookspec = pluggy.HookspecMarker(PROJECT)


def _spec(function):
    if function.__name__ not in HOOKS:
        raise RuntimeError(f"hook '{function.__name__}' has no row in grpo_plugins.hooktable.TABLE")
    return hookspec(function)


@_spec
def setup(context: RunContext) -> None:
    """Prepare the method for the run: read the tokenizer, the trainer's settings and the seed.

    Called once per process before the first step, identically on every rank.

    Args:
        context: the run: ``context.trainer`` (the adapter's name), ``context.tokenizer`` (or None),
            ``context.settings`` (trainer-neutral settings, see :data:`grpo_plugins.needs.SETTINGS`),
            ``context.seed``, ``context.dataset_size``, ``context.total_steps``.

    Returns:
        Nothing; the method keeps what it needs (it is also given ``self.context``).
    """


@_spec
def sample_prompts(round: PromptRound, generator: torch.Generator) -> torch.Tensor:
    """Choose which prompts (dataset indices) form the next generation round.

    Called once per generation round, before generation, identically on every data-parallel rank.

    Args:
        round: the round being planned: ``round.num_prompts`` (P, the trainer's own number of
            prompts), ``round.dataset_size``, ``round.step`` (optimiser steps taken so far),
            ``round.total_steps`` (the run's length, or None) and ``round.budget`` (completions the
            round generates in total).
        generator: a seeded ``torch.Generator`` owned by the adapter; use it for every random draw so
            that all ranks draw the same prompts and a resumed run draws what the original would.

    Returns:
        ``(P',)`` int64 dataset indices in ``[0, dataset_size)``, repeats allowed, with
        ``1 <= P' <= round.budget``: usually ``round.num_prompts``, but a method may choose more
        prompts with fewer completions each (e.g. ``round.budget`` prompts of one completion). Without an
        ``allocate_rollouts`` provider the budget is split evenly, so ``P'`` must then divide it.
    """


@_spec
def allocate_rollouts(round: PromptRound, prompt_ids: torch.Tensor) -> torch.Tensor:
    """Decide how many completions each prompt of the round gets.

    Args:
        round: the round being planned (see ``sample_prompts``); ``round.budget`` is the total number
            of completions the trainer generates this round.
        prompt_ids: ``(P,)`` int64 dataset indices chosen for the round (``P`` may differ from
            ``round.num_prompts`` when a ``sample_prompts`` method chose another number).

    Returns:
        ``(P,)`` int64 counts, each ``>= 0``, summing exactly to ``round.budget``. A prompt given 0
        completions is dropped from the round.
    """


@_spec
def augment_prompts(
    round: PromptRound, prompt_ids: torch.Tensor, prompts: list[Any], rows: list[dict]
) -> list[Any]:
    """Rewrite prompts before generation (e.g. add a hint to prompts the model keeps failing).

    Args:
        round: the round being planned.
        prompt_ids: ``(P,)`` int64 dataset indices of the prompts.
        prompts: ``P`` prompts as the trainer holds them (strings, or chat message lists); the output
            of the previous method in the chain.
        rows: ``P`` dataset rows (dicts of every column), for methods that read extra columns.

    Returns:
        A list of ``P`` prompts in the same format.
    """


@_spec
def keep_rows(batch: GRPOBatch) -> torch.Tensor:
    """Choose the completions that train (e.g. drop groups whose rewards are all equal).

    Runs after scoring, before the advantage stage, on the global batch of each generation round. The
    adapter drops the groups not kept and refills the batch with new prompts until it holds the
    trainer's batch size (DAPO's dynamic sampling; :mod:`grpo_plugins.batch_editing`), so a dropped
    group never shrinks the update. Keep or drop every row of a prompt's group: a group partly kept
    is refused.

    Args:
        batch: the global generation batch with ``rewards`` (unshaped) and ``reward_components``.

    Returns:
        ``(N,)`` bool: True for the rows to keep.
    """


@_spec
def inject_rows(batch: GRPOBatch) -> list[dict]:
    """Add rows the policy did not generate (e.g. a demonstration in a group that failed).

    Runs after scoring (and after batch editing's refill), before the advantage stage. The adapter
    tokenises each row as it tokenises completions, scores it with the trainer's reward functions unless
    it carries a ``reward``, computes its log-probs like every row's and appends it to its prompt's
    group. Each row's kind is in ``row_data["injected"]`` (``(N,)`` int64: 0 for a generated row, else
    :func:`grpo_plugins.injection.kind_code` of its kind) at the advantage and the loss stage, so a
    method can give injected rows their own loss or leave them out of its group statistics
    (:mod:`grpo_plugins.injection`).

    Args:
        batch: the global generation batch with ``rewards`` (unshaped).

    Returns:
        A list of dicts, each with ``prompt_id`` (int, a prompt of the batch), ``completion`` (text or
        token ids) and optionally ``kind`` (str, default ``"injected"``) and ``reward`` (float).
    """


@_spec
def shape_rewards(batch: GRPOBatch, rewards: torch.Tensor) -> torch.Tensor:
    """Transform per-completion rewards before advantages are computed.

    Args:
        batch: the global generation batch; ``batch.reward_components`` is ``(N, K)`` (NaN where a
            reward function did not apply), ``batch.group_index`` ``(N,)``.
        rewards: ``(N,)`` float rewards, the output of the previous method in the chain (initially the
            trainer's weighted sum of the components).

    Returns:
        ``(N,)`` finite float rewards.
    """


@_spec
def compute_advantages(batch: GRPOBatch) -> torch.Tensor:
    """Compute advantages from the (shaped) rewards.

    Args:
        batch: the global generation batch; ``batch.rewards`` ``(N,)`` holds the shaped rewards,
            ``batch.group_index`` ``(N,)`` and ``batch.num_groups`` describe the groups (sizes may
            differ), ``batch.completion_mask`` ``(N, T)``.

    Returns:
        ``(N,)`` per-sequence or ``(N, T)`` per-token finite float advantages.
    """


@_spec
def adjust_advantages(batch: GRPOBatch, advantages: torch.Tensor) -> torch.Tensor:
    """Adjust the estimator's advantages: blend, filter, re-weight or clip.

    Args:
        batch: the global generation batch.
        advantages: ``(N,)`` or ``(N, T)``, the output of the previous method in the chain.

    Returns:
        ``(N,)`` or ``(N, T)`` finite float advantages.
    """


@_spec
def mask_tokens(batch: GRPOBatch) -> torch.Tensor:
    """Per-token loss weights; 0 drops a token from the loss only (never from attention).

    Args:
        batch: the global generation batch, with ``batch.advantages`` already computed.

    Returns:
        ``(N, T)`` finite float weights ``>= 0``. Each weight multiplies its token's policy-loss term
        (0 removes the term); the loss's normaliser (the token counts of the trainer's loss aggregation)
        always comes from the completion mask, never from the weights.
    """


@_spec
def policy_surrogate(inputs: LossInputs) -> torch.Tensor:
    """Replace the trainer's per-token policy objective (e.g. a soft gate instead of clipping).

    Args:
        inputs: one loss micro-batch: ``log_probs`` ``(B, T)`` (with gradient), ``old_log_probs``
            ``(B, T)``, ``advantages`` ``(B, T)``, ``mask`` ``(B, T)``, the trainer's clip range.

    Returns:
        ``(B, T)`` per-token loss (to be minimised); the adapter aggregates it with the trainer's
        loss aggregation (token mean, sequence mean, ...).
    """


@_spec
def gate_loss(inputs: LossInputs) -> torch.Tensor:
    """Gate the policy loss per token or per sequence.

    Args:
        inputs: one loss micro-batch (see ``policy_surrogate``).

    Returns:
        ``(B, T)`` per-token or ``(B, 1)`` per-sequence finite gates ``>= 0`` that multiply the
        per-token policy loss (use ``.detach()`` unless the gate is meant to carry gradient).
    """


@_spec
def loss_terms(inputs: LossInputs) -> dict[str, torch.Tensor]:
    """Add terms to the loss (regularisers).

    Args:
        inputs: one loss micro-batch (see ``policy_surrogate``).

    Returns:
        ``{term_name: (B, T) per-token loss}``; each term is aggregated exactly like the policy loss
        (same normaliser, same gradient-accumulation and data-parallel scaling) and added to it. A
        term's aggregated value is logged as ``plugins/<method>/<term_name>``.
    """


@_spec
def loss_objectives(inputs: LossInputs) -> dict[str, LossTerm]:
    """Add loss terms that declare their own normaliser, or objectives over whole groups.

    Args:
        inputs: one loss micro-batch (see ``policy_surrogate``); with the ``whole_groups`` feature every
            group's rows sit in one micro-batch and ``inputs.group_index`` numbers them.

    Returns:
        ``{term_name: LossTerm}``: per-token ``(B, T)`` or per-sequence ``(B,)`` values and the normaliser
        (``token``, ``sequence``, ``group`` or ``sum``) the adapter reduces them with over the global
        batch (:meth:`grpo_plugins.LossTerm.reduce`).
    """


@_spec
def scale_update(batch: GRPOBatch, step: int) -> torch.Tensor:
    """Scale the update of the optimiser step that consumes the generation batch (an adaptive step size).

    Called after the last backward pass of the step and before the optimiser step, identically on every
    rank; the adapter multiplies the learning rate of that one optimiser step by the output (scaling the
    gradients instead would be undone by Adam's normalisation and by gradient clipping).

    Args:
        batch: the global generation batch of the step.
        step: optimiser steps taken so far.

    Returns:
        ``()`` finite float ``>= 0`` (1 leaves the update unchanged).
    """


@_spec
def observe(batch: GRPOBatch, step: int) -> None:
    """See the finished step; update the method's state (trackers, posteriors, schedules).

    Called after the optimiser step that consumed the generation batch, identically on every rank.

    Args:
        batch: the global generation batch of the step, with ``rewards`` and ``advantages``.
        step: optimiser steps taken so far.
    """


HOOK_NAMES: tuple[str, ...] = tuple(hook.name for hook in TABLE)
COMBINE: dict[str, str] = {hook.name: hook.combine for hook in TABLE}
SINGLE_PROVIDER_HOOKS: Sequence[str] = tuple(h for h, c in COMBINE.items() if c == "single")
PROVIDED_HOOKS: tuple[str, ...] = tuple(hook.name for hook in TABLE if hook.provided)
"""Hooks the adapters run today; the others are designed (``docs/design.md``) but not yet run."""
