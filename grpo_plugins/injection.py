"""Rows injected after scoring, trainer-independent part (hook ``inject_rows``, feature ``row_injection``).

A method returns rows the policy did not generate (a demonstration for a prompt the model keeps
failing, a reference solution as an anchor) as dicts (``docs/design.md``, section 1)::

    {"prompt_id": 7, "completion": "The answer is 4.", "kind": "demonstration", "reward": 1.0}

- ``prompt_id`` (int): a prompt of the batch; the row joins that prompt's group (its prompt tokens are
  the group's).
- ``completion``: text (tokenised by the trainer as it tokenises completions, end-of-sequence token
  appended) or a list of token ids (taken as they are).
- ``kind`` (str, optional, default ``"injected"``): what the row is; methods read it back per row.
- ``reward`` (float, optional): the row's reward; without it the trainer's reward functions score it.
  A given reward leaves the row's ``reward_components`` NaN ("did not apply").

The adapter appends the rows to the generation batch, computes their log-probs as for every row and
marks each row's kind in ``row_data["injected"]`` (``(N,)`` int64): ``0`` for a generated rollout,
:func:`kind_code` of its kind for an injected row, in the advantage stage (``GRPOBatch.row_data``)
and in the loss stage (``LossInputs.row_data``), so a method can give injected rows their own loss or
leave them out of its group statistics (:func:`injected_rows`, :func:`rows_of_kind`).

The adapter keeps every rank's row count equal and a multiple of the micro-batch split
(:class:`Layout`): when the injected rows do not fill the last split, **filler rows** complete it.
A filler has no completion token (mask 0): it adds nothing to token sums, is in no ``GRPOBatch``
(methods never see it) and is counted by the trainer's per-micro-batch sequence means only.

Shapes: ``N`` rows of the batch, ``T`` completion tokens.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

if TYPE_CHECKING:
    from grpo_plugins.batch import GRPOBatch
    from grpo_plugins.composition import Composition

INJECTED_KEY = "injected"
"""The ``row_data`` key holding each row's kind code (0: a generated rollout)."""

DEFAULT_KIND = "injected"


def kind_code(kind: str) -> int:
    """The positive int64 code of a kind name in ``row_data["injected"]``: stable across runs and ranks
    (a 31-bit CRC of the name, never 0)."""
    return (zlib.crc32(kind.encode("utf-8")) & 0x7FFFFFFF) or 1


def injected_rows(row_data: Mapping[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """``(N,)`` bool: the injected rows (all False when the adapter marked none; ``like`` gives ``N`` and the device)."""
    codes = row_data.get(INJECTED_KEY)
    if codes is None:
        return torch.zeros(like.shape[0], dtype=torch.bool, device=like.device)
    return codes.to(like.device) != 0


def rows_of_kind(row_data: Mapping[str, torch.Tensor], kind: str, like: torch.Tensor) -> torch.Tensor:
    """``(N,)`` bool: the injected rows of ``kind``."""
    codes = row_data.get(INJECTED_KEY)
    if codes is None:
        return torch.zeros(like.shape[0], dtype=torch.bool, device=like.device)
    return codes.to(like.device) == kind_code(kind)


@dataclass(frozen=True)
class InjectedRow:
    """One validated row of an ``inject_rows`` output."""

    prompt_id: int
    completion: str | tuple[int, ...]
    kind: str = DEFAULT_KIND
    reward: float | None = None

    @property
    def code(self) -> int:
        return kind_code(self.kind)


def method_conflicts(composition: "Composition") -> list[str]:
    """Why the enabled methods cannot run next to an ``inject_rows`` method (empty when none injects):
    per-row data the adapters do not compute for injected rows, and group layouts injected rows change.
    Each reason names the methods; the adapters prefix them with the injecting methods."""
    if not composition.implements("inject_rows"):
        return []
    reasons = []
    for field in ("old_entropies", "old_log_probs_at", "probes", "update_preview", "steps"):
        users = composition.requirers(field)
        if users:
            reasons.append(f"method(s) {users} reading batch field '{field}' (not computed for injected rows)")
    for feature in ("whole_groups", "old_policy_probe", "update_preview"):
        users = composition.needers("features", feature)
        if users:
            reasons.append(f"method(s) {users} needing '{feature}' (injected rows change the group blocks and are "
                           "not probed)")
    return reasons


def parse_rows(rows: Sequence[Mapping[str, Any]], prompt_ids: torch.Tensor, who: Sequence[str]) -> list[InjectedRow]:
    """The hook's rows, checked: ``prompt_id`` a prompt of the batch, ``completion`` non-empty text or
    token ids, ``reward`` finite, ``kind`` a non-empty string.

    Raises:
        ValueError: naming the methods ``who`` and the row.
    """
    known = set(prompt_ids.tolist())
    parsed = []
    for i, row in enumerate(rows):
        where = f"inject_rows of {list(who)}: row {i}"
        extra = set(row) - {"prompt_id", "completion", "kind", "reward"}
        if extra:
            raise ValueError(f"{where} has unknown key(s) {sorted(extra)} (allowed: prompt_id, completion, kind, reward)")
        prompt_id = row["prompt_id"]
        if isinstance(prompt_id, torch.Tensor):
            prompt_id = prompt_id.item()
        if isinstance(prompt_id, bool) or not isinstance(prompt_id, int) or prompt_id not in known:
            raise ValueError(f"{where}: prompt_id={prompt_id!r} is not a prompt of the batch (an injected row joins "
                             "the group of a prompt the trainer generated for)")
        completion = row["completion"]
        if isinstance(completion, str):
            if not completion:
                raise ValueError(f"{where}: the completion is empty")
        elif isinstance(completion, (list, tuple)) and completion and all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in completion):
            completion = tuple(completion)
        else:
            raise ValueError(f"{where}: completion must be non-empty text or a list of token ids, got {completion!r:.80}")
        kind = row.get("kind", DEFAULT_KIND)
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"{where}: kind must be a non-empty string, got {kind!r}")
        reward = row.get("reward")
        if reward is not None:
            if isinstance(reward, torch.Tensor):
                reward = reward.item()
            if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
                raise ValueError(f"{where}: reward must be a finite number, got {reward!r}")
            reward = float(reward)
        parsed.append(InjectedRow(int(prompt_id), completion, kind, reward))
    return parsed


