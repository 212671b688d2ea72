"""Per-row data for the advantage stage beyond what verl hands an estimator.

verl calls an advantage estimator with rewards, the response mask and the uid only. The
``grpo_plugins`` trainer fetches more from TransferQueue for the same rows (same keys, same order)
just before verl's advantage step, so methods can read completion tokens, behaviour and reference
log-probs, prompts and per-reward-function scores. Shapes: ``B`` rows, ``T`` response tokens.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from grpo_plugins import GRPOBatch, ParallelContext

TOKEN_FIELDS = {"responses": "completion_ids", "old_log_probs": "old_log_probs", "ref_log_prob": "ref_log_probs",
                "entropy": "old_entropies"}
"""TransferQueue field -> ``GRPOBatch`` field, for the ``(B, T)`` response-aligned tensors."""
ROW_FIELDS = ("extra_fields", "raw_prompt")
"""TransferQueue fields read per row: reward-function extra info and the chat prompt."""
TOTAL_KEY = "score"
"""``reward_extra_info`` entry holding verl's total reward (not a component)."""
STEP_REWARD, STEP_KEY = "step_reward", "step_key"
"""Entries of an agent-loop output's ``extra_fields``: the turn's step reward (None: none) and the 63-bit key
of the state it acted in (None or -1: unknown); read into ``GRPOBatch.steps`` for methods that need it."""
TURNS = "turns"
"""Key of :func:`batch_extras`'s result holding :func:`turn_rows` (not a ``GRPOBatch`` field)."""


def fit_width(value: torch.Tensor, width: int) -> torch.Tensor:
    """A nested ``(B, j)`` or right-padded ``(B, T')`` response tensor as ``(B, width)``: cut or zero-padded
    (only padding changes); a ``(B,)`` tensor as it is."""
    if value.is_nested:
        value = value.to_padded_tensor(0.0)
    if value.dim() < 2:
        return value
    if value.shape[1] >= width:
        return value[:, :width]
    return torch.nn.functional.pad(value, (0, width - value.shape[1]))


def _plain(value: Any) -> Any:
    return getattr(value, "data", value)  # NonTensorData -> its payload


