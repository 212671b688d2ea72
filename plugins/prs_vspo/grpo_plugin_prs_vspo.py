"""PRS + VSPO: progressive reward shaping and value-based sampling with in-step replacement of
zero-advantage groups.

Zhuang, Chen, Su, Luo, Liu, Zeng, "Enhancing Agentic RL with Progressive Reward Shaping and
Value-based Sampling Policy Optimization" (arXiv:2512.07478). No public code; the formulas below are
the method card's inferred forms (``README.md`` lists each choice).

**PRS** (``shape_rewards``): a staged reward from two reward components, a format score ``f`` in
``[0, 1]`` (parseable tool calls, answer format) and a correctness score ``c`` in ``[0, 1]``::

    R = b * f                 if f < tau_f      (stage 1: only the format counts)
    R = b + w_c * c           otherwise         (stage 2: correctness unlocked)

with ``b = format_bonus`` (0.2), ``w_c = correct_weight`` (0.8), ``tau_f = format_threshold`` (1). A group
``[invalid, valid-wrong, valid-right, valid-wrong]`` scores ``[0, 0.2, 1.0, 0.2]`` instead of ``[0, 0, 1, 0]``.

**VSPO replacement** (``keep_rows``): a group whose PRS rewards are all equal has GRPO advantages all
zero; it is dropped and the trainer refills the batch with new prompts inside the step (feature
``batch_editing``; on TRL ``grpo_plugins_trl.refill``). The decision reads the PRS reward (``keep_rows``
runs before ``shape_rewards``), so a group whose correctness is constant but whose format differs is kept.

**VSPO value-based sampling** (``sample_prompts``, every round the trainer plans, refill rounds
included): prompt ``x`` with ``a_x`` solved completions (``c > success_threshold``) out of ``n_x`` has
``p_x = (a_x + 1) / (n_x + 2)`` and task value::

    V(x) = lambda * (1 - p_x) + (1 - lambda) * H2(p_x),    H2(p) = -p log2 p - (1 - p) log2 (1 - p)

(difficulty and uncertainty, both in ``[0, 1]``); a round draws prompts with probability ``V / sum V``.
The counts cover every generated group once: with the replacement on they are taken in ``keep_rows``
(every generation round, refills included, so the dropped all-solved / all-failed groups count and their
prompts lose value), otherwise in ``observe`` (the trained batch).

Shapes: ``N`` completions, ``G`` groups, ``D`` dataset prompts, ``P`` prompts of a round.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpo_plugins import FINITE, NON_NEGATIVE, UNIT, Example, GRPOBatch, Method, PromptRound, Range, hookimpl, option
from grpo_plugins.batch_editing import informative_groups
from grpo_plugins.prompt_table import PromptTable, draw_weighted, group_outcomes, unit_outcomes

# --------------------------------------------------------------------------------------------- maths


def staged_rewards(format_score: torch.Tensor, correctness: torch.Tensor, format_threshold: float = 1.0,
                   format_bonus: float = 0.2, correct_weight: float = 0.8) -> torch.Tensor:
    """``(N,)`` PRS rewards: ``b * f`` where ``f < tau_f``, else ``b + w_c * c`` (module docstring).

    Card example: ``f = [0, 1, 1, 1]``, ``c = [0, 0, 1, 0]`` -> ``[0, 0.2, 1.0, 0.2]``.
    """
    valid = format_score >= format_threshold
    return torch.where(valid, format_bonus + correct_weight * correctness, format_bonus * format_score)


def task_value(pass_rate: torch.Tensor, difficulty_weight: float = 0.5) -> torch.Tensor:
    """``V = lambda (1 - p) + (1 - lambda) H2(p)``, any shape; ``H2`` in bits, 0 at ``p`` in ``{0, 1}``.

    Example: ``p = 0.5`` -> ``0.5 * 0.5 + 0.5 * 1 = 0.75``; ``p = 0.25`` -> ``0.375 + 0.5 * 0.8113 = 0.7806``.
    """
    p = pass_rate.double()
    entropy = -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p)) / torch.log(torch.tensor(2.0, dtype=torch.float64))
    return difficulty_weight * (1 - p) + (1 - difficulty_weight) * entropy


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class PRSVSPOConfig:
    """PRS + VSPO (arXiv:2512.07478); the card's worked-example values where the paper gives none."""

    format_reward: str | None = option(
        "format", "Reward function (component) scoring format validity in [0, 1]; None: no PRS shaping (the trainer's "
        "reward is used as it is).")
    correct_reward: str = option(
        "accuracy", "Reward function (component) scoring correctness in [0, 1]; also what the pass rates count.")
    format_threshold: float = option(
        1.0, "A completion's format is valid when its format score is at least this (stage 2 unlocks).",
        domain=Range(0, 1, low_open=True))
    format_bonus: float = option(0.2, "b: the reward of a valid format before correctness (card's example).", domain=UNIT)
    correct_weight: float = option(0.8, "w_c: weight of correctness once the format is valid (card's example).",
                                   domain=NON_NEGATIVE)
    replace_zero_advantage_groups: bool = option(
        True, "Drop groups whose PRS rewards are all equal (zero advantages) and have the trainer refill them (keep_rows).")
    value_sampling: bool = option(True, "Draw each round's prompts in proportion to the task value V (sample_prompts).")
    difficulty_weight: float = option(
        0.5, "lambda: weight of difficulty (1 - p) against uncertainty H2(p) in the task value (inferred).", domain=UNIT)
    success_threshold: float = option(0.5, "A completion counts as solved when its correctness is above this.",
                                      domain=FINITE)


