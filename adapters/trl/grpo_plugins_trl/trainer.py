"""``PluginGRPOTrainer``: TRL's ``GRPOTrainer`` with the grpo-plugins hooks wired in.

Where each hook runs (TRL 1.16):

- ``sample_prompts`` / ``allocate_rollouts``: :class:`~grpo_plugins_trl.sampler.PluginSampler`
  replaces ``_get_train_sampler``; one round = ``generation_batch_size`` rows grouped by prompt
  (any number of prompts from 1 to ``generation_batch_size``).
- ``augment_prompts``: at the start of ``_generate_and_score_completions``, on the global round.
- ``shape_rewards`` -> ``compute_advantages`` -> ``adjust_advantages`` -> ``mask_tokens``: after
  TRL's own scoring, on the GLOBAL generation batch (rewards gathered by ``_calculate_rewards``,
  prompt ids gathered alongside); this rank's rows are sliced back into TRL's output dict.
- ``policy_surrogate`` / ``gate_loss`` / ``loss_terms``: ``_compute_loss`` (only when a method
  implements one of them; otherwise TRL's loss runs unchanged).
- ``observe``: at the end of the optimiser step that consumed the generation batch.

The adapter holds no method maths: it moves tensors between TRL and the composition.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import gather_object
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from grpo_plugins import Composition, GRPOBatch, ParallelContext, PromptRound
from grpo_plugins.errors import CompositionError

STATE_FILE = "grpo_plugins_state.pt"
ROW_DATA_PREFIX = "grpo_plugins.row_data."
TOKEN_WEIGHTS_KEY = "grpo_plugins.token_weights"
INDEX_KEY = "grpo_plugins.dataset_index"  # carried from the dataset to the trainer, removed before TRL sees rows
LOSS_HOOK_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "sapo")
# Multimodal inputs TRL's forward pass takes from its output dict.
FORWARD_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
                "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


@dataclass
class PluginGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the run's method list, so a TRL YAML config can carry ``grpo_plugins:``."""

    # Typed list[str] for TRL's argument parser (names on the command line); YAML configs and Python
    # code may also give {name: {config}} mappings.
    grpo_plugins: list[str] | None = field(
        default=None,
        metadata={
            "help": "The grpo-plugins methods to enable, in composition order: names or {name: {config}} "
            "mappings, e.g. ['spo', {'gtpo': {'alpha': 1.0}}]."
        },
    )


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
        # Built before TRL loads models, so a bad method list fails at once.
        self.composition = Composition(
            methods, defaults={"grpo": {"epsilon": 1e-4, "scale": _scale_name(config.scale_rewards)}}
        )
        _check_supported(self.composition, config)
        super().__init__(*args, **kwargs)
        c = self.composition
        if (c.implements("sample_prompts") or c.implements("allocate_rollouts")) and isinstance(
            self.train_dataset, torch.utils.data.IterableDataset
        ):
            raise CompositionError(
                f"method(s) {c.providers('sample_prompts') + c.providers('allocate_rollouts')} choose prompts or "
                "rollout counts, which needs a map-style train dataset, not an IterableDataset"
            )
        self._plugin_pending: list[GRPOBatch] = []
        self.last_plugin_batch: GRPOBatch | None = None  # the global batch of the latest advantage stage
        self._plugin_gathered: dict[str, Any] = {}
        self._plugin_dataset_rows: list[dict] | None = None
        self._plugin_local_ids: list[int] = []
        # Nothing but the built-in ``grpo`` at TRL's own settings: GRPOTrainer's code path runs unchanged.
        self._plugin_passthrough = not c.user_methods and self._grpo_is_trls()
        if not self._plugin_passthrough:
            self.add_callback(_ObserveCallback(self))

    def _grpo_is_trls(self) -> bool:
        """Whether the built-in ``grpo`` method is configured as TRL's own estimator (scale and epsilon)."""
        config = self.composition.method("grpo").config
        return config.scale == _scale_name(self.args.scale_rewards) and config.epsilon == 1e-4

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
        c = self.composition
        if not self.plans_rounds:
            return super()._get_train_sampler(dataset)
        from grpo_plugins_trl.sampler import PluginSampler

        return PluginSampler(
            composition=c,
            dataset_size=len(dataset if dataset is not None else self.train_dataset),
            num_prompts=self.args.generation_batch_size // self.num_generations,
            budget=self.args.generation_batch_size,
            default_rollouts=self.num_generations,
            repeat_count=self.num_iterations * self.args.steps_per_generation,
            steps_per_round=self.num_iterations * self.args.steps_per_generation / self.args.gradient_accumulation_steps,
            shuffle=self.shuffle_dataset,
            seed=self.args.seed,
            on_round=self._record_round,
            total_steps=self.total_steps,
        )

    def _record_round(self, indices: torch.Tensor) -> None:
        """Kept for tests and debugging: the dataset indices of the last 64 rounds the sampler planned."""
        if not hasattr(self, "_plugin_rounds"):
            self._plugin_rounds: deque[torch.Tensor] = deque(maxlen=64)
        self._plugin_rounds.append(indices)

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
        """Run ``augment_prompts`` on the global round (each distinct prompt once, identically on every rank)."""
        local_ids = self._plugin_local_ids
        all_ids = gather_object(local_ids)
        all_rows = gather_object([dict(x) for x in inputs])
        first: dict[int, int] = {}
        for position, pid in enumerate(all_ids):
            first.setdefault(pid, position)
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
        return [{**x, "prompt": new_prompt[pid]} for x, pid in zip(inputs, local_ids)]

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
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        if not self.model.training or self._plugin_passthrough:
            return super()._generate_and_score_completions(inputs)
        self._plugin_gathered = {}
        self._plugin_local_ids = self._local_prompt_ids(inputs)  # from the dataset rows, before any rewrite
        if inputs and INDEX_KEY in inputs[0]:
            inputs = [{k: v for k, v in x.items() if k != INDEX_KEY} for x in inputs]
        self._plugin_dataset_rows = None  # the rows before augment_prompts (GRPOBatch.rows)
        if self.composition.implements("augment_prompts"):
            self._plugin_dataset_rows = [dict(x) for x in inputs]
            inputs = self._augment(inputs)
        out = super()._generate_and_score_completions(inputs)
        self._run_advantage_stage(out, len(inputs))
        return out

    def _gather_rows(self, tensor: torch.Tensor | None, pad_value: float = 0) -> torch.Tensor | None:
        """``(n, T_local)`` on every rank -> ``(N, T_global)``, padded on the right."""
        if tensor is None:
            return None
        padded = self.accelerator.pad_across_processes(tensor, dim=1, pad_index=pad_value)
        return self.accelerator.gather(padded)

    def _run_advantage_stage(self, out: dict, n: int) -> None:
        acc, c = self.accelerator, self.composition
        gathered = self._plugin_gathered
        rewards_per_func = gathered["rewards_per_func"]
        weights = self.reward_weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan  # unscorable: the core reports it
        loss_mask = out["completion_mask"] if "tool_mask" not in out else out["completion_mask"] * out["tool_mask"]
        batch = GRPOBatch(
            prompt_ids=torch.tensor(gathered["prompt_ids"], dtype=torch.long, device=rewards.device),
            rewards=rewards,
            reward_components=rewards_per_func,
            reward_names=tuple(self.reward_func_names),
            reward_weights=weights,
            completion_ids=self._gather_rows(out["completion_ids"], self._tokenizer.pad_token_id),
            completion_mask=self._gather_rows(loss_mask).float(),
            old_log_probs=self._gather_rows(self._behaviour_log_probs(out)),
            ref_log_probs=self._gather_rows(out.get("ref_per_token_logps")),
            prompts=gathered["prompts"],
            completions=gathered["completions"],
            rows=gathered["rows"],
            step=self.state.global_step,
            total_steps=self.total_steps(),
            parallel=ParallelContext(rank=acc.process_index, world_size=acc.num_processes, gathered=True),
        )
        trl_advantages = acc.gather(out["advantages"])  # TRL's own (N,), identical on every rank
        c.run_advantage_stage(batch)
        if self._keeps_trl_advantages(batch):
            # The built-in ``grpo`` estimator alone, on TRL's own groups: TRL already computed the same
            # quantity, (r - group mean) / (std + 1e-4). Its float rounding differs from the core's
            # segment statistics in the last bits (nanmean(x^2)*n/(n-1) vs sum(x^2)/(n-1)), so keep
            # TRL's tensor: the trainer's numbers come out unchanged, bit for bit.
            batch.advantages = trl_advantages
        local = slice(acc.process_index * n, (acc.process_index + 1) * n)
        width = out["completion_ids"].shape[1]
        advantages = batch.advantages[local]
        if advantages.dim() == 2:
            advantages = advantages[:, :width]
        if batch.token_weights is not None:
            token_weights = batch.token_weights[local, :width].to(loss_mask.device)
            keep = (token_weights > 0).to(out["completion_mask"].dtype)
            out["tool_mask"] = keep if "tool_mask" not in out else out["tool_mask"] * keep
            if not bool(((batch.token_weights == 0) | (batch.token_weights == 1)).all()):  # same on all ranks
                if self.composition.has_loss_hooks:  # the adapter's loss multiplies the policy loss by them
                    out[TOKEN_WEIGHTS_KEY] = token_weights
                else:
                    # Positive weights scale each token's policy loss: exact through the advantage for TRL's
                    # losses (each is positively homogeneous in A once the sign of A is fixed).
                    advantages = (advantages if advantages.dim() == 2 else advantages.unsqueeze(1)) * token_weights
            local_tokens = (out["completion_mask"] * out["tool_mask"]).sum()
            out["num_items_in_batch"] = acc.gather(local_tokens).sum()
        out["advantages"] = advantages.to(out["completion_ids"].device)
        for key, value in batch.row_data.items():
            value = value[local]
            if value.dim() >= 2 and value.shape[1] == batch.completion_mask.shape[1]:
                value = value[:, :width]  # token-aligned data follows this rank's padding
            out[ROW_DATA_PREFIX + key] = value
        if not self._keeps_trl_advantages(batch):
            self._log_final_advantages(batch)
        self._pop_plugin_metrics("train")
        self._plugin_pending.append(batch)
        self.last_plugin_batch = batch

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
                self.model,
                prompt_completion_ids,
                attention_mask,
                out["completion_ids"].size(1),
                batch_size=self.args.per_device_train_batch_size,
                **forward_kwargs,
            )
        return old

    def _keeps_trl_advantages(self, batch: GRPOBatch) -> bool:
        c = self.composition
        if c.implements("shape_rewards") or c.implements("adjust_advantages"):
            return False
        if c.providers("compute_advantages") != ["grpo"] or not c.enabled[c.names.index("grpo")].builtin:
            return False
        if not self._grpo_is_trls():  # configured otherwise than TRL: the core's estimator decides
            return False
        if self.multi_objective_aggregation != "sum_then_normalize":
            return True  # checked at start-up: nothing else touches the advantage stage
        groups = batch.prompt_ids.view(-1, self.num_generations)
        same_within = bool((groups == groups[:, :1]).all())
        return same_within and int(torch.unique(groups[:, 0]).numel()) == groups.shape[0]

    def _log_final_advantages(self, batch: GRPOBatch) -> None:
        """Replace TRL's logged advantages (completions table) by the ones the loss uses."""
        adv = batch.advantages
        if adv.dim() == 2:  # per-token: log each completion's token mean
            mask = batch.completion_mask
            adv = (adv * mask).sum(1) / mask.sum(1).clamp(min=1)
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
    def _compute_loss(self, model, inputs):
        if not self.composition.has_loss_hooks:
            return super()._compute_loss(model, inputs)
        from grpo_plugins_trl.loss import plugin_loss

        return plugin_loss(self, model, inputs)

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            self.composition.save(os.path.join(folder, STATE_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and os.path.exists(os.path.join(checkpoint, STATE_FILE)):
            self.composition.load(os.path.join(checkpoint, STATE_FILE))


def _scale_name(scale_rewards: Any) -> str:
    """TRL's ``scale_rewards`` (``group``/``batch``/``none`` or a bool) as the ``grpo`` method's ``scale``."""
    if scale_rewards is True:
        return "group"
    if scale_rewards is False:
        return "none"
    return str(scale_rewards)


def _check_supported(c: Composition, args: GRPOConfig) -> None:
    """Start-up errors for TRL settings the enabled hooks cannot run with."""
    if c.implements("allocate_rollouts") and args.use_vllm and args.vllm_mode == "server":
        raise CompositionError(
            f"method(s) {c.providers('allocate_rollouts')} set a variable number of completions per prompt "
            "(hook 'allocate_rollouts'), which vLLM server mode cannot generate (it asks the server for "
            "num_generations completions of every prompt); use vllm_mode='colocate' or use_vllm=False"
        )
    user_adv = any(
        c.implements(h) and c.providers(h) != ["grpo"] for h in ("shape_rewards", "compute_advantages", "adjust_advantages")
    )
    if args.multi_objective_aggregation != "sum_then_normalize" and (user_adv or c.implements("allocate_rollouts")):
        raise CompositionError(
            "multi_objective_aggregation='normalize_then_sum' is TRL's own advantage estimator; it cannot be "
            "combined with methods that shape rewards, compute or adjust advantages, or allocate rollouts"
        )
    if c.has_loss_hooks:
        who = sorted({*c.providers("policy_surrogate"), *c.providers("gate_loss"), *c.providers("loss_terms")})
        problems = []
        if args.loss_type not in LOSS_HOOK_LOSS_TYPES:
            problems.append(f"loss_type='{args.loss_type}' (supported: {', '.join(LOSS_HOOK_LOSS_TYPES)})")
        if args.importance_sampling_level != "token":
            problems.append(f"importance_sampling_level='{args.importance_sampling_level}'")
        if args.off_policy_mask_threshold is not None:
            problems.append("off_policy_mask_threshold")
        if args.entropy_coef != 0.0 or args.use_adaptive_entropy:
            problems.append("an entropy bonus (entropy_coef / use_adaptive_entropy)")
        if problems:
            raise CompositionError(
                f"method(s) {who} implement loss hooks, which this adapter runs only with TRL's token-level "
                f"PPO-clip losses; unsupported here: {'; '.join(problems)}"
            )
