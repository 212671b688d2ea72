"""Batch editing after scoring, trainer-independent part: which groups to drop, and the bookkeeping of
refilling a generation batch with new prompts up to a bounded number of generation rounds.

Two sources decide which rows train (``docs/design.md``, section 1):

- the built-in **dynamic sampling** option (DAPO's ``filter_groups``, verl's ``algorithm.filter_groups``):
  a group is dropped when it has more than one completion and every completion has the same value of
  the filter metric (the reward, or one named reward component), so its GRPO advantages are all zero.
  This is verl's rule (``std == 0 and len > 1`` drops; a group of one is kept), decided exactly by
  comparing the group's minimum and maximum (:func:`filter_groups_keep`);
- the ``keep_rows`` hook of the enabled methods (``(N,)`` bool, combined by ``multiply``).

A trainer drops and refills **whole groups**: a row's group is its prompt, and a group some of whose
rows are kept and others dropped is refused (:func:`kept_groups`), since a partial group would change
the group statistics silently.

:class:`RefillPlan` is the loop's bookkeeping, shared by the adapters: each generation round adds its
groups (sizes, prompt ids, kept or not); the plan says whether another round may be generated (at most
``max_num_gen_batches`` rounds in all, the first included; 0 = no limit, as verl), how many rows are
still missing, and finally which groups form the batch: kept groups in generation order until the
batch holds exactly ``target_rows`` rows, surplus groups discarded (verl's ``discarded_surplus``). When
the rounds run out with the batch still short, ``exhausted`` decides, explicitly:

- ``"error"`` (verl's DAPO): raise :class:`RefillExhausted` naming the rounds and the shortfall;
- ``"keep_dropped"``: complete the batch with dropped groups, in generation order, and train on it
  (their rows are what plain GRPO would have trained on: with all-equal rewards their advantages are 0).

Shapes: ``N`` completions of one round, ``G`` groups of one round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from grpo_plugins.ops import constant_groups, segment_count, segment_sum

if TYPE_CHECKING:
    from grpo_plugins.batch import GRPOBatch

REWARD_METRIC = "reward"
"""The filter metric that reads ``batch.rewards`` (the trainer's weighted reward), as verl's ``metric=reward``."""

EXHAUSTED = ("error", "keep_dropped")


class RefillExhausted(RuntimeError):
    """The bounded refill rounds did not collect enough kept groups (``exhausted="error"``)."""


def filter_metric(batch: GRPOBatch, metric: str = REWARD_METRIC) -> torch.Tensor:
    """``(N,)`` float values the dynamic-sampling filter compares within each group.

    ``metric="reward"``: ``batch.rewards``; otherwise the reward component of that name
    (``batch.reward_names``), like verl's ``filter_groups.metric`` naming a reward field.

    Raises:
        ValueError: an unknown component name, or a NaN value (the component did not apply to a row).
    """
    if metric == REWARD_METRIC:
        return batch.rewards.detach()
    if metric not in batch.reward_names or batch.reward_components is None:
        raise ValueError(f"filter_groups_metric={metric!r} is neither 'reward' nor a reward function of the run "
                         f"(reward functions: {list(batch.reward_names)})")
    values = batch.reward_components[:, batch.reward_names.index(metric)].detach()
    missing = torch.isnan(values)
    if bool(missing.any()):
        rows = missing.nonzero().flatten()[:5].tolist()
        raise ValueError(f"filter_groups_metric={metric!r}: the reward function gave no value (NaN) for completions "
                         f"{rows} (prompt ids {batch.prompt_ids[rows].tolist()}); the filter needs it on every row")
    return values


def informative_groups(values: torch.Tensor, group_index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``(G,)`` bool: groups dynamic sampling keeps — more than one member whose ``values`` ``(N,)`` differ,
    or a single member (verl keeps groups of one). Exact at any scale (minimum against maximum)."""
    single = segment_count(group_index, num_groups) == 1
    return ~constant_groups(values, group_index, num_groups) | single


def filter_groups_keep(batch: GRPOBatch, metric: str = REWARD_METRIC) -> torch.Tensor:
    """``(N,)`` bool rows kept by dynamic sampling: the rows of :func:`informative_groups` on :func:`filter_metric`."""
    keep = informative_groups(filter_metric(batch, metric), batch.group_index, batch.num_groups)
    return keep.index_select(0, batch.group_index)


def kept_groups(keep: torch.Tensor, group_index: torch.Tensor, num_groups: int, who: str = "keep_rows",
                group_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``(G,)`` bool groups whose every row is kept, from a row mask ``keep`` ``(N,)``.

    Raises:
        ValueError: a group with some rows kept and others dropped (naming ``who`` and the groups: their
            prompt ids when ``group_ids`` ``(G,)`` is given, else their indices).
    """
    kept = segment_sum(keep.long(), group_index, num_groups)
    sizes = segment_count(group_index, num_groups)
    partial = (kept > 0) & (kept < sizes)
    if bool(partial.any()):
        where = partial.nonzero().flatten()[:5]
        groups = f"prompt id(s) {group_ids[where].tolist()}" if group_ids is not None else f"group(s) {where.tolist()}"
        raise ValueError(f"{who} kept some rows of {groups} and dropped others; the trainer drops and "
                         "refills whole groups (a partial group would change its statistics), so keep or drop every "
                         "row of a prompt's group")
    return kept == sizes


@dataclass
class RoundGroups:
    """One generation round's groups, in generation order: ``(G,)`` sizes, prompt ids and kept flags."""

    sizes: torch.Tensor
    prompt_ids: torch.Tensor
    kept: torch.Tensor


@dataclass
class RefillPlan:
    """Bookkeeping of one generation batch's dynamic sampling (trainer-independent).

    Args:
        target_rows: rows the batch must hold (the trainer's generation batch size).
        max_num_gen_batches: the most generation rounds, the first included; 0 or less: no limit (verl).
        exhausted: ``"error"`` or ``"keep_dropped"`` (module docstring).

    A group whose prompt id is already among the kept groups of an earlier round is not kept again (two
    groups of one prompt would merge into one group at the advantage stage); it counts as a repeat.
    """

    target_rows: int
    max_num_gen_batches: int = 10
    exhausted: Literal["error", "keep_dropped"] = "error"
    rounds: list[RoundGroups] = field(default_factory=list)
    repeated_groups: int = 0

    def __post_init__(self):
        if self.exhausted not in EXHAUSTED:
            raise ValueError(f"exhausted must be one of {EXHAUSTED}, got {self.exhausted!r}")
        if self.target_rows <= 0:
            raise ValueError(f"target_rows must be positive, got {self.target_rows}")

    # ------------------------------------------------------------------ the loop
    def add_round(self, sizes: torch.Tensor, prompt_ids: torch.Tensor, kept: torch.Tensor) -> None:
        """Record a generation round's groups: ``(G,)`` sizes, prompt ids and kept flags, in generation order."""
        sizes, prompt_ids, kept = sizes.long().cpu(), prompt_ids.long().cpu(), kept.bool().cpu()
        if self.rounds:
            earlier = torch.cat([r.prompt_ids[r.kept] for r in self.rounds])
            repeat = kept & torch.isin(prompt_ids, earlier)
            self.repeated_groups += int(repeat.sum())
            kept = kept & ~repeat
        self.rounds.append(RoundGroups(sizes, prompt_ids, kept))

    @property
    def kept_rows(self) -> int:
        """Rows of every kept group so far."""
        return sum(int(r.sizes[r.kept].sum()) for r in self.rounds)

    @property
    def missing_rows(self) -> int:
        """Rows still needed to fill the batch with kept groups (0 when full)."""
        return max(0, self.target_rows - self.kept_rows)

    def may_generate(self) -> bool:
        """Whether another round is wanted and allowed: rows are missing and the bound is not reached."""
        bound = self.max_num_gen_batches
        return self.missing_rows > 0 and (bound <= 0 or len(self.rounds) < bound)

    # ------------------------------------------------------------------ the batch
    def _first_fit(self, candidates: list[tuple[int, int]], taken: int, chosen: list[tuple[int, int]]) -> int:
        for r, g in candidates:
            size = int(self.rounds[r].sizes[g])
            if taken + size <= self.target_rows:
                chosen.append((r, g))
                taken += size
            if taken == self.target_rows:
                break
        return taken

    def select(self) -> list[tuple[int, int]]:
        """``[(round, group), ...]`` forming the batch, in generation order: kept groups first-fit until
        ``target_rows``; when short, ``exhausted`` decides (raise, or complete with dropped groups).

        Raises:
            RefillExhausted: the batch is short and ``exhausted="error"``, or no set of whole groups
                fills it exactly.
        """
        order = [(r, g) for r, round in enumerate(self.rounds) for g in range(round.sizes.numel())]
        chosen: list[tuple[int, int]] = []
        taken = self._first_fit([(r, g) for r, g in order if self.rounds[r].kept[g]], 0, chosen)
        if taken < self.target_rows:
            if self.exhausted == "error":
                raise RefillExhausted(
                    f"batch editing (dynamic sampling, keep_rows) kept {taken} of the {self.target_rows} rows the batch needs after "
                    f"{len(self.rounds)} generation round(s) (max_num_gen_batches={self.max_num_gen_batches}): "
                    "the prompts are too easy or too hard for the model. Raise max_num_gen_batches (0: no limit), "
                    "or set on_refill_exhausted='keep_dropped' to complete the batch with dropped groups"
                )
            self.filled_with_dropped = len(chosen)
            taken = self._first_fit([(r, g) for r, g in order if not self.rounds[r].kept[g]], taken, chosen)
            self.filled_with_dropped = len(chosen) - self.filled_with_dropped
            if taken < self.target_rows:
                raise RefillExhausted(f"no set of whole groups fills the batch of {self.target_rows} rows exactly "
                                      f"(group sizes {sorted({int(s) for r in self.rounds for s in r.sizes})})")
            chosen.sort()
        self.selected = chosen
        return chosen

    # ------------------------------------------------------------------ what it cost
    @property
    def rollouts(self) -> int:
        """Completions generated for this batch over every round (the first included)."""
        return sum(int(r.sizes.sum()) for r in self.rounds)

    def metrics(self) -> dict[str, float]:
        """What the batch cost and what was dropped, after :meth:`select` (keys without prefix)."""
        dropped = sum(int((~r.kept).sum()) for r in self.rounds)
        kept = sum(int(r.kept.sum()) for r in self.rounds)
        selected = getattr(self, "selected", [])
        filled = getattr(self, "filled_with_dropped", 0)
        return {
            "generation_rounds": float(len(self.rounds)),
            "refill_rounds": float(len(self.rounds) - 1),
            "rollouts": float(self.rollouts),
            "refill_rollouts": float(self.rollouts - int(self.rounds[0].sizes.sum())) if self.rounds else 0.0,
            "dropped_groups": float(dropped),
            "repeated_groups": float(self.repeated_groups),
            "discarded_surplus_groups": float(kept - (len(selected) - filled)),
            "filled_with_dropped_groups": float(filled),
        }