class PRSVSPO(Method):
    """PRS + VSPO: staged format-then-correctness rewards, zero-advantage groups replaced, value-based prompts."""

    name = "prs_vspo"
    Config = PRSVSPOConfig
    paper = "https://arxiv.org/abs/2512.07478"
    plugin_api = ">=1.1,<2"  # keep_rows

    def __init__(self, config=None):
        super().__init__(config)
        self.table = PromptTable(solved=(0.0, torch.float64, ()), seen=(0.0, torch.float64, ()))

    @classmethod
    def example(cls) -> Example:
        return Example(reward_names=("format", "accuracy"), reward_values=(0.0, 1.0))

    def disabled_hooks(self) -> set[str]:
        off = set()
        if self.config.format_reward is None:
            off.add("shape_rewards")
        if not self.config.replace_zero_advantage_groups:
            off.add("keep_rows")
        if not self.config.value_sampling:
            off.add("sample_prompts")
        return off

    # ------------------------------------------------------------------ reading the batch
    def _component(self, batch: GRPOBatch, name: str) -> torch.Tensor:
        """``(N,)`` values of the reward component ``name``; a clear error when it is missing or NaN."""
        if batch.reward_components is None or name not in batch.reward_names:
            raise ValueError(f"prs_vspo needs the reward function '{name}' (option format_reward / correct_reward); "
                             f"the run's reward functions are {list(batch.reward_names)}")
        values = batch.reward_components[:, batch.reward_names.index(name)]
        missing = torch.isnan(values)
        if bool(missing.any()):
            rows = missing.nonzero().flatten()[:5].tolist()
            raise ValueError(f"prs_vspo: reward function '{name}' gave no value (NaN) for completions {rows}; PRS needs "
                             "the format and correctness scores of every completion")
        return values

    def prs_rewards(self, batch: GRPOBatch) -> torch.Tensor:
        """``(N,)`` PRS rewards of the batch (:func:`staged_rewards` of its two components)."""
        c = self.config
        return staged_rewards(self._component(batch, c.format_reward), self._component(batch, c.correct_reward),
                              c.format_threshold, c.format_bonus, c.correct_weight).to(batch.rewards.dtype)

    # ------------------------------------------------------------------ hooks
    @hookimpl
    def shape_rewards(self, batch: GRPOBatch, rewards: torch.Tensor) -> torch.Tensor:
        """The PRS reward replaces the trainer's weighted sum."""
        shaped = self.prs_rewards(batch)
        self.log_metric("format_valid_fraction",
                        (self._component(batch, self.config.format_reward) >= self.config.format_threshold).double().mean())
        return shaped

    @hookimpl
    def keep_rows(self, batch: GRPOBatch) -> torch.Tensor:
        """``(N,)`` bool: rows of groups whose PRS rewards (or rewards, without PRS) differ; groups of one kept."""
        values = batch.rewards if self.config.format_reward is None else self.prs_rewards(batch)
        kept = informative_groups(values, batch.group_index, batch.num_groups)
        self.log_metric("replaced_group_fraction", (~kept).double().mean())
        self.count_outcomes(batch)  # every generated group, the dropped ones included (observe sees the kept ones)
        return kept.index_select(0, batch.group_index)

    @hookimpl
    def sample_prompts(self, round: PromptRound, generator: torch.Generator) -> torch.Tensor:
        """``(P,)`` dataset indices drawn with probability ``V / sum V`` (distinct while enough have ``V > 0``)."""
        solved, seen = self.counts(torch.arange(round.dataset_size))
        value = task_value((solved + 1) / (seen + 2), self.config.difficulty_weight)
        chosen = draw_weighted(value, round.num_prompts, generator)
        self.log_metric("sampled_task_value", value[chosen].mean())
        return chosen

    @hookimpl
    def observe(self, batch: GRPOBatch) -> None:
        """Counts the trained batch's outcomes when ``keep_rows`` is off (it counts every round otherwise)."""
        if not self.config.replace_zero_advantage_groups:
            self.count_outcomes(batch)

    # ------------------------------------------------------------------ state
    def count_outcomes(self, batch: GRPOBatch) -> None:
        """``a += #(c > success_threshold)``, ``n += #completions`` for every prompt of the batch."""
        name = self.config.correct_reward
        if self.config.format_reward is None and name not in batch.reward_names:
            correctness = batch.rewards  # no PRS: the trainer's reward is the correctness
        else:
            correctness = self._component(batch, name)
        ids, solved, trials = group_outcomes(batch, unit_outcomes(correctness, threshold=self.config.success_threshold))
        self.table.add("solved", ids, solved)
        self.table.add("seen", ids, trials)

    def counts(self, prompt_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, n)`` ``(P,)`` float64 solved and observed completions of ``prompt_ids``."""
        return self.table.get("solved", prompt_ids), self.table.get("seen", prompt_ids)

    def state_dict(self) -> dict:
        return {"table": self.table.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.table.load_state_dict(state["table"])