def reward_components(
    infos: Sequence[dict], names: Sequence[str] | None = None
) -> tuple[torch.Tensor | None, tuple[str, ...]]:
    """``(B, K)`` float reward components from each row's ``reward_extra_info`` dict, and their names.

    ``names`` picks the components (``algorithm.grpo_plugins_reward_keys``); by default every
    numeric entry except ``score`` (verl's total reward, which ``compute_score`` returns beside its
    parts), in sorted order. A row without an entry gets NaN (not applicable).
    """
    if names is None:
        names = sorted(
            {k for info in infos for k, v in info.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            - {TOTAL_KEY}
        )
    if not names:
        return None, ()
    rows = [[float(info[name]) if isinstance(info.get(name), (int, float)) else math.nan for name in names] for info in infos]
    return torch.tensor(rows, dtype=torch.float32), tuple(names)


def turn_rows(keys: Sequence[str], extra_fields: Sequence[Any] | None = None) -> dict[str, torch.Tensor | None]:
    """Each row's place in its trajectory, from verl's trajectory keys ``{uid}_{session}_{index}`` (the
    agent loop writes output ``index`` of session ``session`` of prompt group ``uid``; a single-turn loop
    writes index 0 only), and the step fields of its agent-loop ``extra_fields``.

    Returns ``(B,)`` tensors: ``trajectory`` (one id per ``{uid}_{session}``; a key of another form, e.g. a
    padding row's, is a trajectory of its own), ``turn`` (the index), ``reward`` (:data:`STEP_REWARD`,
    NaN where absent; None when no row has one) and ``key`` (:data:`STEP_KEY`, -1 where absent; None when no
    row has one).

    Raises:
        ValueError: a step key that is not an integer in ``[0, 2**63)``.
    """
    sessions, turns = [], []
    for key in map(str, keys):
        parts = key.rsplit("_", 2)
        known = len(parts) == 3 and parts[2].isdigit()
        sessions.append(f"{parts[0]}_{parts[1]}" if known else key)
        turns.append(int(parts[2]) if known else 0)
    _, trajectory = np.unique(np.asarray(sessions, dtype=object).astype(str), return_inverse=True)
    infos = [(_plain(row) or {}) for row in (extra_fields if extra_fields is not None else [{}] * len(sessions))]
    rewards = [info.get(STEP_REWARD) for info in infos]
    state_keys = [info.get(STEP_KEY) for info in infos]
    wrong = [k for k in state_keys if k is not None and not (isinstance(k, (int, np.integer)) and -1 <= int(k) < 2**63)]
    if wrong:
        raise ValueError(f"agent-loop extra field '{STEP_KEY}' must be an integer in [0, 2**63) or None (-1: unknown), "
                         f"got {wrong[0]!r}")
    return {
        "trajectory": torch.as_tensor(trajectory.reshape(-1), dtype=torch.long),
        "turn": torch.tensor(turns, dtype=torch.long),
        "reward": None if all(r is None for r in rewards) else
        torch.tensor([math.nan if r is None else float(r) for r in rewards], dtype=torch.float32),
        "key": None if all(k is None for k in state_keys) else
        torch.tensor([-1 if k is None else int(k) for k in state_keys], dtype=torch.long),
    }


def batch_extras(
    data: Any,
    reward_keys: Iterable[str] | None = None,
    reward_weights: Sequence[float] | None = None,
    tokenizer: Any = None,
    keys: Sequence[str] | None = None,
    step_fields: bool = True,
) -> dict[str, Any]:
    """``GRPOBatch`` fields from a TransferQueue ``TensorDict`` of the advantage-stage rows.

    Returns a dict with any of ``completion_ids``/``old_log_probs``/``ref_log_probs``/``old_entropies``
    (the old-log-prob pass's token entropies) ``(B, T)``,
    ``reward_components`` ``(B, K)`` + ``reward_names`` (+ ``reward_weights`` ``(K,)`` when given,
    in the order of ``reward_keys``), ``prompts`` (``B`` chat prompts) and, with a ``tokenizer``,
    ``completions`` (``B`` decoded responses, special tokens dropped) and, with the rows' trajectory
    ``keys``, :data:`TURNS` (:func:`turn_rows`; the step fields of ``extra_fields`` only with ``step_fields``).
    """
    extras: dict[str, Any] = {}
    present = [key for key in TOKEN_FIELDS if key in data.keys()]
    if present:
        padded = data.select(*present).to_padded_tensor()
        for key in present:
            extras[TOKEN_FIELDS[key]] = padded[key]
    if "extra_fields" in data.keys():
        infos = [(_plain(row) or {}).get("reward_extra_info", {}) or {} for row in data["extra_fields"]]
        components, names = reward_components(infos, None if reward_keys is None else list(reward_keys))
        if components is not None:
            extras["reward_components"], extras["reward_names"] = components, names
            if reward_weights is not None:
                if reward_keys is None or len(list(reward_weights)) != len(names):
                    raise ValueError(
                        f"reward weights {list(reward_weights)} need reward keys of the same length, got {reward_keys}"
                    )
                extras["reward_weights"] = torch.tensor([float(w) for w in reward_weights], dtype=torch.float32)
    if "raw_prompt" in data.keys():
        extras["prompts"] = [_plain(row) for row in data["raw_prompt"]]
    if tokenizer is not None and "responses" in data.keys():
        responses = data["responses"]
        rows = responses.unbind() if responses.is_nested else list(responses)
        extras["completions"] = [tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in rows]
    if keys is not None:
        read = step_fields and "extra_fields" in data.keys()
        extras[TURNS] = turn_rows(keys, data["extra_fields"] if read else None)
    return extras


SCORED_FIELDS = ("rm_scores", "response_mask", "responses", "extra_fields", "raw_prompt")
"""TransferQueue fields of scored rows read for the batch editing hooks (:func:`scored_batch`)."""


def scored_batch(runtime: Any, keys: Sequence[str], data: Any, reward_keys: Iterable[str] | None = None,
                 reward_weights: Sequence[float] | None = None, tokenizer: Any = None) -> GRPOBatch:
    """The ``GRPOBatch`` of scored rows before the advantage stage, as ``keep_rows`` and ``inject_rows`` see
    it: trajectory ``keys`` (``{uid}_{session}_{index}``) and their TransferQueue ``data`` (:data:`SCORED_FIELDS`).

    Rewards are the sums of ``rm_scores`` (unshaped), with the response mask and tokens, the reward
    components (and weights) of ``reward_extra_info``, the chat prompts, and, when a method requires
    them, the decoded completions (``tokenizer``) and the dataset rows (``runtime.rows_for``); the step
    is the trainer's current one. Row order: ``keys``.
    """
    uids = np.array([str(key).rsplit("_", 2)[0] for key in keys], dtype=object)
    padded = data.select("rm_scores", "response_mask").to_padded_tensor()
    required = runtime.composition.required_fields()
    fields = batch_extras(data, reward_keys, reward_weights, tokenizer if "completions" in required else None)
    batch = GRPOBatch(
        prompt_ids=runtime.ids_for(uids),
        rewards=padded["rm_scores"].float().sum(dim=-1),
        completion_mask=padded["response_mask"].float(),
        step=runtime.step,
        total_steps=runtime.total_steps,
        parallel=ParallelContext(gathered=True),
        **fields,
    )
    if "rows" in required and runtime.rows_for is not None:
        batch.rows = runtime.rows_for(runtime.dataset_indices(uids))
    return batch