def injected_rewards(rows: Sequence[InjectedRow], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(K,)`` the rows' given rewards, NaN where the trainer scores the row."""
    return torch.tensor([math.nan if r.reward is None else r.reward for r in rows], dtype=dtype)


def source_rows(prompt_ids: torch.Tensor, rows: Sequence[InjectedRow]) -> torch.Tensor:
    """``(K,)`` int64: for each injected row, the first row of ``prompt_ids`` ``(N,)`` holding its prompt
    (the row it copies its prompt, dataset row and prompt tokens from). Every ``prompt_id`` must be in
    the batch (:func:`parse_rows` checks it)."""
    ids = prompt_ids.detach().cpu().long()
    wanted = torch.tensor([r.prompt_id for r in rows], dtype=torch.long)
    distinct, inverse = torch.unique(ids, return_inverse=True)  # sorted
    first = torch.full((distinct.numel(),), ids.numel(), dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(ids.numel()), reduce="amin")
    return first[torch.searchsorted(distinct, wanted)]


def completion_tokens(rows: Sequence[InjectedRow], tokenizer: Any, limit: int | None = None) -> list[list[int]]:
    """Each row's completion token ids, as the trainers' rollouts end: text is tokenised without special
    tokens and gets the end-of-sequence token appended (when the tokenizer has one); token ids are taken
    as they are; both are cut at ``limit`` tokens (None: not cut)."""
    eos = tokenizer.eos_token_id
    out = []
    for row in rows:
        if isinstance(row.completion, str):
            ids = list(tokenizer(row.completion, add_special_tokens=False)["input_ids"])
            if eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)
        else:
            ids = list(row.completion)
        out.append(ids if limit is None else ids[:limit])
    return out


