"""Running the stages of a step: what happens when an adapter calls a ``Composition.run_*`` method.

Each function runs its hooks with the dispatcher of their combine mode (:mod:`grpo_plugins.dispatch`)
and gives the dispatcher the values that resolve the hook table's symbols (``N``, ``T``, ``B``, the
round's budget, ...). ``impls`` maps each hook to its implementations in the run's configured order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from grpo_plugins.batch import GRPOBatch, LossInputs, LossTerm, PromptRound, RunContext
from grpo_plugins.dispatch import Caller, run_add, run_all, run_chain, run_multiply, run_single
from grpo_plugins.errors import BatchError, CompositionError
from grpo_plugins.hooktable import HOOKS
from grpo_plugins.padding import clean_batch_padding, clean_loss_padding
from grpo_plugins.validation import validate_batch

Impls = Mapping[str, Sequence[tuple[Any, Any]]]


@dataclass
class LossParts:
    """The loss-stage output: the policy's per-token loss and the added per-token terms, all ``(B, T)``.

    ``objectives`` holds the ``loss_objectives`` terms (designed, not yet run by the adapters), each
    with its own normaliser.
    """

    policy: torch.Tensor
    terms: dict[str, torch.Tensor]
    objectives: dict[str, LossTerm] = field(default_factory=dict)


def _names(impls: Sequence[tuple[Any, Any]]) -> list[str]:
    return [entry.name for entry, _ in impls]


# ----------------------------------------------------------------------------- start
def setup(impls: Impls, call: Caller, enabled: Sequence[Any], context: RunContext) -> None:
    """Give every enabled method the run's context (``method.context``), then run ``setup``."""
    for entry in enabled:
        entry.method.context = context
    run_all(HOOKS["setup"], impls["setup"], call, {}, context=context)


# ----------------------------------------------------------------------------- round planning
def sample_prompts(impls: Impls, call: Caller, round: PromptRound, generator: torch.Generator) -> torch.Tensor | None:
    """``(P',)`` int64 dataset indices from the provider, or None without one."""
    values = {"P'": (1, round.budget, "the round's budget"), "dataset_size - 1": round.dataset_size - 1}
    prompts = run_single(HOOKS["sample_prompts"], impls["sample_prompts"], call, values, round=round, generator=generator)
    return None if prompts is None else prompts.long()


def allocate_rollouts(impls: Impls, call: Caller, round: PromptRound, prompt_ids: torch.Tensor) -> torch.Tensor | None:
    """``(P,)`` int64 completions per prompt from the provider, or None without one."""
    values = {"P": int(prompt_ids.shape[0]) if prompt_ids.dim() else 0, "budget": round.budget}
    counts = run_single(HOOKS["allocate_rollouts"], impls["allocate_rollouts"], call, values, round=round, prompt_ids=prompt_ids)
    return None if counts is None else counts.long()


