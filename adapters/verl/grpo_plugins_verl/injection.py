"""Injected rows on verl (feature ``row_injection``: the ``inject_rows`` hook), with the ``grpo_plugins`` trainer.

The rows' contract and kinds are the core's (:mod:`grpo_plugins.injection`); this module is the verl glue,
installed only when a method implements ``inject_rows`` (otherwise nothing here runs and verl's path is
unchanged). In each ``_step_once``, after verl's replay buffer sampled the step's scored rows (and after
the refill of batch editing, when it runs) and before ``_balance_batch``:

1. The sampled rows' ``GRPOBatch`` (:func:`~grpo_plugins_verl.extras.scored_batch`: rewards summed from
   ``rm_scores``, response mask and tokens, reward components from ``reward_extra_info``, prompts, and the
   completions and dataset rows when a method requires them) goes to ``inject_rows``; the rows are checked.
2. Each row becomes a verl trajectory in TransferQueue, key ``{uid}_inj{j}_0`` (``uid``: the group of its
   prompt, so verl and the advantage stage group it there): a copy of the group's first row with its
   completion tokens (text tokenised without special tokens, the end-of-sequence token appended, as a
   generated completion ends; token ids as they are; both cut at ``rollout.response_length``),
   ``input_ids``/``attention_mask``/``position_ids`` rebuilt (verl's text-only position ids), response and
   loss mask 1 on every completion token, and ``rm_scores`` with the reward on the last token: the given
   ``reward`` (``reward_extra_info`` empty: its reward components are NaN), else the run's reward loop
   (``RewardLoopWorker.compute_score``, as verl's agent loop scores a trajectory).
3. The rows join the step's ``KVBatchMeta`` after the sampled rows; verl then balances and pads the batch
   (its padding rows make the row count a multiple of the data-parallel size and the actor's mini-batch,
   ``ppo_mini_batch_size * rollout.n`` rows), computes old and reference log-probs of every row, runs the
   advantage stage and the actor update with its own mini- and micro-batching: a step with ``K`` injected
   rows trains on ``N + K`` rows (possibly one more mini-batch, i.e. one more optimiser step).
4. The demonstrator is not the sampler: after verl's old-log-prob pass an injected row's
   ``rollout_log_probs`` are its old log-probs (ratio 1 in verl's rollout correction, as TRL's vLLM
   importance ratio is 1 for injected rows). verl's rollout-vs-actor debug metrics of that pass
   (``training/rollout_probs_diff_*``) still count injected rows with a zero sampling log-prob.
5. The advantage stage gets each row's kind in ``row_data["injected"]`` (0: generated), carried to the
   loss with every ``row_data`` entry.

Logged per step: ``injection/rows`` and ``injection/<kind>`` (rows per kind). verl's own padding rows
complete the batch, so there are no filler rows on verl.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from grpo_plugins import CompositionError
from grpo_plugins.injection import (
    INJECTED_KEY, InjectedRow, completion_tokens, method_conflicts, parse_rows, source_rows,
)

from grpo_plugins_verl.extras import SCORED_FIELDS, scored_batch
from grpo_plugins_verl.settings import COLOCATED_REWARD_MODEL, colocated_reward_model, reward_settings

if TYPE_CHECKING:
    from grpo_plugins import Composition

FEATURE = "row_injection"
METRIC_PREFIX = "injection/"
SESSION_PREFIX = "inj"
"""Session part of an injected row's key ``{uid}_inj{j}_0``."""
UNSUPPORTED_FIELDS = ("routed_experts", "teacher_ids", "teacher_logprobs")
"""Per-token sample fields an injected row cannot be given (refused when a sampled row holds them)."""


def enabled(composition: "Composition") -> bool:
    return composition.implements("inject_rows")


def injection_blockers(config: Any) -> list[str]:
    """verl settings under which the adapter cannot inject rows, as reasons (capability check)."""
    reasons = []
    if (config.algorithm.get("rollout_correction", None) or {}).get("bypass_mode", False):
        reasons.append("algorithm.rollout_correction.bypass_mode=True (verl takes old_log_probs from the rollout, "
                       "which an injected row does not have)")
    if colocated_reward_model(config):
        reasons.append(f"{COLOCATED_REWARD_MODEL}: the adapter scores injected rows with verl's reward loop workers")
    return reasons


def injection_problems(composition: "Composition") -> list[str]:
    """Start-up problems of injected rows with methods whose per-row data the adapter does not extend to them."""
    if not enabled(composition):
        return []
    who = composition.providers("inject_rows")
    reasons = []
    reasons += method_conflicts(composition)
    return [f"method(s) {who} inject rows (hook inject_rows), which cannot run with {reason}" for reason in reasons]


