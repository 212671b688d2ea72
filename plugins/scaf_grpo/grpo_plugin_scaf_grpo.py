"""Scaf-GRPO: scaffolded GRPO with tiered in-prompt hints (arXiv:2510.19807).

When every completion of a prompt fails, GRPO's group-relative advantage is 0 for the whole group
and the prompt teaches nothing (the "learning cliff"). After a hint-free warm-up, Scaf-GRPO hints
such a prompt with the least revealing help that works, from a ladder of tiers (knowledge ->
planning -> solution), each revealed in growing chunks. Advantages and the loss stay plain GRPO.

Here the ladder is a per-prompt hint level ``L`` (0 = no hint), kept across steps:

    level L in 1..n_tiers * C  ->  tier (L - 1) // C, first (L - 1) % C + 1 chunks of that tier
    a group observed after warm-up with no correct completion:  L <- min(L + 1, n_tiers * C)
    a group with >= 1 correct completion:                        L <- L - 1 (or 0 with on_solved='clear')

Shapes: ``N`` completions, ``G`` groups, ``P`` prompts in a round, ``D`` prompt ids tracked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from grpo_plugins import FINITE, NON_NEGATIVE, UNIT, Example, GRPOBatch, Method, Needs, PromptRound, Range, hookimpl, option
from grpo_plugins.ops import segment_max


def group_solved(correct: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``(G,)`` bool: whether any completion of the group is correct; ``correct``: ``(N,)`` bool."""
    return segment_max(correct.float(), index, num_groups) > 0


def next_levels(
    levels: torch.Tensor, solved: torch.Tensor, max_level: int, on_solved: str = "step_down"
) -> torch.Tensor:
    """The hint level of each observed group's prompt after the observation -> ``(G,)`` int64.

    ``levels``: ``(G,)`` current levels; ``solved``: ``(G,)`` bool. A failed group climbs one level
    (capped at ``max_level``); a solved one steps one level down (``'step_down'``) or drops its hint
    (``'clear'``).
    """
    down = torch.zeros_like(levels) if on_solved == "clear" else (levels - 1).clamp(min=0)
    return torch.where(solved, down, (levels + 1).clamp(max=max_level))


def level_to_tier(level: int, chunks_per_tier: int) -> tuple[int, int]:
    """``(tier index, number of chunks)`` of hint level ``level >= 1``."""
    return (level - 1) // chunks_per_tier, (level - 1) % chunks_per_tier + 1


def hint_text(cell: Any, chunks: int, separator: str = " ") -> str:
    """The first ``chunks`` chunks of a dataset cell (a string is one chunk; a list holds chunks)."""
    if cell is None:
        return ""
    if isinstance(cell, str):
        return cell.strip()
    parts = [str(part).strip() for part in list(cell)[:chunks] if part is not None and str(part).strip()]
    return separator.join(parts)


def append_hint(prompt: Any, hint: str) -> Any:
    """``prompt`` with ``hint`` appended, without mutating it.

    A plain-string prompt gets the text appended; a chat prompt (a list of ``{"role", "content"}``
    messages) gets it appended to its last user message (a text part is added when the content is a
    list of parts; a user message is added when there is none).
    """
    if isinstance(prompt, str):
        return prompt + hint
    if not isinstance(prompt, (list, tuple)):
        raise TypeError(f"cannot add a hint to a {type(prompt).__name__} prompt; expected str or a message list")
    messages = [dict(message) for message in prompt]
    users = [i for i, message in enumerate(messages) if message.get("role") == "user"]
    if not users:
        return messages + [{"role": "user", "content": hint.lstrip()}]
    last = messages[users[-1]]
    content = last.get("content")
    if isinstance(content, list):
        last["content"] = list(content) + [{"type": "text", "text": hint}]
    else:
        last["content"] = ("" if content is None else str(content)) + hint
    return messages


