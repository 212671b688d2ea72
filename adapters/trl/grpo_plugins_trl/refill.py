"""Batch editing on TRL: drop whole groups after scoring and refill them inside the step (feature
``batch_editing``: the ``keep_rows`` hook, and the built-in dynamic sampling option ``filter_groups``).

What is dropped and the bookkeeping of the rounds are the core's (:mod:`grpo_plugins.batch_editing`);
this module is the TRL glue, installed only when the option is on or a method implements ``keep_rows``
(otherwise nothing here runs and TRL's path is unchanged):

1. TRL generates and scores the generation batch as usual. The adapter builds the global
   ``GRPOBatch`` of the round (unshaped rewards) and decides the kept groups: dynamic sampling
   (``filter_groups_metric``) and every ``keep_rows`` method, combined by ``multiply``.
2. While rows are missing and fewer than ``max_num_gen_batches`` rounds ran (0: no limit), it draws
   as many new prompts as groups are missing (rounded up so every rank gets the same number of rows),
   each with ``num_generations`` completions, and runs TRL's own generation and scoring on them
   (``_generate_and_score_completions``, with ``augment_prompts`` and the old-policy pass as for any
   round). New prompts come from ``sample_prompts`` when a method provides it, else from a seeded
   permutation of the train dataset (prompts already in this batch skipped). The generator is
   seeded from ``(args.seed, micro-step, round)``: every rank draws the same prompts, and a resumed
   run draws what the original drew.
3. The batch is the kept groups in generation order, cut at ``generation_batch_size`` rows (surplus
   groups discarded); every row tensor of TRL's output is gathered, selected and sliced back to this
   rank's rows, ``num_items_in_batch`` is recounted, and the advantage stage runs on the result.
   Short after the last round: ``on_refill_exhausted="error"`` raises (verl's DAPO), ``"keep_dropped"``
   completes the batch with dropped groups and trains.

All ranks make the same decisions: every decision reads the gathered global batch. A refilled batch
is still one generation batch: gradient accumulation, ``steps_per_generation`` and ``num_iterations``
split and reuse it as TRL does. Each batch logs ``batch_editing/<key>`` (generation rounds, rollouts,
refill rollouts, dropped, repeated, discarded and filled groups); ``Refill.last_plan.rollouts`` and
``Refill.total_rollouts`` count every completion generated.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from grpo_plugins import CompositionError, GRPOBatch, PromptRound, TrainerCapabilities
from grpo_plugins.batch_editing import EXHAUSTED, REWARD_METRIC, RefillPlan, filter_groups_keep, kept_groups
from grpo_plugins.ops import segment_min
from grpo_plugins.validation import validate_batch
from grpo_plugins_trl.output_rows import (
    concat_rows, finish, gather_global, loss_mask, pad_value, row_editing_blockers,
)

if TYPE_CHECKING:
    from grpo_plugins import Composition
    from grpo_plugins_trl.trainer import PluginGRPOTrainer

FEATURE = "batch_editing"
METRIC_PREFIX = "batch_editing/"
OLD_ENTROPIES_KEY = "grpo_plugins.refill.old_entropies"  # TRL's old-pass entropies of a round, carried with its rows


def enabled(args: Any, composition: "Composition") -> bool:
    """Whether the run edits batches: the ``filter_groups`` option, or a method implementing ``keep_rows``."""
    return bool(getattr(args, "filter_groups", False)) or composition.implements("keep_rows")


def _blockers(args: Any, dataset: Any) -> list[str]:
    """TRL settings under which the adapter cannot refill a batch, as reasons."""
    reasons = []
    if isinstance(dataset, torch.utils.data.IterableDataset):
        reasons.append("an IterableDataset train dataset (new prompts are drawn by index)")
    return reasons + row_editing_blockers(args, dataset, "multimodal rows are not moved between ranks",
                                          "TRL normalises over the whole batch before the adapter sees it")


def with_batch_editing(caps: TrainerCapabilities, args: Any, dataset: Any = None) -> TrainerCapabilities:
    """``caps`` plus ``batch_editing``, unless a TRL setting prevents the refill (then without it, with the reason)."""
    caps = caps.with_features(FEATURE)
    for reason in _blockers(args, dataset):
        caps = caps.without(FEATURE, because=reason)
    return caps


def refill_problems(args: Any, composition: "Composition", dataset: Any = None) -> list[str]:
    """Start-up problems of the option's values, of the option under settings that prevent a refill (the
    capability check covers methods), and of batch editing with uneven groups."""
    problems = []
    bound, exhausted = getattr(args, "max_num_gen_batches", 10), getattr(args, "on_refill_exhausted", "error")
    if not isinstance(bound, int) or bound < 0:  # a plain GRPOConfig has neither option: the defaults
        problems.append(f"max_num_gen_batches={bound!r} must be a whole number >= 0 (0: no limit)")
    if exhausted not in EXHAUSTED:
        problems.append(f"on_refill_exhausted={exhausted!r} must be one of {list(EXHAUSTED)}")
    if getattr(args, "filter_groups", False):
        problems += [f"filter_groups=True cannot run with {reason}" for reason in _blockers(args, dataset)]
    if enabled(args, composition) and composition.implements("allocate_rollouts"):
        editors = (["filter_groups"] if getattr(args, "filter_groups", False) else []) + composition.providers("keep_rows")
        problems.append(f"batch editing ({', '.join(editors)}) refills the batch with groups of num_generations="
                        f"{args.num_generations} completions; method(s) {composition.providers('allocate_rollouts')} "
                        "give groups of other sizes (hook allocate_rollouts), which cannot fill it exactly")
    return problems


@dataclass
class Round:
    """One generation round: TRL's local output dict, the gathered scoring data and its global batch."""

    out: dict
    gathered: dict
    batch: GRPOBatch
    order: torch.Tensor  # (G,) the batch's groups (group_index values) in generation order
    group_rows: list[torch.Tensor]  # global row indices of each group, in generation order