def rollout_counts(impls: Impls, call: Caller, round: PromptRound, prompt_ids: torch.Tensor) -> torch.Tensor:
    """The provider's counts, or the budget split evenly (``budget // P'`` each)."""
    counts = allocate_rollouts(impls, call, round, prompt_ids)
    if counts is not None:
        return counts
    num = int(prompt_ids.numel())
    if num < 1 or round.budget % num:
        raise CompositionError(
            f"the round has {num} prompts (from {_names(impls['sample_prompts']) or 'the trainer'}) and a budget "
            f"of {round.budget} completions, which does not split evenly; return a number of prompts that divides "
            "the budget or enable a method that implements 'allocate_rollouts'"
        )
    return torch.full((num,), round.budget // num, dtype=torch.long, device=prompt_ids.device)


def augment_prompts(
    impls: Impls, call: Caller, round: PromptRound, prompt_ids: torch.Tensor, prompts: list, rows: list[dict]
) -> list:
    """The prompts after every ``augment_prompts`` method, in order."""
    values = {"P": len(prompts)}
    return run_chain(
        HOOKS["augment_prompts"], impls["augment_prompts"], call, values,
        round=round, prompt_ids=prompt_ids, prompts=prompts, rows=rows,
    )


# ----------------------------------------------------------------------------- batch editing (designed)
def keep_rows(impls: Impls, call: Caller, batch: GRPOBatch) -> torch.Tensor | None:
    """``(N,)`` bool rows every ``keep_rows`` method keeps, or None when no method edits the batch."""
    return run_multiply(HOOKS["keep_rows"], impls["keep_rows"], call, {"N": batch.num_completions}, batch=batch)


def inject_rows(impls: Impls, call: Caller, batch: GRPOBatch) -> list[dict]:
    """The rows every ``inject_rows`` method adds, concatenated in order."""
    return run_add(HOOKS["inject_rows"], impls["inject_rows"], call, {}, batch=batch)


# ----------------------------------------------------------------------------- advantage stage
def advantage_stage(impls: Impls, call: Caller, batch: GRPOBatch) -> GRPOBatch:
    """``shape_rewards`` -> ``compute_advantages`` -> ``adjust_advantages`` -> ``mask_tokens`` on the
    global batch; fills ``batch.unshaped_rewards`` (the trainer's rewards, kept), ``batch.rewards``,
    ``batch.advantages`` and ``batch.token_weights``."""
    validate_batch(batch)
    clean_batch_padding(batch)
    batch.unshaped_rewards = batch.rewards.clone()
    n = batch.num_completions
    tokens = None if batch.completion_mask is None else tuple(batch.completion_mask.shape)
    values = {"N": n, "T": tokens[1] if tokens else None}

    def set_rewards(value):
        batch.rewards = value

    def set_advantages(value):
        batch.advantages = value

    def set_weights(value):
        batch.token_weights = value

    run_chain(HOOKS["shape_rewards"], impls["shape_rewards"], call, values, store=set_rewards, batch=batch, rewards=batch.rewards)
    advantages = run_single(HOOKS["compute_advantages"], impls["compute_advantages"], call, values, batch=batch)
    if advantages is not None:
        batch.advantages = advantages
    run_chain(
        HOOKS["adjust_advantages"], impls["adjust_advantages"], call, values,
        store=set_advantages, batch=batch, advantages=batch.advantages,
    )
    batch.token_weights = None
    maskers = impls["mask_tokens"]
    if maskers and tokens is None:
        raise BatchError(f"method '{maskers[0][0].name}' masks tokens but the adapter gave no completion tokens")
    run_multiply(HOOKS["mask_tokens"], maskers, call, values, store=set_weights, batch=batch)
    if batch.token_weights is not None and not bool((batch.token_weights * batch.token_mask).gt(0).any()):
        raise BatchError(
            f"the token masks of {_names(maskers)} drop every token of the batch; nothing is left to learn from"
        )
    for key, value in batch.row_data.items():
        if not isinstance(value, torch.Tensor) or value.shape[:1] != (n,):
            raise BatchError(f"row_data['{key}'] must be a tensor with first dimension N={n}")
    return batch


# ----------------------------------------------------------------------------- loss stage
def loss_stage(
    impls: Impls, call: Caller, inputs: LossInputs, trainer_surrogate: Callable[[LossInputs], torch.Tensor]
) -> LossParts:
    """The per-token policy loss (the surrogate times the gates) and the added terms, all ``(B, T)``."""
    values = dict(zip(("B", "T"), tuple(inputs.log_probs.shape)))
    inputs = clean_loss_padding(inputs)
    policy = run_single(HOOKS["policy_surrogate"], impls["policy_surrogate"], call, values, inputs=inputs)
    if policy is None:
        policy = trainer_surrogate(inputs)
    policy = run_multiply(HOOKS["gate_loss"], impls["gate_loss"], call, values, initial=policy, inputs=inputs)
    terms = run_add(HOOKS["loss_terms"], impls["loss_terms"], call, values, inputs=inputs)
    objectives = run_add(HOOKS["loss_objectives"], impls["loss_objectives"], call, values, inputs=inputs)
    return LossParts(policy=policy, terms=terms, objectives=objectives)


# ----------------------------------------------------------------------------- optimiser step and after
def scale_update(impls: Impls, call: Caller, batch: GRPOBatch, step: int) -> torch.Tensor | None:
    """``()`` product of the ``scale_update`` outputs, or None when no method scales the update."""
    return run_multiply(HOOKS["scale_update"], impls["scale_update"], call, {}, batch=batch, step=step)


def observe(impls: Impls, call: Caller, batch: GRPOBatch, step: int) -> None:
    """Every ``observe`` method, in order."""
    run_all(HOOKS["observe"], impls["observe"], call, {}, batch=batch, step=step)
