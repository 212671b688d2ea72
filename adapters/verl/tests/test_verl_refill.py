"""Batch editing on verl (``keep_rows`` and verl's ``algorithm.filter_groups``) inside verl's own sync
``ReplayBuffer``: the adapter's buffer classifies finished groups with the methods, verl's code does the rest.

The finished groups are real TransferQueue-format rows (``{uid}_{session}_{index}``, nested ``rm_scores`` and
``response_mask``, ``extra_fields``) served by an in-memory stand-in for ``tq.kv_batch_get``/``kv_clear``.
"""

from __future__ import annotations

import pytest
import torch
import transfer_queue as tq
from omegaconf import OmegaConf
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer
from verl.utils.tensordict_utils import list_of_dict_to_tensordict

import grpo_plugins_verl
from grpo_plugins import Method, hookimpl
from grpo_plugins.batch_editing import RefillExhausted, filter_groups_keep
from grpo_plugins_verl.refill import KEEP_ROWS_ONLY, PluginReplayBuffer, prepare_config, step_metrics
from grpo_plugins_verl.runtime import get_runtime
from grpo_plugins_verl.testing import run_config


class DynamicSampling(Method):
    """The core's dynamic-sampling rule (TRL's built-in ``filter_groups``) as a ``keep_rows`` method."""

    name = "dynamic_sampling"

    @hookimpl
    def keep_rows(self, batch):
        return filter_groups_keep(batch)


class HalfGroup(Method):
    name = "half_group"

    @hookimpl
    def keep_rows(self, batch):
        keep = torch.ones_like(batch.rewards, dtype=torch.bool)
        keep[0] = False
        return keep


class FakeQueue:
    """Rows per key, served as TransferQueue serves them (``kv_batch_get``), and cleared (``kv_clear``)."""

    def __init__(self, rows: dict):
        self.rows, self.cleared = rows, []

    def kv_batch_get(self, keys, partition_id, select_fields=None):
        return list_of_dict_to_tensordict([{f: self.rows[k][f] for f in select_fields} for k in keys])

    def kv_clear(self, keys, partition_id):
        self.cleared.extend(keys)


GROUPS = {  # uid -> per-session (reward, format, accuracy); two turns in session 0 of "g3"
    "g0": [(1.0, 1.0, 1.0), (0.0, 1.0, 0.0), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)],  # differs
    "g1": [(0.2, 1.0, 0.0)] * 4,  # constant
    "g2": [(0.5, 0.0, 0.0)],  # a group of one: kept, as verl keeps it
    "g3": [(0.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 0.0)],  # constant reward, the format differs
    "g4": [(0.0, 0.0, 0.0)] * 3,  # constant
}


def setup_buffer(monkeypatch, methods, metric: str, groups=GROUPS, **settings):
    gen = torch.Generator().manual_seed(0)
    rows, partition = {}, {}
    for uid, sessions in groups.items():
        for s, (reward, fmt, acc) in enumerate(sessions):
            for turn in range(2 if (uid == "g3" and s == 0) else 1):
                length = int(torch.randint(1, 5, (1,), generator=gen))
                scores = torch.zeros(length)
                scores[-1] = reward
                key = f"{uid}_{s}_{turn}"
                rows[key] = {"rm_scores": scores, "response_mask": torch.ones(length, dtype=torch.long),
                             "responses": torch.randint(3, 50, (length,), generator=gen),
                             "raw_prompt": [{"role": "user", "content": f"prompt of {uid}"}],
                             "extra_fields": {"reward_extra_info": {"score": reward, "format": fmt, "accuracy": acc}}}
                partition[key] = {"status": "success"}
    queue = FakeQueue(rows)
    monkeypatch.setattr(tq, "kv_batch_get", queue.kv_batch_get)
    monkeypatch.setattr(tq, "kv_clear", queue.kv_clear)
    grpo_plugins_verl.configure(methods)
    runtime = get_runtime(OmegaConf.create({}))
    runtime.prompt_ids.update({uid: 10 + i for i, uid in enumerate(groups)})
    runtime.dataset_index.update({uid: i for i, uid in enumerate(groups)})
    kwargs = dict(trainer_mode="sync", trainer_config=OmegaConf.create({}), max_off_policy_threshold=None,
                  max_off_policy_strategy="drop", sampler_kwargs={}, refill_fn=lambda n: n, filter_groups_metric=metric,
                  train_batch_size=2, gen_batch_size=1)
    verl = ReplayBuffer(**{**kwargs, "filter_groups_metric": "reward"})  # verl's own DAPO filter on the reward
    ours = PluginReplayBuffer(**kwargs, runtime=runtime, **settings)
    for buffer in (verl, ours):
        buffer.partitions["train"] = dict(partition)
        buffer.finished_keys["train"] = set(groups)
    return verl, ours, runtime, queue


