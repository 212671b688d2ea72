"""``PluginGRPOTrainer``: TRL's ``GRPOTrainer`` with the grpo-plugins hooks wired in (TRL 1.16).

Round planning replaces ``_get_train_sampler`` (:mod:`grpo_plugins_trl.sampler`); ``augment_prompts``
and the advantage stage wrap ``_generate_and_score_completions`` and run on the GLOBAL generation
batch; the loss hooks replace ``_compute_loss`` (:mod:`grpo_plugins_trl.loss`) only when a method
implements one; ``observe`` runs after the optimiser step that consumed a generation batch. With
``shared_prefix=True`` every log-prob forward encodes each prompt once per group
(:mod:`grpo_plugins_trl.prefix`). The adapter holds no method maths: it moves tensors between TRL and
the composition (README: where each hook runs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import gather_object
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from grpo_plugins import GRPOBatch, Method, ParallelContext, PromptRound
from grpo_plugins.errors import CompositionError
from grpo_plugins.needs import TrainerCapabilities
from grpo_plugins.surrogates import weight_token_advantages
from grpo_plugins_trl import (
    checks, injection, objectives, output_rows, probe, refill, statistics, turns, update_control,
)
from grpo_plugins_trl.prefix import install_grouped_attention, refuse_shared_prefix

logger = logging.getLogger("grpo_plugins_trl")
STATE_FILE = "grpo_plugins_state.pt"
ROW_DATA_PREFIX = "grpo_plugins.row_data."
TOKEN_WEIGHTS_KEY = "grpo_plugins.token_weights"
INDEX_KEY = "grpo_plugins.dataset_index"  # carried from the dataset to the trainer, removed before TRL sees rows
SKIPPED_METRIC = "plugins/skipped_empty_batches"
# TRL's loss types as the core's neutral loss_aggregation setting (the adapter's own loss runs every one).
LOSS_AGGREGATION = {"grpo": "sequence_mean", "sapo": "sequence_mean", "bnpo": "token_mean", "dapo": "token_mean",
                    "cispo": "token_mean", "vespo": "token_mean", "dr_grpo": "sequence_sum", "luspo": "sequence_sum"}
# Multimodal inputs TRL's forward pass takes from its output dict.
FORWARD_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
                "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


@dataclass
class PluginGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the run's method list, so a TRL YAML config can carry ``grpo_plugins:``.

    Only :class:`PluginGRPOTrainer` runs the methods: a config with a non-empty ``grpo_plugins``
    given to any other trainer (e.g. plain ``trl.GRPOTrainer``) raises ``ValueError`` when that
    trainer is built, instead of training without the methods.
    """

    # Typed list[str] for TRL's argument parser (names on the command line); YAML configs and Python
    # code may also give {name: {config}} mappings.
    grpo_plugins: list[str] | None = field(
        default=None,
        metadata={
            "help": "The grpo-plugins methods to enable, in composition order: names or {name: {config}} "
            "mappings, e.g. ['knapsack_rl', 'ngrpo', {'unlikeliness': {'rank_penalty': 0.5}}]."
        },
    )
    grpo_plugins_fresh_state: bool = field(
        default=False,
        metadata={
            "help": "Resume from a checkpoint that holds no grpo_plugins_state.pt (e.g. one written by a run "
            "without these methods) with the methods' state started fresh. Without it such a resume is "
            "refused when an enabled method keeps state."
        },
    )
    shared_prefix: bool = field(
        default=False,
        metadata={
            "help": "Encode each prompt once per group in the log-prob forward passes (old, reference and "
            "training), as Prefix Grouper does (arXiv:2506.05433): same log-probs and gradients, less work "
            "when prompts are long. Needs the prefix-grouper package and a text-only model with 'sdpa' "
            "attention (grpo_plugins_trl.prefix)."
        },
    )
    filter_groups: bool = field(
        default=False,
        metadata={
            "help": "Dynamic sampling (DAPO; verl's algorithm.filter_groups.enable): drop every group whose completions "
            "all have the same filter_groups_metric and refill the batch with new prompts inside the step "
            "(grpo_plugins_trl.refill)."
        },
    )
    filter_groups_metric: str = field(
        default="reward",
        metadata={"help": "What dynamic sampling compares within a group: 'reward' (the weighted reward) or the "
                  "name of one reward function (verl's algorithm.filter_groups.metric)."},
    )
    max_num_gen_batches: int = field(
        default=10,
        metadata={"help": "The most generation rounds per generation batch when groups are dropped (filter_groups or "
                  "a keep_rows method), the first included; 0: no limit (verl's algorithm.filter_groups."
                  "max_num_gen_batches)."},
    )
    on_refill_exhausted: str = field(
        default="error",
        metadata={"help": "A batch still short after max_num_gen_batches rounds: 'error' stops the run (verl's DAPO); "
                  "'keep_dropped' completes it with dropped groups and trains."},
    )

    def get_process_log_level(self) -> int:
        # transformers.Trainer.__init__ calls this on its args: the one moment a trainer takes the config.
        if (self.grpo_plugins or self.shared_prefix or self.filter_groups) and not getattr(self, "_taken_by_plugin_trainer", False):
            what = (f"grpo_plugins={self.grpo_plugins!r}" if self.grpo_plugins
                    else "shared_prefix=True" if self.shared_prefix else "filter_groups=True")
            raise ValueError(
                f"this PluginGRPOConfig enables {what}, which only grpo_plugins_trl.PluginGRPOTrainer runs; "
                "this trainer would train without it. Use PluginGRPOTrainer, or set grpo_plugins=None, "
                "shared_prefix=False and filter_groups=False"
            )
        return super().get_process_log_level()


