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
  (:mod:`grpo_plugins_verl.extras`), with each row's turn of its trajectory (``GRPOBatch.steps``, from
  the keys ``{uid}_{session}_{index}``) when a method needs it, and the stage's metrics go into
  verl's step metrics; log-probs at the other temperatures a method reads (``old_log_probs_at``) come
  from more passes of the actor's ``compute_log_prob`` before verl's own (:mod:`grpo_plugins_verl.statistics`),
  and the old-policy probes methods read run on the actor workers (:mod:`grpo_plugins_verl.probe`);
- ``observe`` runs after each actor update, with the batch the advantage stage saw;
- ``setup`` runs once the dataset is loaded (and in each actor worker); each row's group travels to
  the loss, and the actor batch is ordered by whole groups when a method needs them
  (:mod:`grpo_plugins_verl.objectives`);
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
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils import tensordict_utils as tu
from verl.utils.dataset.rl_dataset import collate_fn
from verl.workers.utils.padding import response_to_nested

from grpo_plugins import Composition, CompositionError, PromptRound
from grpo_plugins.needs import PROMPT_ID_COLUMN, prompt_id_problems
from grpo_plugins.objectives import whole_group_methods

from grpo_plugins_verl import injection, objectives, probe, refill, statistics
from grpo_plugins_verl.capabilities import check_run, verl_capabilities
from grpo_plugins_verl.extras import ROW_FIELDS, batch_extras
from grpo_plugins_verl.loss import ROW_PREFIX, STEP, TOKEN_WEIGHTS, grpo_plugins_ppo_loss
from grpo_plugins_verl.runtime import Runtime, get_runtime
from grpo_plugins_verl.settings import NAME, reward_settings

logger = logging.getLogger("grpo_plugins_verl")

