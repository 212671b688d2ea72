"""The trainer-neutral objects hooks receive. Adapters fill them; plugins never import a trainer.

Shapes: ``P`` prompts in a round, ``N`` completions, ``G`` groups, ``T`` completion tokens,
``K`` reward components, ``B`` rows of one loss micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal, Mapping

import torch

from grpo_plugins.parallel import ParallelContext
from grpo_plugins.steps import Steps


@dataclass(frozen=True)
class PromptRound:
    """One generation round being planned (``sample_prompts``, ``allocate_rollouts``, ``augment_prompts``).

    Attributes:
        num_prompts: ``P``, prompts the trainer would draw for the round on its own (a
            ``sample_prompts`` method may choose any number from 1 to ``budget``).
        budget: completions the round generates in total (sum of the rollout counts).
        dataset_size: number of prompts in the training dataset.
        step: optimiser steps taken so far.
        default_rollouts: completions per prompt the trainer would use on its own.
        total_steps: optimiser steps of the whole run (the trainer's ``max_steps``); None when the
            adapter does not know it.
    """

    num_prompts: int
    budget: int
    dataset_size: int
    step: int
    default_rollouts: int
    total_steps: int | None = None


@dataclass(frozen=True)
class GradientStatistics:
    """The gradients of one optimiser step, seen as ``M`` unit gradients (``GRPOBatch.gradient_statistics``).

    A step accumulates ``K`` micro-batches on each of ``R`` ranks; unit ``j = (k, r)`` is micro-batch
    ``k``'s gradient on rank ``r`` scaled so that the step's gradient is their mean,
    ``g = (1/M) sum_j u_j`` with ``M = K R`` (before clipping). The noise of the step's gradient is then
    ``sum_j |u_j - g|^2 / (M - 1) = (sum_j |u_j|^2 - M |g|^2) / (M - 1)``.

    Attributes:
        unit_sq_norms: ``(M,)`` squared L2 norms ``|u_j|^2`` over every trained parameter.
        mean_sq_norm: ``()`` squared L2 norm ``|g|^2`` of the step's gradient.
    """

    unit_sq_norms: torch.Tensor
    mean_sq_norm: torch.Tensor


STAGE_FIELDS = frozenset(("unshaped_rewards", "advantages", "token_weights"))
"""``GRPOBatch`` fields the core sets during the advantage stage (an adapter never fills them)."""


@dataclass
class GRPOBatch:
    """The global generation batch of one step, as the advantage-stage hooks and ``observe`` see it.

    Groups are formed by prompt id, never by position: completions of one prompt form one group
    wherever they sit in the batch and however many there are.

    Attributes:
        prompt_ids: ``(N,)`` int64 dataset index of each completion's prompt.
        rewards: ``(N,)`` float rewards (after ``shape_rewards`` once shaping has run).
        unshaped_rewards: ``(N,)`` the trainer's rewards as the advantage stage received them, before any
            ``shape_rewards`` (set by the core when the stage starts; None before). A method that estimates
            how often a prompt is solved reads these, not the shaped ``rewards``.
        reward_components: ``(N, K)`` float per-reward-function values; NaN where a function did not
            apply. ``None`` when the trainer has a single scalar reward only.
        reward_names: ``K`` names of the reward components.
        reward_weights: ``(K,)`` weights the trainer uses to sum the components.
        completion_ids: ``(N, T)`` int64 completion tokens, right-padded.
        completion_mask: ``(N, T)`` float, 1 on real completion tokens.
        old_log_probs: ``(N, T)`` behaviour-policy log-probs of the completion tokens, if known.
            Adapters provide them whenever an enabled method lists ``"old_log_probs"`` in
            :meth:`Method.requires` (computing them if the trainer itself would not).
        ref_log_probs: ``(N, T)`` reference-policy log-probs, if the trainer has a reference model.
        prompts: ``N`` prompts (text or chat messages), if the trainer has them.
        completions: ``N`` decoded completions, if the trainer has them.
        rows: ``N`` dataset rows (dicts of every column), if the trainer has them.
        step: optimiser steps taken so far.
        total_steps: optimiser steps of the whole run (the trainer's ``max_steps``); None when the
            adapter does not know it.
        parallel: data-parallel context (rank, world size, whether the batch is already global).
        advantages: ``(N,)`` or ``(N, T)``, set once the advantage hooks have run.
        token_weights: ``(N, T)`` product of the ``mask_tokens`` outputs (None when no method masks).
        row_data: per-completion tensors (first dimension ``N``) that methods attach during the
            advantage stage; adapters carry them with the rows to the loss stage (``LossInputs.row_data``).
        old_entropies: ``(N, T)`` token entropies of the behaviour policy, when a method reads them.
        old_log_probs_at: ``{temperature: (N, T)}`` behaviour-policy log-probs of the sampled tokens at
            other temperatures (a method lists its temperatures in ``Needs.temperatures``).
        gradient_statistics: the gradient statistics of the optimiser step being taken
            (:class:`GradientStatistics`), set by the adapter before ``scale_update`` runs (and kept for
            ``observe``); None otherwise. Batch field ``gradient_statistics``.
        probes: ``{name: OldPolicyProbe}`` the old policy's forward over the batch, streamed in chunks, for
            the requests methods declare in ``Needs(probes={name: ProbeRequest(...)})``
            (:mod:`grpo_plugins.probe`; trainer feature ``old_policy_probe``).
        steps: the per-step records of multi-turn trajectories (:class:`grpo_plugins.steps.Steps`: row,
            token span, trajectory, turn, step reward, state key, ``(S,)`` each), when a method reads them.
        update_preview: the optimiser's coming update of the LM head (:class:`grpo_plugins.probe.UpdatePreview`)
            when a request sets ``update_preview=True`` (trainer feature ``update_preview``); None otherwise.
    """

    prompt_ids: torch.Tensor
    rewards: torch.Tensor
    reward_components: torch.Tensor | None = None
    reward_names: tuple[str, ...] = ()
    reward_weights: torch.Tensor | None = None
    completion_ids: torch.Tensor | None = None
    completion_mask: torch.Tensor | None = None
    old_log_probs: torch.Tensor | None = None
    ref_log_probs: torch.Tensor | None = None
    prompts: list[Any] | None = None
    completions: list[Any] | None = None
    rows: list[dict] | None = None
    step: int = 0
    total_steps: int | None = None
    parallel: ParallelContext = field(default_factory=ParallelContext)
    advantages: torch.Tensor | None = None
    token_weights: torch.Tensor | None = None
    row_data: dict[str, torch.Tensor] = field(default_factory=dict)
    old_entropies: torch.Tensor | None = None
    old_log_probs_at: dict[float, torch.Tensor] = field(default_factory=dict)
    gradient_statistics: "GradientStatistics | None" = None
    probes: dict[str, Any] = field(default_factory=dict)
    update_preview: Any = None
    steps: "Steps | None" = None
    unshaped_rewards: torch.Tensor | None = None

    @property
    def num_completions(self) -> int:
        """``N``."""
        return int(self.prompt_ids.shape[0])

    @cached_property
    def _groups(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        unique_ids, inverse, counts = torch.unique(
            self.prompt_ids, sorted=True, return_inverse=True, return_counts=True
        )
        return unique_ids, inverse, counts

    @property
    def group_index(self) -> torch.Tensor:
        """``(N,)`` int64 group of each completion, in ``[0, G)`` (groups ordered by prompt id)."""
        return self._groups[1]

    @property
    def group_prompt_ids(self) -> torch.Tensor:
        """``(G,)`` int64 prompt id of each group."""
        return self._groups[0]

    @property
    def group_sizes(self) -> torch.Tensor:
        """``(G,)`` int64 completions in each group."""
        return self._groups[2]

    @property
    def num_groups(self) -> int:
        """``G``."""
        return int(self._groups[0].shape[0])

    def require_group_size(self, minimum: int, why: str) -> None:
        """Raise ``ValueError`` naming the prompt ids of groups smaller than ``minimum`` (``why``: the reason)."""
        small = self.group_sizes < minimum
        if bool(small.any()):
            ids, sizes = self.group_prompt_ids[small][:5].tolist(), sorted(set(self.group_sizes[small].tolist()))
            have = sizes[0] if len(sizes) == 1 else sizes
            raise ValueError(f"{why}: needs at least {minimum} completions per prompt; prompt id(s) {ids} have {have}")

    @property
    def token_mask(self) -> torch.Tensor:
        """``(N, T)`` float completion mask; raises if the trainer gave no completion tokens."""
        if self.completion_mask is None:
            raise ValueError("this batch carries no completion tokens (completion_mask is None)")
        return self.completion_mask.float()


@dataclass
class LossInputs:
    """One loss micro-batch, as ``policy_surrogate``, ``gate_loss`` and ``loss_terms`` see it.

    Rows are a shuffled slice of the generation batch: group-level quantities must have been
    attached per row during the advantage stage (``GRPOBatch.row_data``).

    Attributes:
        log_probs: ``(B, T)`` current-policy log-probs of the completion tokens (with gradient).
        old_log_probs: ``(B, T)`` behaviour-policy log-probs (equal to ``log_probs.detach()`` when
            the trainer is fully on-policy).
        advantages: ``(B, T)`` advantages broadcast to tokens.
        mask: ``(B, T)`` 0/1 loss mask of the trainer (its completion mask): the normaliser. The
            ``mask_tokens`` weights are not in it; adapters multiply the per-token policy loss by them
            after the loss hooks (or fold them into the advantages when the trainer's own loss runs).
        ref_log_probs: ``(B, T)`` reference log-probs when the trainer has them.
        entropies: ``(B, T)`` token entropies when the trainer computes them.
        row_data: per-row tensors attached during the advantage stage (first dimension ``B``).
        clip_low: the trainer's lower clip range (ratio clipped below at ``1 - clip_low``).
        clip_high: the trainer's upper clip range (ratio clipped above at ``1 + clip_high``).
        step: optimiser steps taken so far.
        group_index: ``(B,)`` int64 group of each row in the generation batch, for objectives over
            whole groups (feature ``whole_groups``). Designed, not yet filled by the adapters.
    """

    log_probs: torch.Tensor
    old_log_probs: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    ref_log_probs: torch.Tensor | None = None
    entropies: torch.Tensor | None = None
    row_data: dict[str, torch.Tensor] = field(default_factory=dict)
    clip_low: float = 0.2
    clip_high: float = 0.2
    step: int = 0
    group_index: torch.Tensor | None = None

    @property
    def log_ratio(self) -> torch.Tensor:
        """``(B, T)`` ``log_probs - old_log_probs``."""
        return self.log_probs - self.old_log_probs

    @property
    def ratio(self) -> torch.Tensor:
        """``(B, T)`` importance ratio ``exp(log_probs - old_log_probs)``."""
        return torch.exp(self.log_ratio)

    def local_groups(self, method: str) -> tuple[torch.Tensor, int]:
        """``(B,)`` group ids renumbered ``0 .. G'-1`` within this micro-batch, and ``G'``, for a whole-group
        objective (trainer feature ``whole_groups``).

        Raises:
            ValueError: naming ``method``, when the adapter gave no ``group_index``.
        """
        if self.group_index is None:
            raise ValueError(f"{method}: LossInputs.group_index is missing; the adapter must keep whole groups in "
                             "each micro-batch (trainer feature 'whole_groups')")
        ids, inverse = torch.unique(self.group_index, return_inverse=True)
        return inverse, int(ids.numel())


NORMALISERS: tuple[str, ...] = ("token", "sequence", "group", "sum")


@dataclass(frozen=True)
class LossTotals:
    """The normalisers of one optimiser step, counted over the whole global batch the step consumes
    (every micro-batch, every rank), so that the micro-batch sums of :meth:`LossTerm.reduce` add up to
    the step's mean.

    Attributes:
        tokens: real completion tokens (the completion mask's sum).
        sequences: completions.
        groups: groups (distinct prompt ids).
    """

    tokens: float
    sequences: float
    groups: float


@dataclass
class LossTerm:
    """A loss term that declares how it is normalised (hook ``loss_objectives``).

    Attributes:
        values: ``(B, T)`` per-token values or ``(B,)`` per-sequence values (to be minimised).
        normaliser: ``token``: sum over real tokens / all tokens of the step; ``sequence``: each row's
            token mean (or its ``(B,)`` value), summed / all sequences; ``group``: each row's sequence
            value divided by its group's size, summed / all groups (the mean over groups of the group
            means); ``sum``: the plain sum over real tokens (or rows).
    """

    values: torch.Tensor
    normaliser: Literal["token", "sequence", "group", "sum"] = "token"

    def __post_init__(self):
        if self.normaliser not in NORMALISERS:
            raise ValueError(f"LossTerm normaliser must be one of {NORMALISERS}, got {self.normaliser!r}")

    def reduce(self, mask: torch.Tensor, totals: LossTotals, group_size: torch.Tensor | None = None) -> torch.Tensor:
        """This micro-batch's share of the step's term, a scalar.

        Args:
            mask: ``(B, T)`` completion mask of the micro-batch (padding is ignored, NaN included).
            totals: the step's token, sequence and group counts.
            group_size: ``(B,)`` size of each row's group in the global batch (``group`` only).

        Formula (``v`` the values, ``m`` the mask, ``n_g(i)`` the size of row ``i``'s group)::

            token:    sum_{i,t} m v / tokens
            sequence: sum_i s_i / sequences,            s_i = sum_t m v / max(1, sum_t m)  (or v_i)
            group:    sum_i s_i / n_g(i) / groups
            sum:      sum_{i,t} m v  (or sum_i v_i)
        """
        keep = mask > 0
        values = self.values
        if values.dim() == 2:
            masked = torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))
            if self.normaliser == "token":
                return masked.sum() / totals.tokens
            if self.normaliser == "sum":
                return masked.sum()
            per_sequence = masked.sum(-1) / keep.sum(-1).clamp(min=1).to(values.dtype)
        elif self.normaliser == "token":
            raise ValueError("a 'token' LossTerm needs (B, T) per-token values")
        else:
            per_sequence = values
        if self.normaliser == "sum":
            return per_sequence.sum()
        if self.normaliser == "sequence":
            return per_sequence.sum() / totals.sequences
        if group_size is None:
            raise ValueError("a 'group' LossTerm needs each row's group size")
        return (per_sequence / group_size.to(per_sequence.dtype)).sum() / totals.groups


@dataclass(frozen=True)
class RunContext:
    """The run as the ``setup`` hook sees it, once before the first step.

    Attributes:
        trainer: the adapter's name (e.g. ``"TRL GRPOTrainer"``).
        seed: the run's seed; :meth:`grpo_plugins.Method.step_generator` derives each step's
            generator from it. None when the adapter does not know it.
        tokenizer: the trainer's tokenizer (or processor), None when there is none.
        settings: trainer-neutral settings of the run (see :data:`grpo_plugins.needs.SETTINGS`).
        dataset_size: prompts in the training dataset, None for a stream.
        total_steps: optimiser steps of the whole run, None when unknown.
        parallel: data-parallel context of this process.
    """

    trainer: str
    seed: int | None = None
    tokenizer: Any = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    dataset_size: int | None = None
    total_steps: int | None = None
    parallel: ParallelContext = field(default_factory=ParallelContext)
