"""Per-row data for the advantage stage beyond what verl hands an estimator.

verl calls an advantage estimator with rewards, the response mask and the uid only. The
``grpo_plugins`` trainer fetches more from TransferQueue for the same rows (same keys, same order)
just before verl's advantage step, so methods can read completion tokens, behaviour and reference
log-probs, prompts and per-reward-function scores. Shapes: ``B`` rows, ``T`` response tokens.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch

TOKEN_FIELDS = {"responses": "completion_ids", "old_log_probs": "old_log_probs", "ref_log_prob": "ref_log_probs",
                "entropy": "old_entropies"}
"""TransferQueue field -> ``GRPOBatch`` field, for the ``(B, T)`` response-aligned tensors."""
ROW_FIELDS = ("extra_fields", "raw_prompt")
"""TransferQueue fields read per row: reward-function extra info and the chat prompt."""
TOTAL_KEY = "score"
"""``reward_extra_info`` entry holding verl's total reward (not a component)."""


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


def batch_extras(
    data: Any,
    reward_keys: Iterable[str] | None = None,
    reward_weights: Sequence[float] | None = None,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """``GRPOBatch`` fields from a TransferQueue ``TensorDict`` of the advantage-stage rows.

    Returns a dict with any of ``completion_ids``/``old_log_probs``/``ref_log_probs``/``old_entropies``
    (the old-log-prob pass's token entropies) ``(B, T)``,
    ``reward_components`` ``(B, K)`` + ``reward_names`` (+ ``reward_weights`` ``(K,)`` when given,
    in the order of ``reward_keys``), ``prompts`` (``B`` chat prompts) and, with a ``tokenizer``,
    ``completions`` (``B`` decoded responses, special tokens dropped).
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
    return extras
