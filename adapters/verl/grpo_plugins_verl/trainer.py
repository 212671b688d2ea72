"""The round-planning and observe hooks, and plugin state in checkpoints: verl's sync V1 trainer, extended.

``GRPOPluginsTrainer`` is ``PPOTrainerSync`` with four additions, selected with
``trainer.v1.trainer_mode=grpo_plugins`` (registered with verl's ``register_trainer``):

- each dataloader fetch becomes a planned round: ``sample_prompts`` picks the dataset indices (or
  verl's dataloader does; any number ``P'`` of them, and verl's replay buffer is then asked for
  ``P'`` groups), ``augment_prompts`` rewrites ``raw_prompt``, the rollout counts set verl's
  per-prompt column ``__rollout_n__``; every verl ``uid`` is mapped to its prompt id (the
  dataset's ``prompt_id`` column, else the row's dataset index) so the advantage stage groups by it;
- before verl's advantage step, the rows' completion tokens, old/reference log-probs, prompts and
  ``reward_extra_info`` scores are fetched from TransferQueue for the methods
  (:mod:`grpo_plugins_verl.extras`), and the stage's metrics go into verl's step metrics;
- ``observe`` runs after each actor update, with the batch the advantage stage saw;
- plugin state (and the sampling generator) is written to ``global_step_<n>/grpo_plugins.pt`` with
  every verl checkpoint and restored on resume.

Everything else is verl's sync trainer: the class behaves as ``trainer_mode=sync`` internally
(verl branches on that literal for its replay buffer and dataloader).
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any, Callable

from functools import partial

import numpy as np
import torch
import transfer_queue as tq
from tensordict import TensorDict
from omegaconf import open_dict
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils import tensordict_utils as tu
from verl.utils.dataset.rl_dataset import collate_fn
from verl.workers.utils.padding import response_to_nested

from grpo_plugins import Composition, CompositionError, PromptRound

from grpo_plugins_verl.capabilities import check_run
from grpo_plugins_verl.extras import ROW_FIELDS, batch_extras
from grpo_plugins_verl.loss import ROW_PREFIX, STEP, TOKEN_WEIGHTS, grpo_plugins_ppo_loss
from grpo_plugins_verl.runtime import Runtime, get_runtime
from grpo_plugins_verl.settings import NAME

logger = logging.getLogger("grpo_plugins_verl")

INDEX_KEY = "__grpo_dataset_index__"
"""Column the adapter adds to dataset rows: the row's dataset index (removed before generation)."""
ROLLOUT_N_KEY = "__rollout_n__"
"""verl's per-prompt rollout-count column (``agent_loop_tq._run_prompt``)."""
REWARD_KEYS = "grpo_plugins_reward_keys"
"""``algorithm`` key naming the ``reward_extra_info`` entries that form ``GRPOBatch.reward_components``."""
REWARD_WEIGHTS = "grpo_plugins_reward_weights"
"""``algorithm`` key with the weights of those components (``GRPOBatch.reward_weights``), same order."""
PROMPT_ID_COLUMN = "prompt_id"
"""Dataset column that, when present, keys the groups (rows sharing it form one group), as on TRL."""
SKIPPED_METRIC = "plugins/skipped_empty_batches"
"""Step metric: batches the methods skipped because every completion was masked."""
STATE_FILE = "grpo_plugins.pt"
"""File of the plugin state inside verl's ``global_step_<n>`` checkpoint folder."""


