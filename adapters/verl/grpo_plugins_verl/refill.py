"""Batch editing on verl: ``keep_rows`` methods and verl's own dynamic sampling (``algorithm.filter_groups``)
through verl's V1 DAPO filter and refill (feature ``batch_editing``).

verl 0.9.1's sync trainer drops and refills groups inside its replay buffer (``ReplayBuffer.sample``): each
finished prompt group is classified once; a dropped group is cleared from TransferQueue and earns two
refill credits, spent in ``refill_fn`` (the trainer's ``_add_prompts_to_generate``, one prompt per
dataloader fetch, ``data.gen_batch_size=1``) while at most ``max_inflight_gen_batches`` train batches of
prompts are in flight; once enough groups are kept, the requests in flight are drained and surplus
groups discarded. The adapter reuses all of it and changes only the classification
(:class:`PluginReplayBuffer`):

- a group is dropped when verl's own filter drops it (``algorithm.filter_groups.enable=True``: all its
  rows share ``algorithm.filter_groups.metric``; the built-in dynamic sampling option) **or** when an
  enabled method's ``keep_rows`` drops it. ``keep_rows`` sees a ``GRPOBatch`` of the groups that finished
  since the previous poll (:func:`~grpo_plugins_verl.extras.scored_batch`, as ``inject_rows`` sees it;
  verl classifies groups as they finish, so a method's batch statistics cover those groups, not the
  whole step), and must keep or drop
  whole groups (:func:`grpo_plugins.batch_editing.kept_groups`);
- a run with a ``keep_rows`` method and verl's filter off switches verl's DAPO path on with the metric
  :data:`KEEP_ROWS_ONLY` (:func:`prepare_config`): only the methods decide;
- ``algorithm.filter_groups.max_num_gen_batches`` (which verl's V1 buffer ignores) bounds the prompts a
  step may submit: ``max_num_gen_batches * train_batch_size`` in all; a refill beyond it raises
  :class:`~grpo_plugins.batch_editing.RefillExhausted` (0: no bound, verl's default);
- the prompt ids of cleared groups are forgotten.

What each step cost is logged under ``batch_editing/`` (:func:`step_metrics`). Without a ``keep_rows``
method and with verl's filter off nothing here runs.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import torch
import transfer_queue as tq
from omegaconf import open_dict
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

from grpo_plugins.batch_editing import RefillExhausted, kept_groups

from grpo_plugins_verl.extras import SCORED_FIELDS, scored_batch
from grpo_plugins_verl.runtime import Runtime
from grpo_plugins_verl.settings import reward_settings

KEEP_ROWS_ONLY = "grpo_plugins_keep_rows"
"""``algorithm.filter_groups.metric`` set by the adapter: verl's DAPO path on, only ``keep_rows`` decides."""
METRIC_PREFIX = "batch_editing/"
VERL_EVICTED, VERL_SURPLUS = "training/filter_groups/evicted_samples", "training/filter_groups/discarded_surplus_samples"


def verl_filter(config: Any) -> bool:
    """Whether the run asks for verl's own dynamic sampling (``algorithm.filter_groups.enable``)."""
    groups = config.algorithm.get("filter_groups", None)
    return bool(groups is not None and groups.get("enable", False) and groups.get("metric", None) != KEEP_ROWS_ONLY)


def prepare_config(config: Any, composition: Any) -> bool:
    """Before verl builds its replay buffer: with a ``keep_rows`` method and verl's filter off, switch verl's
    DAPO path on with the metric :data:`KEEP_ROWS_ONLY`. Returns whether the run edits batches."""
    if not composition.implements("keep_rows"):
        return verl_filter(config)
    if not verl_filter(config):
        with open_dict(config):
            config.algorithm.filter_groups.enable = True
            config.algorithm.filter_groups.metric = KEEP_ROWS_ONLY
    return True


def groups_kept(runtime: Runtime, keys: list[str], data: Any, reward_keys: list[str] | None = None,
                reward_weights: list[float] | None = None) -> dict[str, bool]:
    """``{uid: kept}`` of the finished groups whose trajectory ``keys`` (``{uid}_{session}_{index}``) and
    TransferQueue rows ``data`` (:data:`~grpo_plugins_verl.extras.SCORED_FIELDS`) are given, from the
    enabled methods' ``keep_rows``."""
    batch = scored_batch(runtime, keys, data, reward_keys, reward_weights, runtime.tokenizer)
    uids = [str(key).rsplit("_", 2)[0] for key in keys]
    keep = runtime.composition.run_keep_rows(batch)
    if keep is None:
        return dict.fromkeys(uids, True)
    group_ids = torch.zeros(batch.num_groups, dtype=torch.long).scatter_(0, batch.group_index, batch.prompt_ids)
    who = f"keep_rows of {runtime.composition.providers('keep_rows')}"
    kept = kept_groups(keep, batch.group_index, batch.num_groups, who, group_ids)
    return dict(zip(uids, kept[batch.group_index].tolist()))