class IndexedRows(torch.utils.data.Dataset):
    """A map-style dataset whose rows also carry their index (under ``INDEX_KEY``), so that the
    trainer knows which dataset index the sampler chose for each row."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], INDEX_KEY: int(index)}


def stable_prompt_id(prompt: Any) -> int:
    """A 63-bit id of a prompt's text (chat prompts are JSON-encoded): equal prompts get equal ids on
    every rank and in every run. Used when the dataset has no ``prompt_id`` column."""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, default=str)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


class _ObserveCallback(TrainerCallback):
    """Runs ``observe`` after the optimiser step that consumed a generation batch."""

    def __init__(self, trainer: "PluginGRPOTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._observe_finished_batches()


class PluginGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` running grpo-plugins methods.

    Args:
        *args, **kwargs: as for ``GRPOTrainer``.
        plugins: the method list (names, ``{name: {config}}``, ``Method`` instances). When None, the
            list is read from ``args.grpo_plugins`` (a :class:`PluginGRPOConfig`); giving both is an
            error. With no list, the trainer behaves exactly like ``GRPOTrainer``.

    Raises:
        CompositionError: at construction, for an unknown method, a bad config, two providers of a
            single-provider hook, or a TRL setting the enabled hooks cannot run with.
    """

    def __init__(self, *args: Any, plugins: list | None = None, **kwargs: Any):
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is None:  # GRPOTrainer builds a default config; read the same defaults
            config = GRPOConfig(output_dir="trainer_output")
        from_config = getattr(config, "grpo_plugins", None)
        if plugins is not None and from_config:
            raise CompositionError("give the method list either as plugins= or as args.grpo_plugins, not both")
        methods = plugins if plugins is not None else (from_config or [])
        # Built and checked before TRL loads models, so a bad run fails at once, every problem in one
        # error; `grpo-plugins check` runs this same check on a run config.
        dataset = kwargs.get("train_dataset", args[3] if len(args) > 3 else None)
        self.composition = checks.checked_composition(config, methods, dataset)
        shared_prefix = getattr(config, "shared_prefix", False)
        config._taken_by_plugin_trainer = True  # see PluginGRPOConfig.get_process_log_level
        try:
            super().__init__(*args, **kwargs)
        finally:
            config._taken_by_plugin_trainer = False
        if shared_prefix:
            refuse_shared_prefix(config, (self.model, self.ref_model))
            install_grouped_attention()
        c = self.composition
        self._plugin_pending: list[GRPOBatch] = []
        self.last_plugin_batch: GRPOBatch | None = None  # the global batch of the latest advantage stage
        self._plugin_gathered: dict[str, Any] = {}
        self._plugin_dataset_rows: list[dict] | None = None
        self._plugin_local_ids: list[int] = []
        self._plugin_skipped = False  # the current generation batch has no token to learn from
        # Nothing but the built-in ``grpo`` at TRL's own settings: GRPOTrainer's code path runs unchanged.
        self._plugin_passthrough = not c.user_methods and self._grpo_is_trls() and not refill.enabled(self.args, c)
        self._plugin_real_rows: int | None = None  # global rows before injection's filler rows (injection.py)
        if not self._plugin_passthrough:
            self.add_callback(_ObserveCallback(self))
        objectives.start(self)  # reference model at beta=0 if a method needs it; the setup hooks
        self._plugin_update_control = update_control.UpdateControl.install(self)  # scale_update, gradient statistics
        probe.check_model(self)  # the old-policy probe rebuilds logits as head(decoder(x))
        self.plugin_refill = refill.Refill.install(self)  # filter_groups, keep_rows: drop and refill groups
        self.plugin_injection = injection.Injection.install(self)  # inject_rows: rows appended after scoring

    def _grpo_is_trls(self) -> bool:
        """Whether the built-in ``grpo`` method is configured as TRL's own estimator."""
        return vars(self.composition.method("grpo").config) == checks.composition_defaults(self.args)["grpo"]

    @property
    def plans_rounds(self) -> bool:
        """Whether a method chooses the prompts or rollout counts (the adapter's sampler plans the rounds)."""
        c = self.composition
        return c.implements("sample_prompts") or c.implements("allocate_rollouts")

    def total_steps(self) -> int | None:
        """The run's optimiser steps (``max_steps``), or None before training when only epochs are set."""
        steps = self.state.max_steps if self.state.max_steps > 0 else self.args.max_steps
        return int(steps) if steps and steps > 0 else None

    # ------------------------------------------------------------------ sampling
    def get_train_dataloader(self):
        dataset = self.train_dataset
        if not self.plans_rounds or "prompt_id" in dataset[0]:
            return super().get_train_dataloader()
        # No prompt_id column: rows carry the index the sampler chose, which becomes their prompt id.
        return self._get_dataloader(
            dataset=IndexedRows(dataset),
            description="Training",
            batch_size=self._train_batch_size * self.args.steps_per_generation,  # as GRPOTrainer's
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _get_train_sampler(self, dataset=None):
        if not self.plans_rounds:
            return super()._get_train_sampler(dataset)
        from grpo_plugins_trl.sampler import PluginSampler

        args, repeats = self.args, self.num_iterations * self.args.steps_per_generation
        return PluginSampler(
            composition=self.composition,
            dataset_size=len(dataset if dataset is not None else self.train_dataset),
            num_prompts=args.generation_batch_size // self.num_generations,
            budget=args.generation_batch_size,
            default_rollouts=self.num_generations,
            repeat_count=repeats,
            steps_per_round=repeats / args.gradient_accumulation_steps,
            shuffle=self.shuffle_dataset,
            seed=args.seed,
            on_round=self._record_round,
            total_steps=self.total_steps,
        )

    def _record_round(self, indices: torch.Tensor) -> None:
        """Kept for tests and debugging: the dataset indices of the last 64 rounds the sampler planned."""
        self.__dict__.setdefault("_plugin_rounds", deque(maxlen=64)).append(indices)

    # ------------------------------------------------------------------ advantage stage
    @staticmethod
    def _local_prompt_ids(inputs: list[dict]) -> list[int]:
        """Each dataset row's prompt id: its ``prompt_id`` column, else the dataset index the adapter's
        sampler chose (when a method plans the rounds), else a stable hash of the prompt text. Read
        from the rows as the dataset holds them, before ``augment_prompts``."""
        if inputs and "prompt_id" in inputs[0]:
            return [int(x["prompt_id"]) for x in inputs]
        if inputs and INDEX_KEY in inputs[0]:
            return [int(x[INDEX_KEY]) for x in inputs]
        return [stable_prompt_id(x.get("prompt")) for x in inputs]

    def _augment(self, inputs: list[dict]) -> list[dict]:
        """Run ``augment_prompts`` on the global round (each distinct prompt once, identically on every rank).

        Rows are distinct by prompt id and text: rows sharing a ``prompt_id`` (one group) with different
        prompts (e.g. paraphrases of one request) are each rewritten, not replaced by the first one."""
        local_ids = self._plugin_local_ids
        all_ids = gather_object(local_ids)
        all_rows = gather_object([dict(x) for x in inputs])
        first: dict[tuple[int, int], int] = {}
        for position, (pid, row) in enumerate(zip(all_ids, all_rows)):
            first.setdefault((pid, stable_prompt_id(row["prompt"])), position)
        order = list(first.values())
        dataset = self.train_dataset
        round = PromptRound(
            num_prompts=len(order),
            budget=len(all_ids),
            dataset_size=len(dataset) if hasattr(dataset, "__len__") else 0,
            step=self.state.global_step,
            default_rollouts=self.num_generations,
            total_steps=self.total_steps(),
        )
        prompts = self.composition.run_augment_prompts(
            round,
            torch.tensor([all_ids[i] for i in order], dtype=torch.long),
            [all_rows[i]["prompt"] for i in order],
            [all_rows[i] for i in order],
        )
        new_prompt = dict(zip(first, prompts))
        self._pop_plugin_metrics("train")
        return [{**x, "prompt": new_prompt[pid, stable_prompt_id(x["prompt"])]} for x, pid in zip(inputs, local_ids)]

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self.model.training and not self._plugin_passthrough:
            # Same global order as the gathered rewards: rank 0's rows, then rank 1's, ...
            self._plugin_gathered = {
                "rewards_per_func": rewards_per_func,
                "prompt_ids": gather_object(list(self._plugin_local_ids)),
                "prompts": gather_object(list(prompts)),
                "completions": gather_object(list(completions)),
                "rows": gather_object(self._plugin_dataset_rows or [dict(x) for x in inputs]),
            }
            if turns.wanted(self.composition):  # the rollout's per-step fields, with their rows
                self._plugin_gathered["step_fields"] = gather_object(turns.row_fields(inputs))
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        if not self.model.training or self._plugin_passthrough:
            return super()._generate_and_score_completions(inputs)
        out = self._plugin_generate_round(inputs)
        if self.plugin_refill is not None:  # drop groups and refill them with new prompts (refill.py)
            out = self.plugin_refill.fill(out, len(inputs))
        if self.plugin_injection is not None:  # rows from outside the rollout (injection.py)
            out = self.plugin_injection.inject(out)
        if self._plugin_reference:
            objectives.add_reference_log_probs(self, out)
        self._run_advantage_stage(out, out["completion_ids"].shape[0])
        return out

    def _plugin_generate_round(self, inputs: list[dict]) -> dict:
        """One generation round of TRL's (``augment_prompts`` first), scored; ``_plugin_gathered`` holds its
        global rewards, prompt ids, texts and rows."""
        self._plugin_gathered = {}
        self._plugin_real_rows = None
        self._plugin_local_ids = self._local_prompt_ids(inputs)  # from the dataset rows, before any rewrite
        if inputs and INDEX_KEY in inputs[0]:
            inputs = [{k: v for k, v in x.items() if k != INDEX_KEY} for x in inputs]
        self._plugin_dataset_rows = None  # the rows before augment_prompts (GRPOBatch.rows)
        if self.composition.implements("augment_prompts"):
            self._plugin_dataset_rows = [dict(x) for x in inputs]
            inputs = self._augment(inputs)
        with statistics.capture_old_pass(self):  # old entropies from TRL's own old pass, when it runs one
            return super()._generate_and_score_completions(inputs)

    def _gather_rows(self, tensor: torch.Tensor | None, pad_value: float = 0) -> torch.Tensor | None:
        """``(n, T_local)`` on every rank -> ``(N, T_global)``, padded on the right."""
        if tensor is None:
            return None
        padded = self.accelerator.pad_across_processes(tensor, dim=1, pad_index=pad_value)
        rows = getattr(self, "_plugin_real_rows", None)  # injection's filler rows are in no GRPOBatch
        return self.accelerator.gather(padded) if rows is None else self.accelerator.gather(padded)[:rows]

    def _run_advantage_stage(self, out: dict, n: int) -> None:
        acc, c = self.accelerator, self.composition
        global_mask = self._gather_rows(output_rows.loss_mask(out)).float()
        # No token left to learn from (e.g. mask_truncated_completions with every completion truncated):
        # like GRPOTrainer, the step runs with a zero loss; the methods skip the batch (no stage, no observe).
        self._plugin_skipped = not bool(global_mask.any())
        if self._plugin_skipped:
            logger.warning("every completion of the generation batch is masked: the methods skip it (zero loss)")
            self._metrics["train"][SKIPPED_METRIC].append(1.0)
            return
        gathered = self._plugin_gathered
        batch = self._scored_batch(
            out, global_mask,
            old_log_probs=self._gather_rows(self._behaviour_log_probs(out)),
            ref_log_probs=self._gather_rows(out.get("ref_per_token_logps")),
            **statistics.batch_fields(self, out),  # old_entropies, old_log_probs_at when a method reads them
            **probe.batch_fields(self, out, torch.tensor(gathered["prompt_ids"])),  # probes, update_preview
        )
        if injection.REWARD_OVERRIDE in gathered:  # injected rows with a given reward
            given = gathered[injection.REWARD_OVERRIDE]
            batch.rewards = torch.where(torch.isnan(given), batch.rewards, given.to(batch.rewards))
        if turns.wanted(c):  # multi-turn step records
            batch.steps = turns.batch_steps(global_mask, batch.prompt_ids, gathered["step_fields"])
        if injection.INJECTED_KEY in gathered:  # each row's kind: 0 generated, else the injected row's kind code
            batch.row_data[injection.INJECTED_KEY] = gathered[injection.INJECTED_KEY]
        c.run_advantage_stage(batch)
        local = slice(acc.process_index * n, (acc.process_index + 1) * n)
        width = out["completion_ids"].shape[1]
        advantages = batch.advantages[local]
        if advantages.dim() == 2:
            advantages = advantages[:, :width]
        # mask_tokens weights multiply each token's policy loss; the normaliser stays TRL's completion mask.
        token_weights = None if batch.token_weights is None else batch.token_weights[local, :width].to(advantages.device)
        if token_weights is not None and c.has_loss_hooks:
            out[TOKEN_WEIGHTS_KEY] = token_weights  # the adapter's loss multiplies the policy loss by them
        else:  # exact for TRL's losses: each is positively homogeneous in A once the sign of A is fixed
            advantages = weight_token_advantages(advantages, token_weights)
        out["advantages"] = advantages.to(out["completion_ids"].device)
        for key, value in batch.row_data.items():
            value = value[local]
            if value.dim() >= 2 and value.shape[1] == batch.completion_mask.shape[1]:
                value = value[:, :width]  # token-aligned data follows this rank's padding
            out[ROW_DATA_PREFIX + key] = value
        self._log_final_advantages(batch)
        self._pop_plugin_metrics("train")
        if c.implements("loss_objectives"):
            objectives.attach(self, out, batch, local)
        if self._plugin_real_rows is not None:  # this rank's filler rows (injection.py): zero advantage and data
            injection.pad_local_rows(out, n)
        self._plugin_pending.append(batch)
        self.last_plugin_batch = batch

    def _scored_batch(self, out: dict, global_mask: torch.Tensor, **fields: Any) -> GRPOBatch:
        """The global ``GRPOBatch`` of a scored round: TRL's local output ``out``, the gathered ``(N, T)``
        loss mask and ``_plugin_gathered`` (rewards, prompt ids, texts, rows), plus ``fields``. Rewards
        are TRL's weighted ``nansum`` of the components; a row no function scored is NaN (the core
        names it)."""
        gathered, acc = self._plugin_gathered, self.accelerator
        rewards_per_func = gathered["rewards_per_func"]
        weights = self.reward_weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        return GRPOBatch(
            prompt_ids=torch.tensor(gathered["prompt_ids"], dtype=torch.long, device=rewards.device),
            rewards=rewards,
            reward_components=rewards_per_func,
            reward_names=tuple(self.reward_func_names),
            reward_weights=weights,
            completion_ids=self._gather_rows(out["completion_ids"], self._tokenizer.pad_token_id),
            completion_mask=global_mask,
            prompts=gathered["prompts"],
            completions=gathered["completions"],
            rows=gathered["rows"],
            step=self.state.global_step,
            total_steps=self.total_steps(),
            parallel=ParallelContext(rank=acc.process_index, world_size=acc.num_processes, gathered=True),
            **fields,
        )

    def _behaviour_log_probs(self, out: dict) -> torch.Tensor | None:
        """``(n, T)`` old log-probs of this rank's rows: TRL's, or, when TRL skipped them (fully on-policy)
        and a method requires them, computed here once per generation batch as TRL would compute them
        (same forward, temperature and micro-batch size, no gradient). They are not put in TRL's output
        dict, so TRL's loss is unchanged."""
        old = out.get("old_per_token_logps")
        if old is not None or "old_log_probs" not in self.composition.required_fields():
            return old
        from trl.models.utils import disable_gradient_checkpointing

        prompt_completion_ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
        attention_mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        forward_kwargs = {key: out[key] for key in FORWARD_KEYS if key in out}
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            old, _, _ = self._get_per_token_logps_and_entropies(
                self.model, prompt_completion_ids, attention_mask, out["completion_ids"].size(1),
                batch_size=self.args.per_device_train_batch_size, **forward_kwargs,
            )
        return old

    def _log_final_advantages(self, batch: GRPOBatch) -> None:
        """Replace TRL's logged advantages (completions table) by the ones the loss uses."""
        adv = batch.advantages
        if adv.dim() == 2:  # per-token: log each completion's token mean
            from grpo_plugins.ops import masked_mean

            adv = masked_mean(adv, batch.completion_mask, dim=-1)
        logged = self._logs["advantages"]
        for _ in range(min(len(logged), batch.num_completions)):
            logged.pop()
        logged.extend(adv.tolist())

    # ------------------------------------------------------------------ observe and metrics
    def _observe_finished_batches(self) -> None:
        generate_every = self.args.steps_per_generation * self.num_iterations
        if not self._plugin_pending or self._step % generate_every != 0:
            return
        for batch in self._plugin_pending:
            self.composition.run_observe(batch, self.state.global_step)
        self._plugin_pending = []
        self._pop_plugin_metrics("train")

    def _pop_plugin_metrics(self, mode: str) -> None:
        for key, value in self.composition.pop_metrics().items():
            self._metrics[mode][key].append(value)

    # ------------------------------------------------------------------ loss stage
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **forward_kwargs):
        plain = compute_aux_loss or any(v is not None for v in forward_kwargs.values())  # refused at start-up
        if getattr(self.args, "shared_prefix", False) and not plain:
            from grpo_plugins_trl.prefix import shared_prefix_log_probs  # every log-prob pass: old, ref, loss

            return shared_prefix_log_probs(self, model, input_ids, attention_mask, logits_to_keep, batch_size,
                                           compute_entropy)
        return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, batch_size,
                                                          compute_entropy, compute_aux_loss, **forward_kwargs)

    def training_step(self, model, inputs, num_items_in_batch):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.model.training and getattr(self, "_plugin_update_control", None) is not None:
            self._plugin_update_control.after_micro_step()  # scale_update at the step's last micro-batch
        return loss

    def _prepare_inputs(self, generation_batch):
        if self.model.training and self._plugin_whole_groups:  # shuffle groups, not rows (objectives)
            return objectives.prepare_whole_groups(self, generation_batch)
        return super()._prepare_inputs(generation_batch)

    def _compute_loss(self, model, inputs):
        if not self.composition.has_loss_hooks or self._plugin_skipped:
            return super()._compute_loss(model, inputs)
        from grpo_plugins_trl.loss import plugin_loss

        return plugin_loss(self, model, inputs)

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save and not self._plugin_passthrough:  # no method: TRL's own checkpoint
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            self.composition.save(os.path.join(folder, STATE_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self._plugin_passthrough:
            return
        # GRPOTrainer restarts its micro-step counter at 0, which regenerates at once and shifts every later
        # generation batch (and its observe) off the optimiser steps of the original run. Restore it: a
        # checkpoint taken inside a generation batch regenerates that batch's prompts and uses its remaining
        # slices, and observe runs after the step that finishes the batch, as in the original run.
        self._step = self.state.global_step * self.args.gradient_accumulation_steps
        path = os.path.join(checkpoint, STATE_FILE)
        if os.path.exists(path):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:
                raise CompositionError(
                    f"cannot read the methods' state file {path}: it is truncated or corrupt "
                    f"({type(error).__name__}); resume from another checkpoint"
                ) from error
            self.composition.load_state_dict(state)
            return
        stateful = [e.name for e in self.composition.enabled if type(e.method).state_dict is not Method.state_dict]
        if stateful and not getattr(self.args, "grpo_plugins_fresh_state", False):
            raise CompositionError(
                f"checkpoint {checkpoint} holds no {STATE_FILE} (written by a run without these methods, or "
                f"deleted), so method(s) {stateful} would restart from fresh state and change the next losses. "
                "Resume from a checkpoint of this run, or set grpo_plugins_fresh_state=True (PluginGRPOConfig) "
                "to start their state fresh"
            )
        if stateful:
            logger.warning("checkpoint %s holds no %s: method(s) %s start with fresh state", checkpoint, STATE_FILE, stateful)


def _scale_name(scale_rewards: Any) -> str:
    """TRL's ``scale_rewards`` (``group``/``batch``/``none`` or a bool) as the ``grpo`` method's ``scale``."""
    return {True: "group", False: "none"}.get(scale_rewards, str(scale_rewards))


def trl_capabilities(args: GRPOConfig, dataset: Any = None) -> TrainerCapabilities:
    """What this adapter provides for a run with ``args`` (and ``dataset``), for the core's capability check."""
    caps = TrainerCapabilities.standard(
        "TRL GRPOTrainer",
        settings=dict(
            loss_aggregation=LOSS_AGGREGATION.get(args.loss_type, args.loss_type),
            importance_sampling=args.importance_sampling_level,
            on_policy=args.num_iterations == 1 and args.steps_per_generation == args.gradient_accumulation_steps,
            group_size=args.num_generations,
            reference_model=args.beta != 0.0,
        ),
        setting_names=dict(loss_aggregation="loss_type", importance_sampling="importance_sampling_level",
                           on_policy="num_iterations / steps_per_generation", group_size="num_generations",
                           reference_model="beta"),
    ).with_columns(getattr(dataset, "column_names", None))
    if args.use_vllm and args.vllm_mode == "server":  # it asks the server for num_generations of every prompt
        caps = caps.without("variable_budgets", because="vllm_mode='server' (use vllm_mode='colocate' or use_vllm=False)")
    if args.multi_objective_aggregation != "sum_then_normalize":
        caps = caps.without("advantage_hooks", "variable_budgets", because="multi_objective_aggregation="
                            f"'{args.multi_objective_aggregation}' (TRL's own estimator; use 'sum_then_normalize')")
    if args.loss_type not in LOSS_AGGREGATION:
        caps = caps.without("token_loss", because=f"loss_type='{args.loss_type}' is unknown to the adapter's loss "
                            f"(it reproduces {', '.join(LOSS_AGGREGATION)})")
    if isinstance(dataset, torch.utils.data.IterableDataset):
        caps = caps.without("prompt_selection", "variable_budgets", because="an IterableDataset train dataset "
                            "(the adapter's sampler needs a map-style dataset)")
    caps = statistics.with_statistics(objectives.with_objectives(caps, args), args)
    caps = turns.with_steps(refill.with_batch_editing(caps, args, dataset))
    caps = injection.with_row_injection(caps, args, dataset)
    return probe.with_probe(update_control.with_update_control(caps, args), args)