def padded_tokens(token_lists: Sequence[Sequence[int]], pad_id: int = 0, width: int | None = None,
                  device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` ``(K, W)`` of ``K`` token lists padded on the right with ``pad_id`` (int64; mask
    float32, 1 on the lists' tokens); ``W`` is ``width`` or the longest list."""
    width = max([len(ids) for ids in token_lists] + [0]) if width is None else width
    lengths = torch.tensor([len(ids) for ids in token_lists], dtype=torch.long)
    mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    ids[mask] = torch.tensor([t for seq in token_lists for t in seq], dtype=torch.long)
    return ids.to(device), mask.float().to(device)


def append_rows(batch: "GRPOBatch", rows: Sequence[InjectedRow], completion_ids: Sequence[Sequence[int]],
                reward_components: torch.Tensor | None = None) -> "GRPOBatch":
    """A new batch: ``batch`` with ``rows`` appended (the trainer-independent view of what an adapter
    builds; the conformance suite and the methods' tests use it).

    Args:
        batch: the scored batch (``rewards`` unshaped).
        rows: the injected rows, in order.
        completion_ids: ``K`` token lists of the rows' completions.
        reward_components: ``(K, C)`` the rows' scores where the trainer scored them (NaN elsewhere);
            None: NaN. A row's reward is its given ``reward``, else the weighted sum of its components.

    The completion tensors are padded to the widest row; ``row_data["injected"]`` holds the kind codes;
    other ``row_data`` entries, old / reference log-probs and texts are extended with zeros / the group's
    values so that every per-row field keeps ``N + K`` rows.
    """
    k = len(rows)
    device = batch.rewards.device
    source = source_rows(batch.prompt_ids, rows)
    components = None
    if batch.reward_components is not None:
        width = batch.reward_components.shape[1]
        components = torch.full((k, width), math.nan, dtype=batch.reward_components.dtype, device=device)
        if reward_components is not None:
            components = reward_components.to(components)
    given = injected_rewards(rows, batch.rewards.dtype).to(device)
    scored = torch.full_like(given, math.nan)
    if components is not None and batch.reward_weights is not None:
        scored = (components * batch.reward_weights.to(components).unsqueeze(0)).nansum(dim=1)
        scored[torch.isnan(components).all(dim=1)] = math.nan
    rewards = torch.where(torch.isnan(given), scored, given)
    width = max([batch.completion_ids.shape[1] if batch.completion_ids is not None else 0]
                + [len(c) for c in completion_ids])

    def widen(x: torch.Tensor | None, fill: float) -> torch.Tensor | None:
        if x is None or x.shape[1] == width:
            return x
        return torch.cat([x, x.new_full((x.shape[0], width - x.shape[1]), fill)], dim=1)

    new_ids, new_mask = padded_tokens(completion_ids, width=width, device=device)
    token_fields = {}
    for name in ("completion_ids", "completion_mask", "old_log_probs", "ref_log_probs"):
        value = widen(getattr(batch, name), 0)
        if value is None:
            token_fields[name] = None
        elif name == "completion_ids":
            token_fields[name] = torch.cat([value, new_ids])
        elif name == "completion_mask":
            token_fields[name] = torch.cat([value, new_mask.to(value.dtype)])
        else:
            token_fields[name] = torch.cat([value, torch.zeros(k, width, dtype=value.dtype, device=device)])
    row_data = {}
    for key, value in batch.row_data.items():
        pad = torch.zeros((k, *value.shape[1:]), dtype=value.dtype, device=value.device)
        row_data[key] = torch.cat([value, pad])
    codes = torch.tensor([r.code for r in rows], dtype=torch.long, device=device)
    old_codes = row_data.get(INJECTED_KEY, torch.zeros(batch.num_completions + k, dtype=torch.long, device=device))
    old_codes[batch.num_completions:] = codes
    row_data[INJECTED_KEY] = old_codes

    def extend(values: list | None, new: list) -> list | None:
        return None if values is None else list(values) + new

    texts = [r.completion if isinstance(r.completion, str) else "" for r in rows]
    return dataclasses.replace(
        batch,
        prompt_ids=torch.cat([batch.prompt_ids, torch.tensor([r.prompt_id for r in rows], dtype=torch.long, device=device)]),
        rewards=torch.cat([batch.rewards, rewards]),
        reward_components=None if components is None else torch.cat([batch.reward_components, components]),
        prompts=extend(batch.prompts, [batch.prompts[i] for i in source.tolist()] if batch.prompts else []),
        completions=extend(batch.completions, texts),
        rows=extend(batch.rows, [batch.rows[i] for i in source.tolist()] if batch.rows else []),
        advantages=None, token_weights=None, row_data=row_data, **token_fields,
    )


@dataclass(frozen=True)
class Layout:
    """How the rows of a generation batch with injected rows are spread over the ranks.

    Args:
        rows: the batch's real rows ``R`` (generated plus injected), in global order.
        world: data-parallel ranks.
        splits: the parts each rank's rows are cut into (TRL's ``steps_per_generation``).

    Every rank holds ``per_rank`` rows, the smallest multiple of ``splits`` with ``world * per_rank >= R``;
    rank ``r`` holds global rows ``[r * per_rank, (r + 1) * per_rank)``, and the last ``fillers`` of
    those positions are filler rows (no completion token).
    """

    rows: int
    world: int = 1
    splits: int = 1

    def __post_init__(self):
        if self.rows < 1 or self.world < 1 or self.splits < 1:
            raise ValueError(f"Layout needs rows, world and splits >= 1, got {self.rows}, {self.world}, {self.splits}")

    @property
    def per_rank(self) -> int:
        unit = self.world * self.splits
        return -(-self.rows // unit) * self.splits

    @property
    def fillers(self) -> int:
        return self.per_rank * self.world - self.rows

    def real_rows(self, rank: int) -> tuple[int, int]:
        """``(start, stop)``: the global real rows rank ``rank`` holds (its fillers follow them)."""
        start = min(rank * self.per_rank, self.rows)
        return start, min((rank + 1) * self.per_rank, self.rows)