@dataclass(frozen=True)
class ScafGRPOConfig:
    """Scaf-GRPO (Zhang et al., ICLR 2026, arXiv:2510.19807): tiered hints for prompts stuck after a warm-up."""

    hint_columns: tuple[str, ...] = option(
        ("hint_knowledge", "hint_planning", "hint_solution"),
        "Dataset columns holding each tier's hint, least to most revealing. A cell is a string (one chunk) or a "
        "list of chunks revealed cumulatively; an empty cell leaves that tier unhinted.",
    )
    hint_labels: tuple[str, ...] = option(
        ("Knowledge Hints", "Planning Hints", "Solution Hints"),
        "Label written before each tier's hint (one per column).",
    )
    chunks_per_tier: int = option(
        4, "Hint levels within a tier: level j of a tier shows its first j chunks.", paper=4, domain=Range(1)
    )
    template: str = option(
        "\n{label}: {hint}",
        "How a hint is appended to the prompt (or to the last user message): str.format with {hint} and optionally "
        "{label}, no other placeholder (write a literal brace as '{{' or '}}').",
    )
    total_steps: int = option(
        0,
        "Optimiser steps of the whole run, to turn warmup_fraction into steps; 0 takes the trainer's run length "
        "(PromptRound.total_steps / GRPOBatch.total_steps, e.g. TRL's max_steps).",
        domain=NON_NEGATIVE,
    )
    warmup_fraction: float = option(
        0.15, "Hint-free fraction of training (used when warmup_steps < 0).", paper=0.15, domain=UNIT
    )
    warmup_steps: int = option(
        -1, "Hint-free optimiser steps; overrides warmup_fraction when >= 0 (released code: 50).", domain=Range(-1)
    )
    correct_reward: float = option(
        1.0, "A completion counts as correct when its reward is >= this value.", domain=FINITE
    )
    reward_name: str = option(
        "", "Reward component that decides correctness (a reward function's name); '' uses the shaped total reward."
    )
    on_solved: Literal["step_down", "clear"] = option(
        "step_down", "When a hinted prompt's group has a correct completion: one level less help, or no hint at all."
    )

    def __post_init__(self):
        if len(self.hint_columns) != len(self.hint_labels) or not self.hint_columns:
            raise ValueError("hint_columns and hint_labels must be non-empty and of equal length")
        if self.chunks_per_tier < 1:
            raise ValueError("chunks_per_tier must be >= 1")
        if self.total_steps < 0:
            raise ValueError("total_steps must be >= 0 (0 = the trainer's run length)")
        if not 0.0 <= self.warmup_fraction <= 1.0:
            raise ValueError("warmup_fraction must be in [0, 1]")
        if "{hint}" not in self.template:
            raise ValueError("template must contain '{hint}'")
        try:  # fill it as hint_for will, so that a bad template fails now, not when a prompt first gets a hint
            self.template.format(label="label", hint="hint")
        except (KeyError, IndexError, ValueError, AttributeError, TypeError) as error:
            raise ValueError(
                f"template {self.template!r} cannot be filled with only {{label}} and {{hint}} "
                f"({type(error).__name__}: {error}); write a literal brace as '{{{{' or '}}}}'"
            ) from None