def injected_sample(source: dict, response_ids: Sequence[int], reward: float, reward_info: dict) -> dict:
    """A TransferQueue sample of an injected row: ``source`` (a sampled row of its group, as verl's
    ``kv_batch_get(...)[i]`` gives it) with the completion ``response_ids`` and the ``reward`` on its last token."""
    from verl.trainer.ppo.padding_utils import build_padding_position_ids

    sample = {key: value.clone() if isinstance(value, torch.Tensor) else copy.deepcopy(_plain(value))
              for key, value in source.items()}
    responses = torch.tensor(list(response_ids), dtype=torch.int64)
    prompts = sample["prompts"]
    input_ids = torch.cat([prompts, responses])
    attention_mask = torch.ones_like(input_ids)
    response_mask = torch.ones_like(responses)
    rm_scores = torch.zeros(len(responses), dtype=torch.float32)
    rm_scores[-1] = reward
    extra = dict(sample.get("extra_fields") or {})
    extra["reward_extra_info"] = dict(reward_info)
    sample.update(responses=responses, input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=build_padding_position_ids(sample.get("position_ids"), attention_mask),
                  response_mask=response_mask, loss_mask=response_mask.clone(), rm_scores=rm_scores,
                  extra_fields=extra, num_turns=sample.get("num_turns", 0))
    if "rollout_log_probs" in sample:  # set to the old log-probs after verl's old-log-prob pass
        sample["rollout_log_probs"] = torch.zeros(len(responses), dtype=torch.float32)
    return sample


def _plain(value: Any) -> Any:
    return value if isinstance(value, torch.Tensor) else getattr(value, "data", value)  # NonTensorData -> payload


def _wait(result: Any) -> Any:
    """A reward worker's answer: a Ray ``ObjectRef`` (``ray.get``) or a future (``.result()``)."""
    if hasattr(result, "result") and callable(result.result):
        return result.result()
    import ray

    return ray.get(result)