INDEX_KEY = "__grpo_dataset_index__"
"""Column the adapter adds to dataset rows: the row's dataset index (removed before generation)."""
ROLLOUT_N_KEY = "__rollout_n__"
"""verl's per-prompt rollout-count column (``agent_loop_tq._run_prompt``)."""
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
        # keep_rows / verl's filter_groups: verl's DAPO path, classified by refill.PluginReplayBuffer
        self.batch_editing = refill.prepare_config(config, get_runtime(config.algorithm).composition)
        super().__init__(config)
        self.grpo_plugins: Runtime = get_runtime(config.algorithm)
        self.grpo_plugins.trainer_attached = True
        self.grpo_plugins.rows_for = self._dataset_rows
        check_run(self.grpo_plugins.composition, config)
        self.prompt_generator = torch.Generator().manual_seed(int(config.data.get("seed", None) or 1))
        self.injection = injection.Injection.install(self)  # inject_rows: rows join each step's batch

    def _init_resource_pool_mgr(self):
        """verl's worker mapping; the actor's worker class runs the old-policy probe when a method reads one."""
        super()._init_resource_pool_mgr()
        from grpo_plugins_verl.workers import use_probe_worker

        use_probe_worker(self.role_worker_mapping, self.grpo_plugins.composition)

    def _build_replay_buffer(self):
        """verl's replay buffer; with batch editing, verl's sync buffer whose DAPO classification also asks the
        ``keep_rows`` methods (:class:`~grpo_plugins_verl.refill.PluginReplayBuffer`)."""
        buffer = super()._build_replay_buffer()
        if getattr(self, "batch_editing", False) and type(buffer) is ReplayBuffer and buffer.filter_groups_metric:
            return refill.PluginReplayBuffer.of(buffer, get_runtime(self.config.algorithm), self.config)
        return buffer  # a custom sampler: batch editing is refused by the capability check

    # ------------------------------------------------------------------ round planning
    def _dataset_rows(self, prompt_ids: list[int]) -> list[dict]:
        """Dataset rows of ``prompt_ids`` (each distinct prompt read once)."""
        rows = {i: self.train_dataset.dataset[i] for i in set(prompt_ids)}
        return [rows[i] for i in prompt_ids]

    def _init_dataloader(self):
        super()._init_dataloader()
        columns = getattr(getattr(self.train_dataset, "dataframe", None), "column_names", None)
        check_run(self.grpo_plugins.composition, self.config, columns)  # now with the dataset's columns
        frame = getattr(self.train_dataset, "dataframe", None)
        problems = prompt_id_problems(self.grpo_plugins.composition,
                                      frame[PROMPT_ID_COLUMN] if PROMPT_ID_COLUMN in (columns or ()) else None)
        if problems:
            raise CompositionError(problems[0])
        self.grpo_plugins.total_steps = self._total_steps()
        self.grpo_plugins.tokenizer = self.tokenizer
        self.setup_context = objectives.run_context(self.config, self.tokenizer, len(self.train_dataset), self._total_steps(),
                                                    verl_capabilities(self.config, columns).settings)
        self.grpo_plugins.composition.run_setup(self.setup_context)
        self.grpo_plugins.set_up = True
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
        counts = batch_dict.get(ROLLOUT_N_KEY, None)
        rollouts = len(uids) * rollout_n if counts is None else int(sum(int(c) for c in counts))
        self.submitted_rollouts = getattr(self, "submitted_rollouts", 0) + rollouts  # refill costs (batch_editing/)
        batch_dict["uid"] = np.array(uids, dtype=object)
        return tu.get_tensordict(batch_dict)

    def _total_steps(self) -> int | None:
        total = getattr(self, "total_training_steps", None)
        return None if total is None else int(total)

    def prepare_step(self) -> dict:
        """Submit the step's rounds and remember how many prompt groups they hold (a sampler may
        choose more or fewer prompts than verl's ``train_batch_size``)."""
        self.submitted_groups = self.submitted_rollouts = 0
        metrics = super().prepare_step()
        self.step_groups, self.first_rollouts = self.submitted_groups, self.submitted_rollouts
        return metrics

    def _step_once(self, metrics: dict, timing_raw: dict, sample_batch_size: int):
        self.grpo_plugins.step = max(int(self.global_steps) - 1, 0)  # batch editing hooks run before the advantage step
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
        if getattr(self, "batch_editing", False):  # what dropping and refilling groups cost this step
            metrics.update(refill.step_metrics(self.replay_buffer, metrics, self.submitted_rollouts, self.first_rollouts))
        self.observe_step()
        return batch

    # ------------------------------------------------------------------ advantage and observe
    def _balance_batch(self, batch, metrics, *args, **kwargs):
        """verl's balancing and padding, after the ``inject_rows`` rows joined the sampled batch
        (:mod:`grpo_plugins_verl.injection`; no such method: verl's own)."""
        if getattr(self, "injection", None) is not None:
            batch = self.injection.inject(batch, metrics)
        return super()._balance_batch(batch, metrics, *args, **kwargs)

    def _compute_old_log_prob(self, batch, metrics: dict):
        """verl's old-log-prob pass, preceded by the actor's passes at the other temperatures the methods read
        (``GRPOBatch.old_log_probs_at``, :mod:`grpo_plugins_verl.statistics`; none: nothing more runs)."""
        self.temperature_passes = statistics.run_passes(self, batch)
        batch = super()._compute_old_log_prob(batch, metrics)
        if getattr(self, "injection", None) is not None:
            self.injection.sampling_log_probs(batch)  # injected rows: rollout log-probs = old log-probs
        return batch

    def _compute_advantage(self, batch, metrics: dict):
        self.grpo_plugins.step = max(int(self.global_steps) - 1, 0)
        self.grpo_plugins.row_groups = None  # set again by _put_loss_inputs for this step's rows
        fields = ["responses", "old_log_probs", *ROW_FIELDS] + (["ref_log_prob"] if self.use_reference_policy else [])
        if "old_entropies" in self.grpo_plugins.composition.required_fields():
            fields.append("entropy")  # the token entropies verl's old-log-prob pass stores
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        keys, weights = reward_settings(self.config.algorithm)
        required = self.grpo_plugins.composition.required_fields()
        self.grpo_plugins.extras = batch_extras(
            data,
            keys,
            weights,
            tokenizer=self.tokenizer if "completions" in required else None,
            keys=batch.keys,  # each row's turn of its session (multi-turn rows; GRPOBatch.steps)
            step_fields="steps" in required,
        )
        statistics.add_field(self, batch.keys)  # old_log_probs_at, when a method reads it
        probe.add_field(self, batch)  # GRPOBatch.probes, when a method reads one
        injection.add_field(self, batch.keys)  # row_data["injected"], when a method injects rows
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
        composition = runtime.composition
        groups = {}
        if composition.implements("loss_objectives") or whole_group_methods(composition):
            groups = objectives.group_fields(stage.group_index, stage.group_sizes, runtime.last_rows, len(batch.keys))
            index, size = groups[objectives.GROUP_INDEX].tolist(), groups[objectives.GROUP_SIZE].tolist()
            runtime.row_groups = dict(zip(batch.keys, zip(index, size)))
        if not values and not groups:
            return
        mask = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["response_mask"])
        response_mask, width = mask["response_mask"], stage.completion_mask.shape[1]
        fields = {}
        for name, value in values.items():
            full = value.new_zeros((len(batch.keys), *value.shape[1:]))
            full[runtime.last_rows.to(value.device)] = value
            token_aligned = value.dim() >= 2 and value.shape[1] == width
            fields[name] = response_to_nested(full, response_mask) if token_aligned else full
        fields.update(groups)
        tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=TensorDict(fields, batch_size=len(batch.keys)))
        if batch.fields is not None:  # the workers fetch only the fields the batch lists
            batch.fields = [*batch.fields, *(name for name in fields if name not in batch.fields)]

    def on_init_end(self):
        """Install the adapter's actor loss on every actor worker when the adapter owns the loss."""
        if str(self.config.actor_rollout_ref.actor.policy_loss.get("loss_mode", "")) == NAME:
            from verl.utils.config import omega_conf_to_dataclass

            actor_config = omega_conf_to_dataclass(self.config.actor_rollout_ref.actor)
            context = getattr(self, "setup_context", None)
            self.actor_rollout_wg.set_loss_fn(partial(grpo_plugins_ppo_loss, config=actor_config, context=context))
            self.grpo_plugins.loss_installed = True
        super().on_init_end()

    def _update_actor(self, batch, metrics: dict):
        batch.extra_info[STEP] = max(int(self.global_steps) - 1, 0)
        methods = whole_group_methods(self.grpo_plugins.composition)
        if not methods or self.grpo_plugins.row_groups is None:
            return super()._update_actor(batch, metrics)
        actor = self.config.actor_rollout_ref.actor
        shuffle = bool(actor.get("shuffle", False))
        self._order_whole_groups(batch, methods, shuffle)
        with open_dict(self.config):
            actor.shuffle = False  # the groups are shuffled above, rows must not be
        try:
            return super()._update_actor(batch, metrics)
        finally:
            with open_dict(self.config):
                actor.shuffle = shuffle

    def _order_whole_groups(self, batch, methods: list[str], shuffle: bool) -> None:
        """Reorder the actor batch so verl's data-parallel shares, mini- and micro-batches hold whole groups."""
        from verl.utils.seqlen_balancing import calculate_workload

        groups, sizes = (torch.tensor(column) for column in zip(*(self.grpo_plugins.row_groups[k] for k in batch.keys)))
        workloads = calculate_workload(torch.tensor([tag["seq_len"] for tag in batch.tags], dtype=torch.int64))
        wg = self.actor_rollout_wg
        dp_size = max(wg._dispatch_info.get("actor") or wg._query_dispatch_info("actor")) + 1  # as _balance_batch
        seed = int(self.config.actor_rollout_ref.actor.get("data_loader_seed", 42) or 0) + int(self.global_steps)
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        order = objectives.whole_group_order(groups, sizes, workloads.tolist(), dp_size,
                                             int(self.config.actor_rollout_ref.rollout.n), methods, generator)
        batch.reorder(order)

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