class ScafGRPO(Method):
    """Scaf-GRPO: after a warm-up, prompts whose whole group fails get escalating tiered hints."""

    name = "scaf_grpo"
    Config = ScafGRPOConfig
    paper = "https://arxiv.org/abs/2510.19807"

    def __init__(self, config: ScafGRPOConfig | None = None):
        super().__init__(config)
        # Sparse per-prompt state (prompt ids may be 63-bit hashes): sorted ids of the prompts that are
        # hinted or stuck, their hint levels (0 = none) and stuck flags, all (D,).
        self.prompt_ids = torch.zeros(0, dtype=torch.long)
        self.levels = torch.zeros(0, dtype=torch.long)
        self.stuck = torch.zeros(0, dtype=torch.bool)

    @classmethod
    def example(cls) -> Example:
        """The conformance suite's example run: every row has the three hint columns (the third tier
        empty for odd prompts, as a dataset may leave a tier unhinted); a short warm-up."""
        return Example(
            config={"warmup_steps": 1},
            columns={
                "hint_knowledge": lambda prompt_id: f"facts for {prompt_id}",
                "hint_planning": lambda prompt_id: [f"step 1 of {prompt_id}", f"step 2 of {prompt_id}"],
                "hint_solution": lambda prompt_id: "" if prompt_id % 2 else f"answer {prompt_id}",
            },
        )

    def needs(self) -> Needs:
        """Every dataset row must have the hint columns (an empty cell is allowed: that tier is unhinted)."""
        return Needs(columns=self.config.hint_columns, why={c: "scaf_grpo reads its hints there" for c in self.config.hint_columns})

    @property
    def warmup_steps(self) -> int:
        """Hint-free optimiser steps, from the config alone (see :meth:`warmup_for`)."""
        return self.warmup_for(None)

    def warmup_for(self, run_steps: int | None) -> int:
        """Hint-free optimiser steps: ``warmup_steps`` when set, else ``round(warmup_fraction * total)`` with
        ``total`` the config's ``total_steps`` or, when that is 0, the trainer's ``run_steps``.

        Raises:
            ValueError: the warm-up depends on a run length that neither the config nor the trainer gives.
        """
        c = self.config
        if c.warmup_steps >= 0:
            return c.warmup_steps
        total = c.total_steps if c.total_steps > 0 else (run_steps or 0)
        if total <= 0:
            raise ValueError(
                "scaf_grpo needs the run length for its warm-up and the trainer did not give it "
                "(total_steps is None): set total_steps (the run's optimiser steps) or warmup_steps"
            )
        return int(round(c.warmup_fraction * total))

    @property
    def max_level(self) -> int:
        """Highest hint level: every chunk of the most revealing tier."""
        return len(self.config.hint_columns) * self.config.chunks_per_tier

    def _lookup(self, values: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
        """``values`` ``(D,)`` of ``prompt_ids`` ``(P,)``; 0 / False for prompts without state."""
        prompt_ids = prompt_ids.long().cpu()
        out = torch.zeros(prompt_ids.shape, dtype=values.dtype)
        if self.prompt_ids.numel() == 0:
            return out
        pos = torch.searchsorted(self.prompt_ids, prompt_ids).clamp(max=self.prompt_ids.numel() - 1)
        found = self.prompt_ids[pos] == prompt_ids
        out[found] = values[pos[found]]
        return out

    def levels_of(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """``(P,)`` current hint level of each prompt id (0 for prompts without state)."""
        return self._lookup(self.levels, prompt_ids)

    def stuck_of(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """``(P,)`` whether each prompt's last group after warm-up had no correct completion."""
        return self._lookup(self.stuck, prompt_ids)

    def _update(self, prompt_ids: torch.Tensor, levels: torch.Tensor, stuck: torch.Tensor) -> None:
        """Set the state of ``prompt_ids`` ``(G,)`` (distinct), then drop prompts with no hint and not stuck."""
        merged, inverse = torch.unique(torch.cat([self.prompt_ids, prompt_ids]), sorted=True, return_inverse=True)
        new_levels = torch.zeros(merged.numel(), dtype=torch.long)
        new_stuck = torch.zeros(merged.numel(), dtype=torch.bool)
        old = inverse[: self.prompt_ids.numel()]
        new_levels[old], new_stuck[old] = self.levels, self.stuck
        new_levels[inverse[self.prompt_ids.numel():]] = levels
        new_stuck[inverse[self.prompt_ids.numel():]] = stuck
        keep = (new_levels > 0) | new_stuck
        self.prompt_ids, self.levels, self.stuck = merged[keep], new_levels[keep], new_stuck[keep]

    def hint_for(self, row: dict, level: int) -> str:
        """The text appended at ``level`` for a dataset row ('' when that tier's cell is empty)."""
        tier, chunks = level_to_tier(level, self.config.chunks_per_tier)
        column = self.config.hint_columns[tier]
        if column not in row:
            raise KeyError(
                f"dataset row has no hint column '{column}' (columns: {sorted(row)}); set scaf_grpo's hint_columns"
            )
        text = hint_text(row[column], chunks)
        return self.config.template.format(label=self.config.hint_labels[tier], hint=text) if text else ""

    @hookimpl
    def augment_prompts(self, round: PromptRound, prompt_ids: torch.Tensor, prompts: list, rows: list[dict]) -> list:
        """Append each stuck prompt's current hint tier; other prompts pass unchanged."""
        levels = self.levels_of(prompt_ids)
        if round.step < self.warmup_for(round.total_steps):
            levels = torch.zeros_like(levels)
        out = list(prompts)
        hinted = levels.nonzero().flatten().tolist()
        for i in hinted:
            hint = self.hint_for(rows[i], int(levels[i]))
            if hint:
                out[i] = append_hint(prompts[i], hint)
        self.log_metric("hinted_prompt_frac", len(hinted) / max(len(prompts), 1))
        tiers = torch.div(levels[levels > 0] - 1, self.config.chunks_per_tier, rounding_mode="floor")
        for t, column in enumerate(self.config.hint_columns):
            self.log_metric(f"tier_{column}_frac", float((tiers == t).sum()) / max(len(prompts), 1))
        return out

    def _correct(self, batch: GRPOBatch) -> torch.Tensor:
        rewards = batch.rewards
        if self.config.reward_name:
            if batch.reward_components is None or self.config.reward_name not in batch.reward_names:
                raise ValueError(
                    f"reward_name '{self.config.reward_name}' is not among the batch's reward components "
                    f"{list(batch.reward_names)}"
                )
            rewards = batch.reward_components[:, batch.reward_names.index(self.config.reward_name)]
        return torch.nan_to_num(rewards.float(), nan=float("-inf")) >= self.config.correct_reward

    @hookimpl
    def observe(self, batch: GRPOBatch, step: int) -> None:
        """Update per-prompt stuck flags and hint levels from the finished step's groups."""
        solved = group_solved(self._correct(batch), batch.group_index, batch.num_groups)
        self.log_metric("frac_groups_unsolved", (~solved).float().mean())
        if step <= self.warmup_for(batch.total_steps):  # the step just taken is still inside the hint-free warm-up
            return
        ids = batch.group_prompt_ids.long().cpu()
        solved = solved.cpu()
        before = self.levels_of(ids)
        hinted = before > 0
        self._update(ids, next_levels(before, solved, self.max_level, self.config.on_solved), ~solved)
        self.log_metric("num_stuck_prompts", self.stuck.sum())
        if bool(hinted.any()):
            self.log_metric("hinted_groups_solved_frac", solved[hinted].float().mean())

    def state_dict(self) -> dict[str, Any]:
        """Sorted prompt ids with state, their hint levels and stuck flags (three ``(D,)`` tensors)."""
        return {"prompt_ids": self.prompt_ids.clone(), "levels": self.levels.clone(), "stuck": self.stuck.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        if not state:
            return
        ids, levels, stuck = state["prompt_ids"].long(), state["levels"].long(), state["stuck"].bool()
        if not (ids.dim() == 1 and ids.shape == levels.shape == stuck.shape):
            raise ValueError("scaf_grpo state: 'prompt_ids', 'levels' and 'stuck' must be 1-D tensors of equal length")
        order = torch.argsort(ids)
        self.prompt_ids, self.levels, self.stuck = ids[order].clone(), levels[order].clone(), stuck[order].clone()

