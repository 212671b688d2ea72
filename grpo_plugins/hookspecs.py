"""The hook specification: every extension point a GRPO method plugin can implement.

Symbols used in shapes: ``P`` prompts in a generation round, ``N`` completions in the (global)
generation batch, ``G`` groups (one per distinct prompt id), ``T`` completion tokens (padded),
``K`` reward components, ``B`` rows of one loss micro-batch.

Hooks are always called with keyword arguments; an implementation may accept any subset of them.
Each hook declares how several enabled methods combine (``COMBINE``):

- ``single``:   at most one enabled method may implement it (two is a start-up error). For
                ``compute_advantages`` the built-in ``grpo`` method provides the default.
- ``chain``:    every implementation runs in the run's configured order; each receives the previous
                output (``augment_prompts``, ``shape_rewards``, ``adjust_advantages``).
- ``multiply``: outputs are multiplied together (``mask_tokens``, ``gate_loss``).
- ``add``:      outputs are added (``loss_terms``).
- ``all``:      every implementation runs for its side effects (``observe``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import pluggy

if TYPE_CHECKING:
    import torch

    from grpo_plugins.batch import GRPOBatch, LossInputs, PromptRound

PROJECT = "grpo_plugins"
hookspec = pluggy.HookspecMarker(PROJECT)

COMBINE: dict[str, str] = {}


def _spec(combine: str):
    def mark(function):
        COMBINE[function.__name__] = combine
        return hookspec(function)

    return mark


@_spec("single")
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

    Combine: single provider. Without one, the trainer's own sampler is used.
    """


@_spec("single")
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

    Combine: single provider. Without one, every prompt gets ``budget // P`` completions (an error
    when ``P`` does not divide the budget).
    """


@_spec("chain")
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

    Combine: chain, in the run's order.
    """


@_spec("chain")
def shape_rewards(batch: GRPOBatch, rewards: torch.Tensor) -> torch.Tensor:
    """Transform per-completion rewards before advantages are computed.

    Args:
        batch: the global generation batch; ``batch.reward_components`` is ``(N, K)`` (NaN where a
            reward function did not apply), ``batch.group_index`` ``(N,)``.
        rewards: ``(N,)`` float rewards, the output of the previous method in the chain (initially the
            trainer's weighted sum of the components).

    Returns:
        ``(N,)`` finite float rewards.

    Combine: chain, in the run's order.
    """


@_spec("single")
def compute_advantages(batch: GRPOBatch) -> torch.Tensor:
    """Compute advantages from the (shaped) rewards.

    Args:
        batch: the global generation batch; ``batch.rewards`` ``(N,)`` holds the shaped rewards,
            ``batch.group_index`` ``(N,)`` and ``batch.num_groups`` describe the groups (sizes may
            differ), ``batch.completion_mask`` ``(N, T)``.

    Returns:
        ``(N,)`` per-sequence or ``(N, T)`` per-token finite float advantages.

    Combine: single provider; the built-in ``grpo`` method (group normalisation) is the default.
    """


@_spec("chain")
def adjust_advantages(batch: GRPOBatch, advantages: torch.Tensor) -> torch.Tensor:
    """Adjust the estimator's advantages: blend, filter, re-weight or clip.

    Args:
        batch: the global generation batch.
        advantages: ``(N,)`` or ``(N, T)``, the output of the previous method in the chain.

    Returns:
        ``(N,)`` or ``(N, T)`` finite float advantages.

    Combine: chain, in the run's order, after ``compute_advantages``.
    """


@_spec("multiply")
def mask_tokens(batch: GRPOBatch) -> torch.Tensor:
    """Per-token loss weights; 0 drops a token from the loss only (never from attention).

    Args:
        batch: the global generation batch, with ``batch.advantages`` already computed.

    Returns:
        ``(N, T)`` finite float weights ``>= 0``. Tokens with weight 0 leave the loss and its token
        count; positive weights scale the token's policy-loss term.

    Combine: multiplied together, and with the completion mask.
    """


@_spec("single")
def policy_surrogate(inputs: LossInputs) -> torch.Tensor:
    """Replace the trainer's per-token policy objective (e.g. a soft gate instead of clipping).

    Args:
        inputs: one loss micro-batch: ``log_probs`` ``(B, T)`` (with gradient), ``old_log_probs``
            ``(B, T)``, ``advantages`` ``(B, T)``, ``mask`` ``(B, T)``, the trainer's clip range.

    Returns:
        ``(B, T)`` per-token loss (to be minimised); the adapter aggregates it with the trainer's
        loss aggregation (token mean, sequence mean, ...).

    Combine: single provider. Without one, the trainer's own clipped surrogate is used.
    """


@_spec("multiply")
def gate_loss(inputs: LossInputs) -> torch.Tensor:
    """Gate the policy loss per token or per sequence.

    Args:
        inputs: one loss micro-batch (see ``policy_surrogate``).

    Returns:
        ``(B, T)`` per-token or ``(B, 1)`` per-sequence finite gates ``>= 0`` that multiply the
        per-token policy loss (use ``.detach()`` unless the gate is meant to carry gradient).

    Combine: multiplied together.
    """


@_spec("add")
def loss_terms(inputs: LossInputs) -> dict[str, torch.Tensor]:
    """Add terms to the loss (regularisers).

    Args:
        inputs: one loss micro-batch (see ``policy_surrogate``).

    Returns:
        ``{term_name: (B, T) per-token loss}``; each term is aggregated exactly like the policy loss
        (same normaliser, same gradient-accumulation and data-parallel scaling) and added to it. A
        term's aggregated value is logged as ``plugins/<method>/<term_name>``.

    Combine: added together.
    """


@_spec("all")
def observe(batch: GRPOBatch, step: int) -> None:
    """See the finished step; update the method's state (trackers, posteriors, schedules).

    Called after the optimiser step that consumed the generation batch, identically on every rank.

    Args:
        batch: the global generation batch of the step, with ``rewards`` and ``advantages``.
        step: optimiser steps taken so far.

    Combine: every implementation runs, in the run's order.
    """


HOOK_NAMES: tuple[str, ...] = tuple(COMBINE)
SINGLE_PROVIDER_HOOKS: Sequence[str] = tuple(h for h, c in COMBINE.items() if c == "single")