def scored_round(trainer: "PluginGRPOTrainer", out: dict) -> Round:
    """A scored generation round (TRL's local output ``out`` and ``trainer._plugin_gathered``): its global
    ``GRPOBatch`` (unshaped rewards) and the global rows of each group, in generation order."""
    t = trainer
    gathered = dict(t._plugin_gathered)
    batch = t._scored_batch(out, t._gather_rows(loss_mask(out)).float())
    index, num = batch.group_index.cpu(), batch.num_groups
    order = torch.argsort(segment_min(torch.arange(index.numel(), dtype=torch.float64), index, num))  # by first row
    rank = torch.empty_like(order)
    rank[order] = torch.arange(num)
    rows = torch.argsort(rank[index], stable=True)  # rows grouped in generation order, each group's rows in order
    group_rows = list(torch.split(rows, batch.group_sizes.cpu()[order].tolist()))
    return Round(out, gathered, batch, order, group_rows)


class Refill:
    """Drops and refills whole groups of each generation batch (module docstring)."""

    def __init__(self, trainer: "PluginGRPOTrainer"):
        self.trainer = trainer
        args = trainer.args
        self.metric = getattr(args, "filter_groups_metric", REWARD_METRIC)
        self.filter_groups = bool(getattr(args, "filter_groups", False))
        self.max_num_gen_batches = int(getattr(args, "max_num_gen_batches", 10))
        self.exhausted = getattr(args, "on_refill_exhausted", "error")
        self.last_plan: RefillPlan | None = None
        self.total_rollouts = 0
        self.changed = False  # the latest batch holds rows of a refill round or lost groups
        names = list(trainer.reward_func_names)
        if self.filter_groups and self.metric != REWARD_METRIC and self.metric not in names:
            raise CompositionError(f"filter_groups_metric={self.metric!r} is neither 'reward' nor a reward function of "
                                   f"the run ({names})")

    @classmethod
    def install(cls, trainer: "PluginGRPOTrainer") -> "Refill | None":
        """A ``Refill`` when the run edits batches, else None (nothing of this module runs)."""
        return cls(trainer) if enabled(trainer.args, trainer.composition) else None

    # ------------------------------------------------------------------ the loop
    def fill(self, out: dict, n: int) -> dict:
        """TRL's output ``out`` of the first round (``n`` rows on this rank) -> the output of the edited batch."""
        t = self.trainer
        world = t.accelerator.num_processes
        plan = RefillPlan(target_rows=n * world, max_num_gen_batches=self.max_num_gen_batches, exhausted=self.exhausted)
        rounds = [self._scored(out)]
        self._add(plan, rounds[-1])
        while plan.may_generate():
            inputs = self._draw(plan, rounds)
            rounds.append(self._scored(t._plugin_generate_round(inputs)))
            self._add(plan, rounds[-1])
        self.last_plan = plan
        self.total_rollouts += plan.rollouts
        chosen = plan.select()  # raises RefillExhausted when short and on_refill_exhausted='error'
        for key, value in plan.metrics().items():
            t._metrics["train"][METRIC_PREFIX + key].append(value)
        self.changed = not (len(rounds) == 1 and chosen == [(0, g) for g in range(len(rounds[0].group_rows))])
        if not self.changed:
            t._plugin_old_entropies = out.pop(OLD_ENTROPIES_KEY, None)
            return out
        return self._assemble(rounds, chosen, n)

    def _scored(self, out: dict) -> Round:
        """The round just generated: its global batch and the global rows of each group, in generation order."""
        old_entropies = getattr(self.trainer, "_plugin_old_entropies", None)
        if old_entropies is not None:
            out[OLD_ENTROPIES_KEY] = old_entropies
        return scored_round(self.trainer, out)

    def _add(self, plan: RefillPlan, round: Round) -> None:
        """Decide the round's kept groups (dynamic sampling, then every ``keep_rows`` method) and record them."""
        t, batch = self.trainer, round.batch
        # NaN rewards are named here, before any group is dropped; a round whose every token is masked (e.g. every
        # completion truncated with mask_truncated_completions) is still a round: its groups are judged by reward
        validate_batch(dataclasses.replace(batch, completion_ids=None, completion_mask=None))
        keep = torch.ones(batch.num_completions, dtype=torch.bool, device=batch.rewards.device)
        if self.filter_groups:
            keep &= filter_groups_keep(batch, self.metric)
        methods = t.composition.run_keep_rows(batch)
        t._pop_plugin_metrics("train")
        if methods is not None:
            keep &= methods.to(keep.device)
        who = " and ".join((["filter_groups"] if self.filter_groups else []) + t.composition.providers("keep_rows"))
        kept = kept_groups(keep, batch.group_index, batch.num_groups, who=who, group_ids=batch.group_prompt_ids).cpu()
        order = round.order
        plan.add_round(batch.group_sizes.cpu()[order], batch.group_prompt_ids.cpu()[order], kept[order])

    # ------------------------------------------------------------------ new prompts
    def _draw(self, plan: RefillPlan, rounds: list[Round]) -> list[dict]:
        """This rank's dataset rows of the next refill round: the missing groups, rounded up so that every
        rank gets the same number of rows, ``num_generations`` rows per prompt, consecutive (TRL's layout)."""
        t = self.trainer
        size, world, rank = t.num_generations, t.accelerator.num_processes, t.accelerator.process_index
        groups = -(-plan.missing_rows // size)
        while (groups * size) % world:
            groups += 1
        seed = zlib.crc32(f"{t.args.seed}/{t._step}/{len(rounds)}/refill".encode())
        generator = torch.Generator().manual_seed(seed)
        dataset = t.train_dataset
        indexed = t.plans_rounds and "prompt_id" not in dataset[0]  # rows carry their index, as the dataloader's
        from grpo_plugins_trl.trainer import INDEX_KEY

        def row(index: int) -> dict:
            return {**dataset[index], INDEX_KEY: index} if indexed else dict(dataset[index])

        if t.composition.implements("sample_prompts"):
            prompt_round = PromptRound(num_prompts=groups, budget=groups * size, dataset_size=len(dataset),
                                       step=t.state.global_step, default_rollouts=size, total_steps=t.total_steps())
            indices = t.composition.run_sample_prompts(prompt_round, generator)
            counts = t.composition.rollout_counts(prompt_round, indices)
            t._pop_plugin_metrics("train")
            rows = [row(int(i)) for i, c in zip(indices.tolist(), counts.tolist()) for _ in range(int(c))]
        else:
            used = {int(p) for r in rounds for p in r.batch.prompt_ids.tolist()}
            chosen: list[dict] = []
            for index in torch.randperm(len(dataset), generator=generator).tolist():
                candidate = row(index)
                if t._local_prompt_ids([candidate])[0] not in used:
                    chosen.append(candidate)
                if len(chosen) == groups:
                    break
            if len(chosen) < groups:  # a small dataset: the batch's own prompts come again (counted as repeats)
                extra = torch.randint(len(dataset), (groups - len(chosen),), generator=generator).tolist()
                chosen += [row(i) for i in extra]
            rows = [r for r in chosen for _ in range(size)]
        per_rank = len(rows) // world
        return rows[rank * per_rank:(rank + 1) * per_rank]

    # ------------------------------------------------------------------ the edited batch
    def _assemble(self, rounds: list[Round], chosen: list[tuple[int, int]], n: int) -> dict:
        """TRL's output dict of the chosen groups, this rank's ``n`` rows, and the trainer's gathered scoring data."""
        t = self.trainer
        offsets, total = [], 0
        for r in rounds:
            offsets.append(total)
            total += r.batch.num_completions
        selected = torch.cat([rounds[r].group_rows[g] + offsets[r] for r, g in chosen])  # (N,) rows of the round concat
        local = selected[t.accelerator.process_index * n:(t.accelerator.process_index + 1) * n]
        first = rounds[0].out
        out: dict = {}
        for key, value in first.items():
            if key == "num_items_in_batch":
                continue
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                raise ValueError(f"batch editing cannot move TRL's output '{key}' between rounds ({type(value).__name__})")
            parts = [gather_global(t, key, r.out[key]) for r in rounds]
            out[key] = concat_rows(key, parts, pad_value(key, t)).index_select(0, local.to(parts[0].device))
        finish(t, out)
        t._plugin_old_entropies = out.pop(OLD_ENTROPIES_KEY, None)
        self._select_gathered(rounds, selected)
        self._rewrite_completions_table(out, selected)
        return out

    def _select_gathered(self, rounds: list[Round], selected: torch.Tensor) -> None:
        """The trainer's gathered scoring data (rewards, prompt ids, texts, rows) for the selected rows."""
        t, rows = self.trainer, selected.tolist()
        merged = {"rewards_per_func": torch.cat([r.gathered["rewards_per_func"] for r in rounds])[selected.to(
            rounds[0].gathered["rewards_per_func"].device)]}
        for key in (key for key in rounds[0].gathered if key != "rewards_per_func"):  # per-row lists
            flat = [item for r in rounds for item in r.gathered[key]]
            merged[key] = [flat[i] for i in rows]
        t._plugin_gathered = merged

    def _rewrite_completions_table(self, out: dict, selected: torch.Tensor) -> None:
        """TRL's completions table (``_logs``) shows the trained batch, not the last round generated."""
        t, gathered = self.trainer, self.trainer._plugin_gathered
        logs = t._logs
        for key in ("prompt", "completion", "advantages"):
            logs[key].clear()
        logs["prompt"].extend(gathered["prompts"])
        logs["completion"].extend(gathered["completions"])
        for i, name in enumerate(t.reward_func_names):
            logs["rewards"][name].clear()
            logs["rewards"][name].extend(gathered["rewards_per_func"][:, i].tolist())
        logs["advantages"].extend(t.accelerator.gather(out["advantages"]).tolist())
        for column in list(logs["extra"]):
            logs["extra"][column].clear()