class Injection:
    """Adds the ``inject_rows`` rows to each step's batch (module docstring)."""

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self.codes: dict[str, int] = {}  # verl key -> kind code of this step's injected rows
        self.last_rows: list[InjectedRow] = []  # the latest step's injected rows, for tests and debugging
        self.rollout_log_probs = False  # whether the sampled rows carry verl's rollout_log_probs

    @classmethod
    def install(cls, trainer: Any) -> "Injection | None":
        """An ``Injection`` when a method implements ``inject_rows``, else None (nothing of this module runs)."""
        return cls(trainer) if enabled(trainer.grpo_plugins.composition) else None  # check_run refused the problems

    # ------------------------------------------------------------------ the batch
    def inject(self, batch: Any, metrics: dict) -> Any:
        """verl's sampled ``KVBatchMeta`` -> the batch with the injected rows (module docstring)."""
        import transfer_queue as tq
        from transfer_queue import KVBatchMeta
        from verl.utils.tensordict_utils import list_of_dict_to_tensordict

        t = self.trainer
        composition = t.grpo_plugins.composition
        keys = list(batch.keys)
        data = tq.kv_batch_get(keys=keys, partition_id=batch.partition_id, select_fields=list(SCORED_FIELDS))
        scored = scored_batch(t.grpo_plugins, keys, data, *reward_settings(t.config.algorithm), t.tokenizer)
        rows = parse_rows(composition.run_inject_rows(scored), scored.prompt_ids, composition.providers("inject_rows"))
        self.last_rows, self.codes = rows, {}
        metrics[METRIC_PREFIX + "rows"] = float(len(rows))
        for kind, count in sorted(Counter(r.kind for r in rows).items()):
            metrics[METRIC_PREFIX + kind] = float(count)
        if not rows:
            return batch
        source = source_rows(scored.prompt_ids, rows).tolist()  # each row's first sampled row of its prompt
        sources = sorted(set(source))
        fetched = tq.kv_batch_get(keys=[keys[i] for i in sources], partition_id=batch.partition_id)
        source_of = {i: fetched[j] for j, i in enumerate(sources)}
        limit = int(t.config.actor_rollout_ref.rollout.response_length)
        token_lists = completion_tokens(rows, t.tokenizer, limit)
        new_keys, samples, tags = [], [], []
        for j, (row, ids, index) in enumerate(zip(rows, token_lists, source)):
            source = {key: source_of[index][key] for key in source_of[index].keys()}
            held = [name for name in UNSUPPORTED_FIELDS if isinstance(source.get(name), torch.Tensor)]
            if held or source.get("multi_modal_inputs"):
                raise CompositionError(f"inject_rows of {composition.providers('inject_rows')}: the sampled rows hold "
                                       f"{held or ['multi_modal_inputs']}, which the adapter cannot give injected rows")
            reward, info = (row.reward, {}) if row.reward is not None else self._score(source, ids)
            samples.append(injected_sample(source, ids, reward, info))
            self.rollout_log_probs = "rollout_log_probs" in samples[-1]
            uid = keys[index].rsplit("_", 2)[0]
            new_keys.append(f"{uid}_{SESSION_PREFIX}{j}_0")
            prompt_len = int(samples[-1]["prompts"].numel())
            tags.append({**copy.deepcopy(batch.tags[index]), "prompt_len": prompt_len, "response_len": len(ids),
                         "seq_len": prompt_len + len(ids)})
        tq.kv_batch_put(keys=new_keys, partition_id=batch.partition_id, fields=list_of_dict_to_tensordict(samples),
                        tags=tags)
        self.codes = {key: row.code for key, row in zip(new_keys, rows)}
        return KVBatchMeta(keys=keys + new_keys, tags=list(batch.tags) + tags, partition_id=batch.partition_id,
                           fields=batch.fields, extra_info=batch.extra_info)

    def _score(self, source: dict, response_ids: list[int]) -> tuple[float, dict]:
        """``(reward, reward_extra_info)`` of a completion of ``source``'s prompt, from the run's reward loop
        (``RewardLoopWorker.compute_score`` on the same inputs verl's agent loop gives it)."""
        from verl.protocol import DataProto
        from tensordict import TensorDict

        handles = getattr(self.trainer.reward_loop_manager, "reward_loop_worker_handles", None)
        if not handles:
            raise CompositionError(f"inject_rows of {self.trainer.grpo_plugins.composition.providers('inject_rows')} "
                                   "returned rows without a reward, but the run has no reward loop workers to score them")
        sample = injected_sample(source, response_ids, 0.0, {})
        tensors = {name: sample[name].unsqueeze(0) for name in
                   ("prompts", "responses", "attention_mask", "input_ids", "position_ids")}
        skip = {"extra_fields", "metrics", "num_turns", "multi_modal_inputs", "mm_processor_kwargs"}
        non_tensor = {}
        for name, value in sample.items():
            if name in skip or isinstance(value, torch.Tensor):
                continue
            non_tensor[name] = np.empty(1, dtype=object)
            non_tensor[name][0] = value
        for name, value in (("__num_turns__", sample.get("num_turns", 0)), ("tool_extra_fields", {}),
                            ("prompt_len", int(sample["prompts"].numel())), ("response_len", len(response_ids))):
            non_tensor[name] = np.empty(1, dtype=object)
            non_tensor[name][0] = value
        request = DataProto(batch=TensorDict(tensors, batch_size=1), non_tensor_batch=non_tensor)
        result = _wait(handles[0].compute_score.remote(request))
        reward = float(result["reward_score"])
        if not math.isfinite(reward):
            raise ValueError(f"the reward loop scored an injected row {reward}")
        return reward, dict(result.get("reward_extra_info", {}) or {})

    # ------------------------------------------------------------------ after verl's passes
    def sampling_log_probs(self, batch: Any) -> None:
        """After verl's old-log-prob pass: the injected rows' ``rollout_log_probs`` are their old log-probs."""
        import transfer_queue as tq

        keys = [key for key in batch.keys if key in self.codes]
        if not keys or not self.rollout_log_probs:
            return
        from tensordict import TensorDict

        data = tq.kv_batch_get(keys=keys, partition_id=batch.partition_id, select_fields=["old_log_probs"])
        tq.kv_batch_put(keys=keys, partition_id=batch.partition_id,
                        fields=TensorDict({"rollout_log_probs": data["old_log_probs"]}, batch_size=len(keys)))

    def kind_codes(self, keys: Sequence[str]) -> torch.Tensor:
        """``(B,)`` int64: each row's kind code (0: generated, verl's padding rows included)."""
        return torch.tensor([self.codes.get(str(key), 0) for key in keys], dtype=torch.long)


def add_field(trainer: Any, keys: Sequence[str]) -> None:
    """Before the advantage stage: each row's kind in the stage's ``row_data["injected"]`` (trainer extras)."""
    injection = getattr(trainer, "injection", None)
    if injection is not None and trainer.grpo_plugins.extras is not None:
        trainer.grpo_plugins.extras["row_data"] = {INJECTED_KEY: injection.kind_codes(keys)}