def test_dynamic_sampling_decides_as_verl_dapo_filter(monkeypatch):
    """On the same finished groups, the core's dynamic-sampling rule run as keep_rows drops exactly the groups
    verl's DAPO filter (metric=reward) drops: constant groups of two or more rows (turn rows included)."""
    verl, ours, _, _ = setup_buffer(monkeypatch, [DynamicSampling()], KEEP_ROWS_ONLY)
    dropped_by_verl, counts = verl._dapo_filtered_keys("train")
    dropped, _ = ours._dapo_filtered_keys("train")
    assert dropped_by_verl == {"g1", "g3", "g4"} and dropped == dropped_by_verl
    assert sorted(counts.values()) == [1, 2]  # verl counts the dropped groups per shared value (0.2 once, 0 twice)
    assert ours._dapo_filtered_keys("train")[0] == dropped  # decided once, from the cache


def test_verl_filter_and_keep_rows_drop_the_union(monkeypatch):
    """prs_vspo keeps g3 (its format differs, so its PRS rewards do); verl's own filter on the reward drops it:
    with both, a group is dropped when either drops it."""
    pytest.importorskip("grpo_plugin_prs_vspo")
    _, ours, _, _ = setup_buffer(monkeypatch, [{"prs_vspo": {"value_sampling": False}}], KEEP_ROWS_ONLY,
                                 reward_keys=["format", "accuracy"])
    assert ours._dapo_filtered_keys("train")[0] == {"g1", "g4"}
    _, both, _, _ = setup_buffer(monkeypatch, [{"prs_vspo": {"value_sampling": False}}], "reward",
                                 reward_keys=["format", "accuracy"])
    assert both._dapo_filtered_keys("train")[0] == {"g1", "g3", "g4"}


def test_a_partly_kept_group_is_refused_naming_the_method(monkeypatch):
    _, ours, _, _ = setup_buffer(monkeypatch, [HalfGroup()], KEEP_ROWS_ONLY)
    with pytest.raises(ValueError, match=r"keep_rows of \['half_group'\] kept some rows of prompt id\(s\) \[10\]"):
        ours._dapo_filtered_keys("train")


def test_cleared_groups_are_forgotten(monkeypatch):
    _, ours, runtime, queue = setup_buffer(monkeypatch, [DynamicSampling()], KEEP_ROWS_ONLY)
    dropped, _ = ours._dapo_filtered_keys("train")
    ours._clear_groups("train", dropped)
    assert set(runtime.prompt_ids) == {"g0", "g2"} and set(runtime.dataset_index) == {"g0", "g2"}
    assert {key.split("_")[0] for key in queue.cleared} == {"g1", "g3", "g4"}
    assert set(ours.method_decisions) == {"g0", "g2"}


def test_refills_are_bounded_by_max_num_gen_batches(monkeypatch):
    """verl's V1 buffer ignores filter_groups.max_num_gen_batches; the adapter's bounds the step's prompts."""
    _, ours, _, _ = setup_buffer(monkeypatch, [DynamicSampling()], KEEP_ROWS_ONLY, max_num_gen_batches=2)
    assert ours.refill_fn(2) == 2  # 2 + 2 prompts: two train batches of 2
    with pytest.raises(RefillExhausted, match=r"\['dynamic_sampling'\].*max_num_gen_batches=2"):
        ours.refill_fn(1)
    metrics = step_metrics(ours, {"training/filter_groups/evicted_samples": 3}, rollouts=24, first_rollouts=8)
    assert metrics == {"batch_editing/generation_rounds": 2.0, "batch_editing/refill_rounds": 1.0,
                       "batch_editing/refill_prompts": 2.0, "batch_editing/rollouts": 24.0,
                       "batch_editing/refill_rollouts": 16.0, "batch_editing/dropped_groups": 3.0,
                       "batch_editing/discarded_surplus_groups": 0.0}


def test_prepare_config_switches_verl_dapo_path_on_for_keep_rows():
    from grpo_plugins import Composition

    config = run_config()
    assert prepare_config(config, Composition([DynamicSampling()]))
    assert config.algorithm.filter_groups.enable and config.algorithm.filter_groups.metric == KEEP_ROWS_ONLY
    own = run_config("algorithm.filter_groups.enable=True", "algorithm.filter_groups.metric=acc")
    assert prepare_config(own, Composition([DynamicSampling()])) and own.algorithm.filter_groups.metric == "acc"
    plain = run_config()
    assert not prepare_config(plain, Composition([])) and not plain.algorithm.filter_groups.enable
