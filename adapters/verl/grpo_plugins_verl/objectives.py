"""Loss terms with their own normaliser, whole groups in micro-batches, ``setup`` and the run seed on verl
(features ``loss_normalisers``, ``whole_groups``, ``method_setup``, ``step_generator``; loss field ``group_index``).

- **Normalisers.** verl normalises its loss per mini-batch (one optimiser step) with the global batch
  info ``ppo_loss`` reads from the micro-batch: ``batch_num_tokens`` (real tokens of the mini-batch
  over every data-parallel rank), ``global_batch_size`` (its rows) and ``dp_size``. Each micro-batch adds
  ``LossTerm.reduce(mask, totals) * dp_size`` with those totals (groups: rows / ``rollout.n``), exactly as
  ``agg_loss`` scales the policy loss: the shares of every micro-batch and rank add up to the term over
  the mini-batch. Each share is logged as ``plugins/<method>/<term>``, aggregated like ``actor/pg_loss``.
- **Whole groups.** The trainer carries each row's group and group size to the loss with the rows
  (TransferQueue fields), and, when a method needs whole groups, orders the actor's batch before
  ``update_actor``: groups spread over the data-parallel ranks (balanced by tokens, as ``_balance_batch``
  balances rows), each group's rows together, so verl's consecutive mini- and micro-batches hold whole
  groups when their sizes are multiples of ``rollout.n`` (checked at start-up). With
  ``actor.shuffle=True`` the groups are shuffled (seeded by ``actor.data_loader_seed`` and the step) and
  verl's row shuffle is off for that update. ``use_dynamic_bsz=True`` packs micro-batches by tokens,
  which splits groups: refused. Without such a method nothing is reordered.
- **Setup and seed.** ``setup`` runs on the driver once the dataset is loaded and, with the same
  context (tokenizer, seed, settings), in each actor worker at its first loss call. The run seed is
  ``data.seed`` (1 when unset), the seed of the trainer's prompt sampling.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import torch

from grpo_plugins import Composition, CompositionError, LossTerm, LossTotals, ParallelContext, RunContext
from grpo_plugins.objectives import contiguous_group_order, incomplete_groups, reduce_objectives, whole_group_methods

GROUP_INDEX = "grpo_plugins_group_index"
"""TransferQueue field: ``(B,)`` int64 group of each row in the step's batch (verl's padding rows: groups of one)."""
GROUP_SIZE = "grpo_plugins_group_size"
"""TransferQueue field: ``(B,)`` int64 size of each row's group in the step's batch."""
FEATURES = ("method_setup", "step_generator", "loss_normalisers", "whole_groups")
"""What this module provides (the ``grpo_plugins`` trainer runs it)."""


def run_seed(config: Any) -> int:
    """The run's seed: ``data.seed``, 1 when unset (the seed of the trainer's prompt sampling)."""
    return int(config.data.get("seed", None) or 1)


def actor_dp_size(config: Any) -> int:
    """Data-parallel ranks of the actor: GPUs over the model-parallel size (Ulysses for FSDP; tensor x
    pipeline x context for Megatron)."""
    actor = config.actor_rollout_ref.actor
    world = int(config.trainer.n_gpus_per_node) * int(config.trainer.nnodes)
    if str(actor.get("strategy", "fsdp")) == "megatron":
        megatron = actor.get("megatron", {}) or {}
        parallel = 1
        for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
            parallel *= int(megatron.get(key, 1) or 1)
    else:
        parallel = int(actor.get("ulysses_sequence_parallel_size", 1) or 1)
    return max(world // max(parallel, 1), 1)


def whole_group_blockers(config: Any) -> list[str]:
    """The verl settings under which a micro-batch cannot hold whole groups (empty: it can)."""
    actor, n = config.actor_rollout_ref.actor, int(config.actor_rollout_ref.rollout.n)
    if bool(actor.get("use_dynamic_bsz", False)):
        return ["actor_rollout_ref.actor.use_dynamic_bsz=True (verl packs micro-batches by token count, which splits "
                "groups; set use_dynamic_bsz=False and ppo_micro_batch_size_per_gpu to a multiple of rollout.n)"]
    dp, problems = actor_dp_size(config), []
    micro = actor.get("ppo_micro_batch_size_per_gpu", None)
    if micro is None and actor.get("ppo_micro_batch_size", None) is not None:
        micro = int(actor.ppo_micro_batch_size) // dp
    if micro is not None and int(micro) % n:
        problems.append(f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={micro} is not a multiple of "
                        f"actor_rollout_ref.rollout.n={n} (a micro-batch must hold whole groups)")
    mini = actor.get("ppo_mini_batch_size", None)
    if mini is not None and int(mini) % dp:
        problems.append(f"actor_rollout_ref.actor.ppo_mini_batch_size={mini} prompts do not split evenly over the "
                        f"{dp} data-parallel ranks (each rank's share of a mini-batch must be whole groups)")
    return problems


def planning_problems(composition: Composition) -> list[str]:
    """Whole groups with ``allocate_rollouts`` (groups of other sizes than ``rollout.n``, which verl's
    fixed-size micro-batches cannot keep whole)."""
    methods = whole_group_methods(composition)
    if methods and composition.implements("allocate_rollouts"):
        return [f"method(s) {methods} need whole groups in each micro-batch, which the adapter forms from blocks of "
                f"actor_rollout_ref.rollout.n rows; method(s) {composition.providers('allocate_rollouts')} give prompts "
                "other numbers of completions (hook allocate_rollouts)"]
    return []


def run_context(config: Any, tokenizer: Any, dataset_size: int | None, total_steps: int | None,
                settings: Mapping[str, Any]) -> RunContext:
    """The ``setup`` context of a verl run (the driver's; a worker replaces ``parallel``)."""
    from grpo_plugins_verl.capabilities import TRAINER

    return RunContext(trainer=TRAINER, seed=run_seed(config), tokenizer=tokenizer, settings=dict(settings),
                      dataset_size=dataset_size, total_steps=total_steps)


def set_up_worker(runtime: Any, context: RunContext | None, dp_size: int, dp_group: Any = None) -> None:
    """Run ``setup`` once in this actor worker, with the driver's context and this rank's place."""
    if context is None or runtime.set_up:
        return
    import torch.distributed as dist

    rank = dist.get_rank(dp_group) if dist.is_available() and dist.is_initialized() else 0
    runtime.composition.run_setup(dataclasses.replace(
        context, parallel=ParallelContext(rank=rank, world_size=int(dp_size), gathered=False)))
    runtime.set_up = True


def group_fields(group_index: torch.Tensor, group_sizes: torch.Tensor, rows: torch.Tensor, num_rows: int) -> dict[str, torch.Tensor]:
    """The :data:`GROUP_INDEX` and :data:`GROUP_SIZE` fields of the step's ``num_rows`` verl rows.

    Args:
        group_index: ``(N,)`` group of each completion of the advantage stage (``GRPOBatch.group_index``).
        group_sizes: ``(G,)`` completions per group (``GRPOBatch.group_sizes``).
        rows: ``(N,)`` verl row of each completion; the other rows (verl's padding) get groups of one.
    """
    index = torch.arange(num_rows, dtype=torch.long) + int(group_sizes.numel())  # padding rows: their own group
    size = torch.ones(num_rows, dtype=torch.long)
    rows = rows.cpu()
    index[rows] = group_index.cpu().long()
    size[rows] = group_sizes.cpu().long().index_select(0, group_index.cpu().long())
    return {GROUP_INDEX: index, GROUP_SIZE: size}


def whole_group_order(groups: torch.Tensor, sizes: torch.Tensor, workloads: Sequence[float], dp_size: int,
                      group_size: int, methods: Sequence[str], generator: torch.Generator | None = None) -> list[int]:
    """The actor batch's row order for whole-group methods: each data-parallel rank's share holds whole
    groups (balanced by ``workloads``, equal counts), each group's rows together, the groups of a rank
    shuffled with ``generator`` when given.

    Args:
        groups, sizes: ``(R,)`` :data:`GROUP_INDEX` and :data:`GROUP_SIZE` of the rows.
        workloads: ``R`` verl workloads of the rows (``calculate_workload`` of the sequence lengths).
        group_size: ``rollout.n``, the size every group must have.

    Raises:
        CompositionError: a group is not of ``group_size`` rows (verl added padding rows, or a sampler
            changed the number of prompts), or the groups do not split evenly over the ranks.
    """
    from verl.utils.seqlen_balancing import get_seqlen_balanced_partitions

    ids, inverse = torch.unique(groups, return_inverse=True)
    if bool((sizes != group_size).any()) or ids.numel() % dp_size:
        raise CompositionError(
            f"method(s) {list(methods)} need whole groups in each micro-batch, but this step's actor batch has "
            f"{ids.numel()} groups of sizes {sorted(set(sizes.tolist()))} (needed: groups of rollout.n={group_size}, "
            f"a multiple of the {dp_size} data-parallel ranks); verl pads a batch whose rows are not a multiple of "
            "ppo_mini_batch_size x rollout.n, and a prompt sampler may submit another number of prompts than "
            "data.train_batch_size"
        )
    work = torch.zeros(ids.numel(), dtype=torch.float64).index_add_(0, inverse, torch.as_tensor(workloads, dtype=torch.float64))
    partitions = get_seqlen_balanced_partitions(work.tolist(), k_partitions=dp_size, equal_size=True)
    ordered = []
    for part in partitions:  # one entry per data-parallel rank
        part = torch.tensor(sorted(part), dtype=torch.long)
        ordered.append(part if generator is None else part[torch.randperm(part.numel(), generator=generator)])
    return contiguous_group_order(inverse, torch.cat(ordered)).tolist()


def check_micro_batch(group_index: torch.Tensor, group_size: torch.Tensor, methods: Sequence[str]) -> None:
    """Refuse a loss micro-batch holding part of a group when ``methods`` need whole groups."""
    split = incomplete_groups(group_index, group_size)
    if bool(split.any()):
        raise CompositionError(
            f"method(s) {list(methods)} need whole groups in each loss micro-batch, but {int(split.sum())} of its "
            f"{split.numel()} rows belong to groups split over micro-batches; keep actor_rollout_ref.actor."
            "use_dynamic_bsz=False and ppo_micro_batch_size_per_gpu a multiple of actor_rollout_ref.rollout.n"
        )


def objective_loss(
    objectives: Mapping[str, LossTerm], mask: torch.Tensor, batch_info: Mapping[str, Any],
    group_size: torch.Tensor | None, rollout_n: int,
) -> tuple[torch.Tensor | float, dict[str, torch.Tensor]]:
    """This micro-batch's share of the ``loss_objectives`` terms: ``(sum, {name: share})``.

    Totals as verl's ``agg_loss`` takes them from ``batch_info`` (``config.global_batch_info``): tokens
    ``batch_num_tokens``, sequences ``global_batch_size``, groups ``global_batch_size / rollout_n``, and
    the shares scaled by ``dp_size``; without global info (a single rank), the micro-batch's own counts.

    Args:
        mask: ``(B, T)`` verl's response mask of the micro-batch.
        group_size: ``(B,)`` size of each row's group (default ``rollout_n``).
    """
    if not objectives:
        return 0.0, {}
    dp = int(batch_info.get("dp_size", None) or 1)
    tokens = batch_info.get("batch_num_tokens", None)
    sequences = batch_info.get("global_batch_size", None)
    tokens = float(mask.sum()) if tokens is None else float(tokens)
    sequences = float(mask.shape[0]) if sequences is None else float(sequences)
    totals = LossTotals(tokens=max(tokens, 1.0), sequences=max(sequences, 1.0), groups=max(sequences / rollout_n, 1e-12))
    if group_size is None:
        group_size = torch.full((mask.shape[0],), rollout_n, device=mask.device)
    return reduce_objectives(objectives, mask, totals, group_size.to(mask.device), scale=float(dp))