class PluginReplayBuffer(ReplayBuffer):
    """verl's sync ``ReplayBuffer`` whose DAPO classification also asks the ``keep_rows`` methods (module
    docstring). Built from the buffer verl made (:meth:`of`), with the same settings."""

    def __init__(self, *args: Any, runtime: Runtime, reward_keys: list[str] | None = None,
                 reward_weights: list[float] | None = None, max_num_gen_batches: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.runtime = runtime
        self.reward_keys = reward_keys
        self.reward_weights = reward_weights
        self.max_num_gen_batches = int(max_num_gen_batches or 0)
        self.verl_refill: Callable[[int], int] = self.refill_fn
        self.refill_fn = self._refill
        self.method_decisions: dict[str, bool] = {}
        self.refill_calls = self.refill_prompts = 0

    @classmethod
    def of(cls, buffer: ReplayBuffer, runtime: Runtime, config: Any) -> "PluginReplayBuffer":
        groups = config.algorithm.filter_groups
        reward_keys, weights = reward_settings(config.algorithm)
        settings = {name: getattr(buffer, name) for name in (
            "trainer_mode", "trainer_config", "max_off_policy_threshold", "max_off_policy_strategy", "sampler_kwargs",
            "poll_interval", "refill_fn", "filter_groups_metric", "train_batch_size", "gen_batch_size",
            "max_inflight_gen_batches", "sync_refill_failed_groups")}
        return cls(**settings, runtime=runtime, reward_keys=reward_keys, reward_weights=weights,
                   max_num_gen_batches=groups.get("max_num_gen_batches", 0))

    # ------------------------------------------------------------------ refill, bounded
    def sample(self, global_steps: int, partition_id: str, batch_size: int):
        self.refill_calls = self.refill_prompts = 0
        return super().sample(global_steps, partition_id, batch_size)

    def _refill(self, num_prompts: int) -> int:
        bound = self.max_num_gen_batches
        if bound > 0 and self.train_batch_size + self.refill_prompts + num_prompts > bound * self.train_batch_size:
            raise RefillExhausted(
                f"batch editing (verl's filter_groups, keep_rows of {self.runtime.composition.providers('keep_rows')}) "
                f"dropped too many groups: refilling {num_prompts} more prompt(s) would exceed "
                f"algorithm.filter_groups.max_num_gen_batches={bound} train batches of {self.train_batch_size} prompts "
                f"this step ({self.refill_prompts} refilled so far). The prompts are too easy or too hard for the "
                "model; raise max_num_gen_batches (0: no bound)")
        self.refill_calls += 1
        self.refill_prompts += num_prompts
        return self.verl_refill(num_prompts)

    # ------------------------------------------------------------------ classification
    def _dapo_filtered_keys(self, partition_id: str) -> tuple[set[str], Counter]:
        if partition_id == "val" or self.filter_groups_metric is None:
            return set(), Counter()
        if self.filter_groups_metric == KEEP_ROWS_ONLY:
            dropped, counts = set(), Counter()
        else:
            dropped, counts = super()._dapo_filtered_keys(partition_id)
        if self.runtime.composition.implements("keep_rows"):
            dropped = dropped | self._dropped_by_methods(partition_id)
        return dropped, counts

    def _dropped_by_methods(self, partition_id: str) -> set[str]:
        """Finished groups a ``keep_rows`` method drops (each group decided once, when it has finished)."""
        finished = self.finished_keys[partition_id]
        for uid in self.method_decisions.keys() - finished:
            del self.method_decisions[uid]
        new = finished - self.method_decisions.keys()
        keys = [key for key in self.partitions[partition_id] if key.split("_")[0] in new]
        if keys:
            data = tq.kv_batch_get(keys=keys, partition_id=partition_id, select_fields=list(SCORED_FIELDS))
            self.method_decisions.update(groups_kept(self.runtime, keys, data, self.reward_keys, self.reward_weights))
        for uid in new - self.method_decisions.keys():  # no trajectory: verl's failure handling decides
            self.method_decisions[uid] = True
        return {uid for uid, kept in self.method_decisions.items() if not kept}

    def _clear_groups(self, partition_id: str, uids: set[str]) -> None:
        super()._clear_groups(partition_id, uids)
        for uid in uids:
            self.method_decisions.pop(uid, None)
            self.runtime.prompt_ids.pop(uid, None)
            self.runtime.dataset_index.pop(uid, None)


def step_metrics(buffer: Any, metrics: dict, rollouts: int, first_rollouts: int) -> dict[str, float]:
    """What batch editing cost in one sampled batch, under ``batch_editing/``: submissions to the rollout
    (``generation_rounds``, the step's first included; ``refill_rounds``), prompts refilled, completions
    requested (``rollouts``, ``refill_rollouts``; requests drained after the batch filled included), groups
    dropped and surplus groups discarded (verl's own counts)."""
    refills = int(getattr(buffer, "refill_calls", 0))
    return {
        METRIC_PREFIX + "generation_rounds": float(1 + refills),
        METRIC_PREFIX + "refill_rounds": float(refills),
        METRIC_PREFIX + "refill_prompts": float(getattr(buffer, "refill_prompts", 0)),
        METRIC_PREFIX + "rollouts": float(rollouts),
        METRIC_PREFIX + "refill_rollouts": float(rollouts - first_rollouts),
        METRIC_PREFIX + "dropped_groups": float(metrics.get(VERL_EVICTED, 0)),
        METRIC_PREFIX + "discarded_surplus_groups": float(metrics.get(VERL_SURPLUS, 0)),
    }
