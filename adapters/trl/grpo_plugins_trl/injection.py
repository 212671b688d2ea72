"""Injected rows on TRL (feature ``row_injection``: the ``inject_rows`` hook).

The rows' contract, their kinds and the spread over ranks are the core's
(:mod:`grpo_plugins.injection`); this module is the TRL glue, installed only when a method implements
``inject_rows`` (otherwise nothing here runs and TRL's path is unchanged). After TRL generated and
scored the generation batch (and after the refill of batch editing, when it runs):

1. The global ``GRPOBatch`` of the round (unshaped rewards, the refill's
   :func:`~grpo_plugins_trl.refill.scored_round`) goes to ``inject_rows``; the rows are checked.
2. Each row gets its group's prompt tokens (copied from a rollout of its prompt) and its completion
   tokens: text is tokenised without special tokens and ends with the end-of-sequence token, as a
   generated completion does; token ids are taken as they are; both are cut at
   ``max_completion_length``. Rows without a ``reward`` are scored by TRL's ``_calculate_rewards``
   (the trainer's reward functions, with the group's dataset row as their columns); a given reward
   leaves the row's reward components NaN.
3. The rows get the log-probs TRL computed for the batch, from the same forward passes: old
   log-probs (when TRL computed them), reference log-probs (when TRL or the adapter computes them);
   ``sampling_per_token_logps`` (vLLM) are the old log-probs and the vLLM ``importance_sampling_ratio``
   is 1 (the demonstrator is not the sampler); advantages start at 0. Every rank computes them for
   every injected row (the same forward calls on every rank).
4. The batch is the generated rows, then the injected rows, spread over the ranks in equal parts that
   are a multiple of ``steps_per_generation`` (:class:`~grpo_plugins.injection.Layout`); filler rows
   (no completion token) complete the last part when needed. ``num_items_in_batch`` is recounted;
   TRL then shuffles and splits the batch as always, so gradient accumulation, ``steps_per_generation``
   and ``num_iterations`` see one (larger) generation batch.
5. The advantage stage runs on the generated and injected rows (fillers left out), with each row's
   kind in ``row_data["injected"]``, carried to the loss stage like every ``row_data`` entry.

Logged per batch: ``injection/rows``, ``injection/filler_rows`` and ``injection/<kind>`` (rows per kind).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING, Any

import torch

from grpo_plugins import CompositionError, TrainerCapabilities
from grpo_plugins.injection import (
    INJECTED_KEY, Layout, completion_tokens, injected_rewards, method_conflicts, padded_tokens, parse_rows,
    source_rows,
)
from grpo_plugins_trl.output_rows import concat_rows, finish, gather_global, pad_value, row_editing_blockers
from grpo_plugins_trl.refill import scored_round

if TYPE_CHECKING:
    from grpo_plugins import Composition
    from grpo_plugins_trl.trainer import PluginGRPOTrainer

FEATURE = "row_injection"
METRIC_PREFIX = "injection/"
REWARD_OVERRIDE = "reward_override"  # key of trainer._plugin_gathered: (N,) given rewards, NaN where scored
LOG_PROB_KEYS = ("old_per_token_logps", "ref_per_token_logps", "sampling_per_token_logps")
ROW_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "tool_mask",
            "importance_sampling_ratio") + LOG_PROB_KEYS


def enabled(composition: "Composition") -> bool:
    return composition.implements("inject_rows")


def _blockers(args: Any, dataset: Any) -> list[str]:
    return row_editing_blockers(args, dataset, "multimodal rows are not injected",
                                "TRL normalises over the batch before rows are injected")


def with_row_injection(caps: TrainerCapabilities, args: Any, dataset: Any = None) -> TrainerCapabilities:
    """``caps`` plus ``row_injection``, unless a TRL setting prevents it (then without it, with the reason)."""
    caps = caps.with_features(FEATURE)
    for reason in _blockers(args, dataset):
        caps = caps.without(FEATURE, because=reason)
    return caps


def injection_problems(args: Any, composition: "Composition", dataset: Any = None) -> list[str]:
    """Start-up problems of injected rows with settings and methods whose per-row data the adapter does not
    extend to injected rows (the capability check covers the trainer settings)."""
    if not enabled(composition):
        return []
    who = composition.providers("inject_rows")
    reasons = []
    if getattr(args, "shared_prefix", False):
        reasons.append("shared_prefix=True (groups with an injected row are not one prompt block)")
    reasons += method_conflicts(composition)
    return [f"method(s) {who} inject rows (hook inject_rows), which cannot run with {reason}" for reason in reasons]


class Injection:
    """Appends the ``inject_rows`` rows to each generation batch (module docstring)."""

    def __init__(self, trainer: "PluginGRPOTrainer"):
        self.trainer = trainer
        self.last_rows: list = []  # the latest batch's injected rows (InjectedRow), for tests and debugging

    @classmethod
    def install(cls, trainer: "PluginGRPOTrainer") -> "Injection | None":
        """An ``Injection`` when a method implements ``inject_rows``, else None (nothing of this module runs)."""
        if not enabled(trainer.composition):
            return None
        problems = injection_problems(trainer.args, trainer.composition, trainer.train_dataset)
        if problems:
            raise CompositionError("; ".join(problems))
        return cls(trainer)

    # ------------------------------------------------------------------ the batch
    def inject(self, out: dict) -> dict:
        """TRL's output ``out`` (this rank's rows) -> the output with the injected rows (module docstring)."""
        t = self.trainer
        round = scored_round(t, out)
        batch = round.batch
        rows = parse_rows(t.composition.run_inject_rows(batch), batch.prompt_ids, t.composition.providers("inject_rows"))
        t._pop_plugin_metrics("train")
        self.last_rows = rows
        gathered = t._plugin_gathered
        total = batch.num_completions
        metrics = t._metrics["train"]
        metrics[METRIC_PREFIX + "rows"].append(float(len(rows)))
        if not rows:
            gathered[INJECTED_KEY] = torch.zeros(total, dtype=torch.long, device=batch.rewards.device)
            metrics[METRIC_PREFIX + "filler_rows"].append(0.0)
            return out
        for kind, count in sorted(Counter(r.kind for r in rows).items()):
            metrics[METRIC_PREFIX + kind].append(float(count))
        source = source_rows(batch.prompt_ids, rows)  # each row's first generated row of its prompt
        everyone = {key: gather_global(t, key, value) for key, value in out.items() if key != "num_items_in_batch"}
        unknown = sorted(set(everyone) - set(ROW_KEYS))
        if unknown or any(v.dim() == 0 for v in everyone.values()):
            raise ValueError(f"row injection cannot build TRL's output {unknown or 'scalars'} for injected rows")
        extra, texts, token_lists = self._tokens(rows, everyone, source)
        prompts = [gathered["prompts"][i] for i in source.tolist()]
        dataset_rows = [gathered["rows"][i] for i in source.tolist()]
        components = self._score(rows, dataset_rows, prompts, texts, token_lists, gathered["rewards_per_func"])
        self._log_probs(extra, everyone)
        layout = Layout(rows=total + len(rows), world=t.accelerator.num_processes, splits=t.args.steps_per_generation)
        start = t.accelerator.process_index * layout.per_rank
        local = torch.arange(start, start + layout.per_rank)
        new: dict = {}
        for key, value in everyone.items():
            joined = concat_rows(key, [value, extra[key].to(value.device, value.dtype)], pad_value(key, t))
            if layout.fillers:
                joined = torch.cat([joined, _fillers(key, joined[-1:], layout.fillers, t)])
            new[key] = joined.index_select(0, local.to(joined.device))
        finish(t, new)
        metrics[METRIC_PREFIX + "filler_rows"].append(float(layout.fillers))
        device = gathered["rewards_per_func"].device
        codes = torch.zeros(total + len(rows), dtype=torch.long, device=device)
        codes[total:] = torch.tensor([r.code for r in rows], dtype=torch.long)
        override = torch.full((total + len(rows),), math.nan, device=device)
        override[total:] = injected_rewards(rows).to(device)
        completions = [[{"role": "assistant", "content": x}] if isinstance(p, list) else x for p, x in zip(prompts, texts)]
        t._plugin_gathered = {
            **gathered,
            "rewards_per_func": torch.cat([gathered["rewards_per_func"], components.to(device)]),
            "prompt_ids": list(gathered["prompt_ids"]) + [r.prompt_id for r in rows],
            "prompts": list(gathered["prompts"]) + prompts,
            "completions": list(gathered["completions"]) + completions,
            "rows": list(gathered["rows"]) + dataset_rows,
            INJECTED_KEY: codes,
            REWARD_OVERRIDE: override,
        }
        t._plugin_real_rows = layout.rows
        self._log_table(prompts, completions, components, override[total:])
        return new

    def _tokens(self, rows, everyone: dict, source: torch.Tensor) -> tuple[dict, list[str], list[list[int]]]:
        """The injected rows' prompt tensors (their group's), completion tokens and texts."""
        tokenizer = self.trainer._tokenizer
        token_lists = completion_tokens(rows, tokenizer, self.trainer.max_completion_length)
        texts = [r.completion if isinstance(r.completion, str) else
                 tokenizer.decode(list(r.completion), skip_special_tokens=True) for r in rows]
        device = everyone["completion_ids"].device
        ids, mask = padded_tokens(token_lists, tokenizer.pad_token_id, device=device)
        mask = mask.to(everyone["completion_mask"].dtype)
        width = ids.shape[1]
        picked = source.to(device)
        extra = {"prompt_ids": everyone["prompt_ids"].index_select(0, picked),
                 "prompt_mask": everyone["prompt_mask"].index_select(0, picked),
                 "completion_ids": ids, "completion_mask": mask}
        k = len(rows)
        for key, value in everyone.items():
            if key in extra or key in LOG_PROB_KEYS:
                continue
            shape = (k, *value.shape[1:]) if value.dim() == 1 or value.shape[1] in (1,) else (k, width, *value.shape[2:])
            fill = 0.0 if key == "advantages" else 1.0  # tool_mask (not a tool call) and the vLLM ratio: 1
            extra[key] = torch.full(shape, fill, dtype=value.dtype, device=value.device)
        return extra, texts, token_lists

    def _score(self, rows, dataset_rows, prompts, texts, token_lists, like: torch.Tensor) -> torch.Tensor:
        """``(K, F)`` the trainer's reward functions on the rows without a given reward (NaN on the others).

        Every rank scores the same rows (TRL's ``_calculate_rewards`` gathers across ranks: rank 0's copy is
        kept), so the call is collective and identical everywhere."""
        t = self.trainer
        components = torch.full((len(rows), like.shape[1]), math.nan, dtype=like.dtype, device=like.device)
        todo = [i for i, r in enumerate(rows) if r.reward is None]
        if not todo:
            return components
        conversational = isinstance(prompts[0], list)
        completions = [[{"role": "assistant", "content": texts[i]}] if conversational else texts[i] for i in todo]
        inputs = [{**dataset_rows[i], "prompt": prompts[i]} for i in todo]
        saved = t._plugin_gathered
        try:
            scored = t._calculate_rewards(inputs, [prompts[i] for i in todo], completions, [token_lists[i] for i in todo])
        finally:
            t._plugin_gathered = saved
        components[todo] = scored[:len(todo)].to(components)
        return components

    def _log_probs(self, extra: dict, everyone: dict) -> None:
        """The injected rows' old, sampling and reference log-probs, where TRL's output holds them."""
        t = self.trainer
        if not any(key in everyone for key in LOG_PROB_KEYS):
            return
        from trl.models.utils import disable_gradient_checkpointing

        from grpo_plugins_trl.objectives import add_reference_log_probs

        width = extra["completion_ids"].shape[1]
        if "old_per_token_logps" in everyone or "sampling_per_token_logps" in everyone:
            ids = torch.cat([extra["prompt_ids"], extra["completion_ids"]], dim=1)
            attention = torch.cat([extra["prompt_mask"], extra["completion_mask"]], dim=1)
            with torch.no_grad(), disable_gradient_checkpointing(t.model, t.args.gradient_checkpointing_kwargs):
                old, _, _ = t._get_per_token_logps_and_entropies(
                    t.model, ids, attention, width, batch_size=t.args.per_device_train_batch_size)
            for key in ("old_per_token_logps", "sampling_per_token_logps"):
                if key in everyone:
                    extra[key] = old
        if "ref_per_token_logps" in everyone:
            add_reference_log_probs(t, extra)

    def _log_table(self, prompts, completions, components, given) -> None:
        """TRL's completions table gets the injected rows (the advantage stage logs every row's advantage)."""
        logs = self.trainer._logs
        logs["prompt"].extend(prompts)
        logs["completion"].extend(completions)
        for i, name in enumerate(self.trainer.reward_func_names):
            logs["rewards"][name].extend(components[:, i].tolist())
        logs["advantages"].extend([0.0] * len(prompts))
        for column in logs["extra"]:
            logs["extra"][column].extend([None] * len(prompts))


def _fillers(key: str, last: torch.Tensor, count: int, trainer: "PluginGRPOTrainer") -> torch.Tensor:
    """``count`` filler rows for ``key``: the last row's prompt, no completion token, zero log-probs and advantage."""
    rows = last.expand(count, *last.shape[1:]).clone()
    if key == "completion_ids":
        rows.fill_(trainer._tokenizer.pad_token_id)
    elif key in ("completion_mask", "advantages") + LOG_PROB_KEYS:
        rows.zero_()
    return rows


def pad_local_rows(out: dict, n: int) -> None:
    """After the advantage stage: the per-row values it wrote for this rank's real rows, completed with
    this rank's filler rows (advantage 0, row data 0, group size 1) up to its ``n`` rows."""
    from grpo_plugins_trl.objectives import GROUP_SIZE_KEY

    for key, value in list(out.items()):
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] < n:
            fill = 1 if key == GROUP_SIZE_KEY else 0
            out[key] = torch.cat([value, value.new_full((n - value.shape[0], *value.shape[1:]), fill)])
