"""Loss terms with their own normaliser, whole-group micro-batches, reference log-probs at ``beta=0``
and the ``setup`` call, for :class:`~grpo_plugins_trl.PluginGRPOTrainer` (features
``loss_normalisers``, ``whole_groups``, ``method_setup``, ``step_generator``; loss field ``group_index``).

- **Normalisers.** The advantage stage attaches each row's group (by prompt id) and group size and the
  generation batch's sequence and group counts; TRL already counts its tokens (``num_items_in_batch``).
  One optimiser step consumes ``GA / steps_per_generation`` of the generation batch, so the step's
  totals are these counts times that share (TRL's ``dapo`` normaliser). Each micro-batch adds
  ``LossTerm.reduce(mask, totals) * world_size`` to its loss (DDP averages gradients over ranks): the
  micro-batch shares add up to the step's value, whatever the micro-batch sizes.
- **Whole groups.** When a method needs them, each generation batch is shuffled by groups (TRL's
  blocks of ``num_generations`` rows), not rows, before TRL splits it into micro-batches, and
  ``per_device_train_batch_size`` must be a multiple of ``num_generations`` (checked at start-up).
  Without such a method, TRL's own ``_prepare_inputs`` runs: batching is unchanged.
- **Reference log-probs.** TRL computes them only when ``beta != 0``; a method that reads them gets
  them at ``beta=0`` from a frozen copy of the initial policy (PEFT: the adapter disabled, as TRL).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import torch

from grpo_plugins import LossTotals, ParallelContext, RunContext, TrainerCapabilities
from grpo_plugins.objectives import reduce_objectives, whole_group_methods

if TYPE_CHECKING:
    from grpo_plugins import Composition, GRPOBatch
    from grpo_plugins.stages import LossParts
    from grpo_plugins_trl.trainer import PluginGRPOTrainer

logger = logging.getLogger("grpo_plugins_trl")
GROUP_INDEX_KEY = "grpo_plugins.group_index"
GROUP_SIZE_KEY = "grpo_plugins.group_size"
SEQUENCES_KEY = "grpo_plugins.num_sequences"  # 0-d: survives TRL's shuffle and split unchanged
GROUPS_KEY = "grpo_plugins.num_groups"
FEATURES = ("method_setup", "step_generator", "loss_normalisers", "whole_groups")
ROUND_PLANNING = ("sample_prompts", "allocate_rollouts")


def with_objectives(caps: TrainerCapabilities, args: Any) -> TrainerCapabilities:
    """``caps`` plus what this module provides; whole groups need micro-batches of whole groups."""
    caps = dataclasses.replace(caps.with_features(*FEATURES), loss_fields=caps.loss_fields | {"group_index"})
    if args.per_device_train_batch_size % args.num_generations:
        caps = caps.without("whole_groups", "group_index", because=f"per_device_train_batch_size="
                            f"{args.per_device_train_batch_size} is not a multiple of num_generations="
                            f"{args.num_generations} (a micro-batch must hold whole groups)")
    return caps


def objective_problems(args: Any, composition: "Composition") -> list[str]:
    """Start-up problems the capability check cannot see: whole groups with round planning (groups of
    other sizes than ``num_generations``)."""
    methods, planners = whole_group_methods(composition), [h for h in ROUND_PLANNING if composition.implements(h)]
    if methods and planners:
        return [f"method(s) {methods} need whole groups in each micro-batch, which the adapter forms from TRL's "
                f"blocks of num_generations={args.num_generations} rows; method(s) "
                f"{sorted({n for h in planners for n in composition.providers(h)})} plan the rounds (hooks "
                f"{planners}), which changes the group sizes"]
    return []


def start(trainer: "PluginGRPOTrainer") -> None:
    """At the end of ``__init__``: the reference model if a method needs it at ``beta=0``, then ``setup``."""
    from grpo_plugins_trl.trainer import trl_capabilities

    c, args, acc = trainer.composition, trainer.args, trainer.accelerator
    trainer._plugin_whole_groups = bool(whole_group_methods(c))
    readers = sorted(set(c.needers("loss_fields", "ref_log_probs")) | set(c.requirers("ref_log_probs")))
    trainer._plugin_reference = trainer.beta == 0.0 and bool(readers)
    if trainer._plugin_reference:
        _load_reference(trainer, readers)
    dataset = trainer.train_dataset
    c.run_setup(RunContext(
        trainer="TRL GRPOTrainer", seed=args.seed, tokenizer=trainer.processing_class,
        settings=trl_capabilities(args).settings, dataset_size=len(dataset) if hasattr(dataset, "__len__") else None,
        total_steps=trainer.total_steps(), parallel=ParallelContext(acc.process_index, acc.num_processes, gathered=True),
    ))


def _load_reference(trainer: "PluginGRPOTrainer", readers: list[str]) -> None:
    """A frozen copy of the initial policy as ``trainer.ref_model`` (TRL builds none at ``beta=0``)."""
    from accelerate.utils import is_peft_model

    if is_peft_model(trainer.model):
        return  # the adapter is disabled for the reference pass, as TRL does
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        from grpo_plugins import CompositionError

        raise CompositionError(f"method(s) {readers} read reference log-probs, which the adapter computes at beta=0 from "
                               "a copy of the policy; DeepSpeed ZeRO-3 partitions it. Set beta > 0 (TRL loads the "
                               "reference model itself) or use ZeRO-2")
    reference = copy.deepcopy(trainer.model).eval().requires_grad_(False)
    if trainer.is_deepspeed_enabled:
        from trl.models import prepare_deepspeed

        reference = prepare_deepspeed(reference, trainer.accelerator)
    elif trainer.is_fsdp_enabled:
        from trl.models import prepare_fsdp

        reference = prepare_fsdp(reference, trainer.accelerator)
    else:
        reference = trainer.accelerator.prepare_model(reference, evaluation_mode=True)
    trainer.ref_model = reference


def add_reference_log_probs(trainer: "PluginGRPOTrainer", out: dict) -> None:
    """``out["ref_per_token_logps"]`` at ``beta=0``, computed as TRL computes it at ``beta != 0``; TRL's own
    loss ignores it at ``beta=0``."""
    from trl.models.utils import disable_gradient_checkpointing

    from grpo_plugins_trl.trainer import FORWARD_KEYS

    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    attention = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
    kwargs = {key: out[key] for key in FORWARD_KEYS if key in out}
    model, context = trainer.ref_model, contextlib.nullcontext()
    if model is None:  # PEFT: the base model is the reference
        from trl.trainer.grpo_trainer import use_adapter

        model = trainer.model
        unwrapped = trainer.accelerator.unwrap_model(model)
        context = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
    with torch.no_grad(), disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs):
        with context:
            out["ref_per_token_logps"], _, _ = trainer._get_per_token_logps_and_entropies(
                model, ids, attention, out["completion_ids"].size(1),
                batch_size=trainer.args.per_device_train_batch_size, **kwargs)


def attach(trainer: "PluginGRPOTrainer", out: dict, batch: "GRPOBatch", local: slice) -> None:
    """After the advantage stage: each row's group and group size, and the batch's counts (0-d)."""
    out[GROUP_INDEX_KEY] = batch.group_index[local].to(out["completion_ids"].device)
    out[GROUP_SIZE_KEY] = batch.group_sizes.index_select(0, batch.group_index)[local].to(out["completion_ids"].device)
    out[SEQUENCES_KEY] = torch.tensor(float(batch.num_completions))
    out[GROUPS_KEY] = torch.tensor(float(batch.num_groups))
    if trainer._plugin_whole_groups and batch.num_groups * trainer.num_generations != batch.num_completions:
        logger.warning("some prompt ids occur in several generation groups of the batch: whole-group objectives see "
                       "each of those groups' rows in different micro-batches")


def _shuffle_groups(batch: dict, group_size: int) -> dict:
    """TRL's ``shuffle_sequence_dict`` with whole blocks of ``group_size`` rows permuted."""
    rows = len(next(v for v in batch.values() if v is not None and not (isinstance(v, torch.Tensor) and v.ndim == 0)))
    order = (torch.randperm(rows // group_size)[:, None] * group_size + torch.arange(group_size)).flatten()

    def permute(value):
        if value is None or (isinstance(value, torch.Tensor) and value.ndim == 0):
            return value
        return value[order] if isinstance(value, torch.Tensor) else [value[i] for i in order]

    return {key: permute(value) for key, value in batch.items()}


def prepare_whole_groups(trainer: "PluginGRPOTrainer", generation_batch: Any) -> dict:
    """TRL's ``_prepare_inputs`` in training mode, shuffling groups instead of rows."""
    from trl.trainer.utils import split_pixel_values_by_grid, split_tensor_dict, unsplit_pixel_values_by_grid

    args = trainer.args
    if trainer._step % (args.steps_per_generation * trainer.num_iterations) == 0 or trainer._buffered_inputs is None:
        batch = split_pixel_values_by_grid(trainer._generate_and_score_completions(generation_batch))
        batch = _shuffle_groups(batch, trainer.num_generations)
        trainer._buffered_inputs = [unsplit_pixel_values_by_grid(b) for b in split_tensor_dict(batch, args.steps_per_generation)]
    return trainer._buffered_inputs[trainer._step % args.steps_per_generation]


def objective_loss(trainer: "PluginGRPOTrainer", parts: "LossParts", mask: torch.Tensor, inputs: dict, mode: str):
    """This micro-batch's share of the ``loss_objectives`` terms (0 without any), logged as
    ``plugins/<method>/<term>`` (the share times the micro-batches and ranks of the step)."""
    if not parts.objectives:
        return 0.0
    acc, args = trainer.accelerator, trainer.args
    world = acc.num_processes
    share = trainer.current_gradient_accumulation_steps / args.steps_per_generation if mode == "train" else 1.0
    rows = float(mask.shape[0] * world)
    sequences = float(inputs.get(SEQUENCES_KEY, rows))
    totals = LossTotals(
        tokens=float(inputs["num_items_in_batch"].clamp(min=1.0)) * share,
        sequences=sequences * share,
        groups=float(inputs.get(GROUPS_KEY, sequences / trainer.num_generations)) * share,
    )
    size = inputs.get(GROUP_SIZE_KEY)
    size = torch.full((mask.shape[0],), trainer.num_generations, device=mask.device) if size is None else size
    micro_batches = world * (trainer.current_gradient_accumulation_steps if mode == "train" else 1)
    total, shares = reduce_objectives(parts.objectives, mask, totals, size, scale=world)
    for name, value in shares.items():
        method, key = name.split("/", 1)
        logged = acc.gather(value.detach().reshape(1)).mean() * micro_batches / world
        trainer._metrics[mode][f"plugins/{method}/{key}"].append(logged.item())
    return total