class IndexedDataset(Dataset):
    """A dataset whose rows also carry their own index under :data:`INDEX_KEY`."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int) -> dict:
        row = dict(self.dataset[item])
        row[INDEX_KEY] = int(item)
        return row

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not yet set (unpickling in a dataloader worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)


def plan_round(
    composition: Composition,
    round: PromptRound,
    generator: torch.Generator,
    dataset: Any,
    next_default_batch: Callable[[], dict],
) -> tuple[dict, torch.Tensor]:
    """One generation round as a collated verl batch dict, and its ``(P',)`` dataset indices.

    ``sample_prompts`` chooses the rows (otherwise ``next_default_batch()``, verl's dataloader, does;
    a sampler may choose ``P' != round.num_prompts`` prompts), ``augment_prompts`` rewrites
    ``raw_prompt``, and the round's rollout counts (``allocate_rollouts``, else the budget split
    evenly) fill ``__rollout_n__``: always when a method allocates rollouts (verl concatenates rounds
    when ``data.gen_batch_size < train_batch_size``, so every round must carry the same columns),
    otherwise only when they differ from verl's ``rollout.n``.

    Raises:
        CompositionError: a prompt gets 0 completions (verl's sync trainer waits for a finished
            group from every submitted prompt), or the budget does not split evenly.
    """
    prompt_ids = composition.run_sample_prompts(round, generator)
    if prompt_ids is None:
        batch_dict = next_default_batch()
        prompt_ids = torch.as_tensor(np.asarray(batch_dict.pop(INDEX_KEY), dtype=np.int64))
    else:
        batch_dict = collate_fn([dataset[i] for i in prompt_ids.tolist()])
        batch_dict.pop(INDEX_KEY, None)
    num = int(prompt_ids.numel())
    if composition.implements("augment_prompts"):
        rows = [{key: value[i] for key, value in batch_dict.items()} for i in range(num)]
        prompts = composition.run_augment_prompts(round, prompt_ids, list(batch_dict["raw_prompt"]), rows)
        batch_dict["raw_prompt"] = np.fromiter(prompts, dtype=object, count=num)
    counts = composition.rollout_counts(round, prompt_ids)
    if bool((counts < 1).any()):
        raise CompositionError(
            f"{composition.providers('allocate_rollouts')} gave 0 completions to prompt(s) "
            f"{prompt_ids[counts < 1].tolist()[:5]}; verl's sync trainer needs at least 1 per submitted prompt"
        )
    if composition.implements("allocate_rollouts") or bool((counts != round.default_rollouts).any()):
        # every round of a run that allocates carries the column (verl concatenates rounds)
        batch_dict[ROLLOUT_N_KEY] = np.fromiter(counts.tolist(), dtype=object, count=num)
    return batch_dict, prompt_ids


def save_plugin_state(composition: Composition, generator: torch.Generator, folder: str) -> str:
    """Write the methods' state and the sampling generator's state to ``folder/grpo_plugins.pt``."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, STATE_FILE)
    torch.save({"methods": composition.state_dict(), "generator": generator.get_state()}, path)
    return path


FRESH_STATE_KEY = "grpo_plugins_fresh_state"
"""``+algorithm.grpo_plugins_fresh_state=true``: resume from a checkpoint without the methods' state file."""


def load_plugin_state(composition: Composition, generator: torch.Generator, folder: str, fresh: bool = False) -> bool:
    """Restore :func:`save_plugin_state`'s file from ``folder``.

    Raises:
        CompositionError: the file is absent while enabled methods keep state (they would restart from
            scratch and change the next losses), unless ``fresh``; or it is truncated or corrupt.
    """
    path = os.path.join(folder, STATE_FILE)
    if not os.path.exists(path):
        stateful = sorted(composition.state_dict())
        if stateful and not fresh:
            raise CompositionError(
                f"checkpoint {folder} holds no {STATE_FILE} (written by a run without these methods, or deleted), so "
                f"method(s) {stateful} would restart from fresh state and change the next losses. Resume from a "
                f"checkpoint of this run, or set +algorithm.{FRESH_STATE_KEY}=true to start them fresh"
            )
        if stateful:
            logger.warning("no %s in %s: methods %s start from fresh state, as asked", STATE_FILE, folder, stateful)
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file
        raise CompositionError(
            f"cannot read the methods' state file {path}: it is truncated or corrupt ({type(error).__name__}); "
            "resume from another checkpoint"
        ) from error
    composition.load_state_dict(state["methods"])
    generator.set_state(state["generator"])
    return True


class GRPOPluginsTrainer(PPOTrainerSync):
    """verl's sync V1 trainer running the round-planning and ``observe`` hooks and saving plugin state."""

    def __init__(self, config: Any):
        with open_dict(config):
            config.trainer.v1.trainer_mode = "sync"  # verl branches on the literal "sync"
        if str(config.algorithm.adv_estimator) != NAME:
            raise CompositionError(
                f"trainer.v1.trainer_mode={NAME} needs algorithm.adv_estimator={NAME} (got {config.algorithm.adv_estimator})"
            )
        super().__init__(config)
        self.grpo_plugins: Runtime = get_runtime(config.algorithm)
        self.grpo_plugins.trainer_attached = True
        self.grpo_plugins.rows_for = self._dataset_rows
        check_run(self.grpo_plugins.composition, config)
        self.prompt_generator = torch.Generator().manual_seed(int(config.data.get("seed", None) or 1))

    # ------------------------------------------------------------------ round planning
    def _dataset_rows(self, prompt_ids: list[int]) -> list[dict]:
        """Dataset rows of ``prompt_ids`` (each distinct prompt read once)."""
        rows = {i: self.train_dataset.dataset[i] for i in set(prompt_ids)}
        return [rows[i] for i in prompt_ids]

    def _init_dataloader(self):
        super()._init_dataloader()
        columns = getattr(getattr(self.train_dataset, "dataframe", None), "column_names", None)
        check_run(self.grpo_plugins.composition, self.config, columns)  # now with the dataset's columns
        self.grpo_plugins.total_steps = self._total_steps()
        self.train_dataset = IndexedDataset(self.train_dataset)
        loader = self.train_dataloader
        self.train_dataloader = StatefulDataLoader(
            dataset=self.train_dataset,
            batch_size=loader.batch_size,
            num_workers=self.config.data["dataloader_num_workers"],
            drop_last=True,
            collate_fn=collate_fn,
            sampler=loader.sampler,
        )

    def _next_default_batch(self) -> dict:
        try:
            if self.train_dataloader_it is None:
                self.train_dataloader_it = iter(self.train_dataloader)
            return next(self.train_dataloader_it)
        except StopIteration:
            self.train_dataloader_it = iter(self.train_dataloader)
            return next(self.train_dataloader_it)

    def _fetch_one_gen_batch(self):
        """One planned ``gen_batch_size`` round (see :func:`plan_round`) as verl's prompt TensorDict."""
        num = self.config.data.get("gen_batch_size", None) or self.config.data.train_batch_size
        rollout_n = int(self.config.actor_rollout_ref.rollout.n)
        round = PromptRound(
            num_prompts=int(num),
            budget=int(num) * rollout_n,
            dataset_size=len(self.train_dataset),
            step=max(int(self.global_steps) - 1, 0),
            default_rollouts=rollout_n,
            total_steps=self._total_steps(),
        )
        batch_dict, prompt_ids = plan_round(
            self.grpo_plugins.composition, round, self.prompt_generator, self.train_dataset, self._next_default_batch
        )
        uids = [str(uuid.uuid4()) for _ in range(len(prompt_ids))]
        keys = batch_dict.get(PROMPT_ID_COLUMN, prompt_ids.tolist())  # the group key: prompt_id, else the index
        self.grpo_plugins.prompt_ids.update(zip(uids, (int(key) for key in keys)))
        self.grpo_plugins.dataset_index.update(zip(uids, prompt_ids.tolist()))
        self.submitted_groups = getattr(self, "submitted_groups", 0) + len(uids)
        batch_dict["uid"] = np.array(uids, dtype=object)
        return tu.get_tensordict(batch_dict)

    def _total_steps(self) -> int | None:
        total = getattr(self, "total_training_steps", None)
        return None if total is None else int(total)

    def prepare_step(self) -> dict:
        """Submit the step's rounds and remember how many prompt groups they hold (a sampler may
        choose more or fewer prompts than verl's ``train_batch_size``)."""
        self.submitted_groups = 0
        metrics = super().prepare_step()
        self.step_groups = self.submitted_groups
        return metrics

    def _step_once(self, metrics: dict, timing_raw: dict, sample_batch_size: int):
        groups = getattr(self, "step_groups", 0)
        if groups and groups != self.config.data.train_batch_size:
            if self.parameter_sync_step != 1:
                raise CompositionError(
                    f"the step's rounds hold {groups} prompts, not data.train_batch_size="
                    f"{self.config.data.train_batch_size}; with trainer.v1.sync.parameter_sync_step > 1 verl splits "
                    "a step by prompt count, so the sampler must return round.num_prompts prompts"
                )
            sample_batch_size = groups  # take every group the planned rounds submitted
        batch = super()._step_once(metrics, timing_raw, sample_batch_size)
        self.observe_step()
        return batch

    # ------------------------------------------------------------------ advantage and observe
    def _compute_advantage(self, batch, metrics: dict):
        self.grpo_plugins.step = max(int(self.global_steps) - 1, 0)
        fields = ["responses", "old_log_probs", *ROW_FIELDS] + (["ref_log_prob"] if self.use_reference_policy else [])
        if "old_entropies" in self.grpo_plugins.composition.required_fields():
            fields.append("entropy")  # the token entropies verl's old-log-prob pass stores
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        keys, weights = (self.config.algorithm.get(name, None) for name in (REWARD_KEYS, REWARD_WEIGHTS))
        wants_text = "completions" in self.grpo_plugins.composition.required_fields()
        self.grpo_plugins.extras = batch_extras(
            data,
            None if keys is None else list(keys),
            None if weights is None else list(weights),
            tokenizer=self.tokenizer if wants_text else None,
        )
        try:
            batch = super()._compute_advantage(batch, metrics)
        finally:
            self.grpo_plugins.extras = None
        runtime = self.grpo_plugins
        metrics.update(runtime.composition.pop_metrics())
        if runtime.skipped:
            metrics[SKIPPED_METRIC], runtime.skipped = float(runtime.skipped), 0
        if runtime.loss_installed and runtime.last_batch is not None:
            self._put_loss_inputs(batch)
        for key in batch.keys:  # trajectory keys are "{uid}_{session}_{index}"
            uid = str(key).rsplit("_", 2)[0]
            runtime.prompt_ids.pop(uid, None)
            runtime.dataset_index.pop(uid, None)
        return batch

    def _put_loss_inputs(self, batch) -> None:
        """Write the advantage stage's ``row_data`` and ``mask_tokens`` weights to TransferQueue next to
        the rows, so they follow verl's shuffling and micro-batching to the loss."""
        runtime = self.grpo_plugins
        stage = runtime.last_batch
        values = {ROW_PREFIX + key: value for key, value in stage.row_data.items()}
        if stage.token_weights is not None:
            values[TOKEN_WEIGHTS] = stage.token_weights
        if not values:
            return
        mask = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["response_mask"])
        response_mask, width = mask["response_mask"], stage.completion_mask.shape[1]
        fields = {}
        for name, value in values.items():
            full = value.new_zeros((len(batch.keys), *value.shape[1:]))
            full[runtime.last_rows.to(value.device)] = value
            token_aligned = value.dim() >= 2 and value.shape[1] == width
            fields[name] = response_to_nested(full, response_mask) if token_aligned else full
        tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=TensorDict(fields, batch_size=len(batch.keys)))

    def on_init_end(self):
        """Install the adapter's actor loss on every actor worker when the adapter owns the loss."""
        if str(self.config.actor_rollout_ref.actor.policy_loss.get("loss_mode", "")) == NAME:
            from verl.utils.config import omega_conf_to_dataclass

            actor_config = omega_conf_to_dataclass(self.config.actor_rollout_ref.actor)
            self.actor_rollout_wg.set_loss_fn(partial(grpo_plugins_ppo_loss, config=actor_config))
            self.grpo_plugins.loss_installed = True
        super().on_init_end()

    def _update_actor(self, batch, metrics: dict):
        batch.extra_info[STEP] = max(int(self.global_steps) - 1, 0)
        return super()._update_actor(batch, metrics)

    def observe_step(self) -> None:
        """Run ``observe`` on the latest advantage-stage batch (once), after the actor update."""
        runtime = self.grpo_plugins
        if runtime.last_batch is not None:
            runtime.composition.run_observe(runtime.last_batch, step=int(self.global_steps))
            runtime.last_batch = None

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_folder(self, resuming: bool = False) -> str:
        """verl's ``global_step_<n>`` folder: the one being written, or (``resuming``) the one resumed from."""
        trainer = self.config.trainer
        if resuming and trainer.resume_mode == "resume_path":
            folder = str(trainer.resume_from_path)
        else:
            folder = os.path.join(trainer.default_local_dir, f"global_step_{self.global_steps}")
        return folder if os.path.isabs(folder) else os.path.join(os.getcwd(), folder)

    def _save_checkpoint(self):
        save_plugin_state(self.grpo_plugins.composition, self.prompt_generator, self._checkpoint_folder())
        super()._save_checkpoint()

    def _load_checkpoint(self):
        super()._load_checkpoint()
        if self.global_steps > 0:
            load_plugin_state(
                self.grpo_plugins.composition, self.prompt_generator, self._checkpoint_folder(resuming=True),
                fresh=bool(self.config.algorithm.get(FRESH_STATE_KEY, False)),
            )
