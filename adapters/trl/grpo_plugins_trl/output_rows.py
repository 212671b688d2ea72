"""Rows of TRL's output dict moved between ranks and rounds, for the features that edit a generation batch
after scoring (batch editing, :mod:`grpo_plugins_trl.refill`; injected rows, :mod:`grpo_plugins_trl.injection`).

TRL's ``_generate_and_score_completions`` returns this rank's ``n`` rows as ``(n, ...)`` tensors: prompt
tensors (``prompt_*``) padded on the left, everything else on the right; token ids padded with the
tokenizer's pad token, ``tool_mask`` with 1, the rest with 0. An edited batch is built from the global
rows (:func:`gather_global`), joined across rounds (:func:`concat_rows`), selected, and cut back to the
columns its rows use (:func:`finish`), with ``num_items_in_batch`` recounted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from grpo_plugins_trl.trainer import PluginGRPOTrainer

IMAGE_COLUMNS = ("image", "images")


def row_editing_blockers(args: Any, dataset: Any, images: str, aggregation: str) -> list[str]:
    """The TRL settings under which the adapter cannot add or replace rows after scoring, as reasons: image
    columns (``images``: why) and an aggregation that normalises over the batch first (``aggregation``: why)."""
    reasons = []
    columns = set(getattr(dataset, "column_names", None) or ())
    if columns & set(IMAGE_COLUMNS):
        reasons.append(f"image columns {sorted(columns & set(IMAGE_COLUMNS))} ({images})")
    if args.multi_objective_aggregation != "sum_then_normalize":
        reasons.append(f"multi_objective_aggregation='{args.multi_objective_aggregation}' ({aggregation}; use "
                       "'sum_then_normalize')")
    return reasons


def loss_mask(out: dict) -> torch.Tensor:
    """``(n, T)``: the tokens TRL's loss counts, ``completion_mask`` times ``tool_mask`` when there is one."""
    return out["completion_mask"] if "tool_mask" not in out else out["completion_mask"] * out["tool_mask"]


def left_padded(key: str) -> bool:
    """Prompt tensors are padded on the left (TRL's layout), everything else on the right."""
    return key.startswith("prompt_")


def pad_value(key: str, trainer: "PluginGRPOTrainer") -> float:
    """What TRL pads ``key`` with: the pad token for token ids, 1 for ``tool_mask``, else 0."""
    if key in ("prompt_ids", "completion_ids"):
        return trainer._tokenizer.pad_token_id
    return 1 if key == "tool_mask" else 0


def gather_global(trainer: "PluginGRPOTrainer", key: str, value: torch.Tensor) -> torch.Tensor:
    """This rank's ``(n, ...)`` tensor ``key`` -> ``(N, ...)`` of every rank (token widths padded across
    ranks on the key's side)."""
    acc = trainer.accelerator
    if value.dim() >= 2:
        value = acc.pad_across_processes(value, dim=1, pad_index=pad_value(key, trainer), pad_first=left_padded(key))
    return acc.gather(value)


def concat_rows(key: str, parts: list[torch.Tensor], pad: float) -> torch.Tensor:
    """Rows of several tensors ``key`` in one, token widths padded with ``pad`` to the widest (on the key's side)."""
    if parts[0].dim() < 2:
        return torch.cat(parts)
    width = max(p.shape[1] for p in parts)
    padded = []
    for p in parts:
        if p.shape[1] < width:
            fill = p.new_full((p.shape[0], width - p.shape[1], *p.shape[2:]), pad)
            p = torch.cat([fill, p] if left_padded(key) else [p, fill], dim=1)
        padded.append(p)
    return torch.cat(padded)


def trim_padding(out: dict, pad_to: int | None) -> None:
    """Drop the columns no local row uses (leading prompt padding, trailing completion padding), keeping
    widths a multiple of ``pad_to`` when TRL pads to one."""
    prompt_used = out["prompt_mask"].sum(0) > 0
    start = int(prompt_used.float().argmax()) if bool(prompt_used.any()) else out["prompt_mask"].shape[1] - 1
    if pad_to:
        start -= start % pad_to
    width = out["completion_mask"].shape[1]
    used = (out["completion_mask"].sum(0) > 0).nonzero()
    keep = int(used.max()) + 1 if used.numel() else 1
    if pad_to:
        keep = min(width, -(-keep // pad_to) * pad_to)
    for key, value in list(out.items()):
        if value.dim() < 2:
            continue
        if left_padded(key):
            out[key] = value[:, start:]
        elif value.shape[1] == width:
            out[key] = value[:, :keep]


def finish(trainer: "PluginGRPOTrainer", out: dict) -> dict:
    """An edited output dict made ready for TRL: padding no local row uses trimmed, ``num_items_in_batch``
    (the loss tokens of every rank) recounted."""
    trim_padding(out, pad_to=getattr(trainer, "pad_to_multiple_of", None))
    out["num_items_in_batch"] = trainer.accelerator.gather(loss_mask(out).sum()).sum()
    return out
