"""CRAFT-GUI: a staged difficulty curriculum with a hybrid reward (Nong et al., 2025, arXiv:2508.11360).

GUI tasks differ widely in difficulty; training on all of them at once wastes rollouts on tasks the
agent cannot solve yet (all-zero groups) and on tasks it has mastered (all-one groups). CRAFT-GUI
trains in stages from easy to hard and replaces a single coarse reward by a weighted mix of
rule-based signals and a model judge. Here:

    pass rate    p(x)  = share of successful completions of x's group the last time x was trained
                         (an optional momentum m keeps m p_old + (1 - m) p_new); unseen prompts
                         read ``prior_pass_rate``
    bin          b(x)  = #{t in thresholds : p(x) < t}        thresholds (0.7, 0.3): easy / medium / hard
    stage s      samples prompts with b(x) <= s, uniformly without replacement; when fewer than P
                 are eligible, the next-easiest bins fill the round
    advance      s <- s + 1 when the observed batch's accuracy exceeds ``advance_accuracy``, or
                 after ``stage_steps`` optimiser steps in the stage (0: by accuracy only)
    reward       R = sum_k w_k c_k over the named reward components (format, action type, argument
                 score, judge, ...); a NaN component (did not apply) counts 0. R replaces the trainer's
                 reward, so craft_gui must come first among the shape_rewards methods
    advantage    plain GRPO over R (the built-in estimator)

Shapes: ``D`` dataset prompts, ``P`` prompts in a round, ``N`` completions, ``G`` groups, ``K``
reward components.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from grpo_plugins import FINITE, NON_NEGATIVE, UNIT, GRPOBatch, Method, Needs, PromptRound, Range, hookimpl, option
from grpo_plugins.ops import segment_mean
from grpo_plugins.prompt_table import PromptTable

# --------------------------------------------------------------------------------------------- maths


def difficulty_bins(pass_rate: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``(D,)`` int64 difficulty bin of each prompt: the number of thresholds its pass rate is below.

    ``pass_rate``: ``(D,)`` in ``[0, 1]``; ``thresholds``: ``(B - 1,)`` strictly decreasing. With
    ``(0.7, 0.3)``: ``p >= 0.7`` -> 0 (easy), ``0.3 <= p < 0.7`` -> 1 (medium), ``p < 0.3`` -> 2 (hard).
    """
    return (pass_rate.unsqueeze(-1) < thresholds.to(pass_rate.dtype)).sum(-1)


def curriculum_draw(bins: torch.Tensor, stage: int, num: int, generator: torch.Generator) -> torch.Tensor:
    """``(num,)`` prompt positions for a round of stage ``stage``; ``bins``: ``(D,)`` int64.

    Every prompt gets the key ``max(b - stage, 0) + u`` with ``u ~ U[0, 1)`` from ``generator``; the
    ``num`` smallest keys win. Eligible prompts (``b <= stage``) are therefore drawn uniformly without
    replacement, and only when there are fewer than ``num`` of them do the next-easiest bins fill
    the round. With ``num > D`` the ranking repeats from the top.
    """
    keys = (bins - stage).clamp(min=0).double() + torch.rand(bins.shape, dtype=torch.float64, generator=generator)
    order = torch.topk(keys, min(num, keys.numel()), largest=False).indices
    return order[torch.arange(num) % order.numel()]


def group_pass_rates(success: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``(G,)`` share of successful completions per group; ``success``: ``(N,)`` bool."""
    return segment_mean(success.double(), index, num_groups)


def hybrid_reward(components: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(N,)`` ``R = sum_k w_k c_k``; ``components``: ``(N, K)`` (NaN = did not apply, counts 0), ``weights``: ``(K,)``."""
    applied = torch.where(torch.isnan(components), torch.zeros_like(components), components)
    return applied @ weights.to(applied.dtype)


def next_stage(
    stage: int, accuracy: float, steps_in_stage: int, last_stage: int, advance_accuracy: float, stage_steps: int
) -> int:
    """The stage after an observed batch: one more when its ``accuracy`` exceeds ``advance_accuracy`` or
    the stage has lasted ``stage_steps`` steps (``stage_steps = 0``: by accuracy only), at most ``last_stage``."""
    by_steps = stage_steps > 0 and steps_in_stage >= stage_steps
    return min(stage + 1, last_stage) if (accuracy > advance_accuracy or by_steps) else stage


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class CraftGUIConfig:
    """CRAFT-GUI (arXiv:2508.11360). The paper's thresholds and weights are not public: the defaults
    are the method card's (see the README for what each choice rests on)."""

    curriculum: bool = option(True, "Provide sample_prompts (the staged curriculum); false leaves the slot to another method.")
    pass_rate_thresholds: tuple[float, ...] = option(
        (0.7, 0.3),
        "Strictly decreasing pass-rate cut points between difficulty bins, easy to hard: (0.7, 0.3) gives "
        "easy p >= 0.7, medium 0.3 <= p < 0.7, hard p < 0.3, and len + 1 stages.",
        domain=UNIT,
    )
    prior_pass_rate: float = option(
        1.0, "Pass rate of a prompt never trained on: 1.0 counts it easy, so stage 0 measures unseen prompts first.",
        domain=UNIT,
    )
    pass_rate_momentum: float = option(
        0.0, "m: a prompt's pass rate becomes m * old + (1 - m) * the latest group's (0: the last visit only).",
        domain=Range(0, 1, high_open=True),
    )
    advance_accuracy: float = option(
        0.7, "Advance to the next stage when an observed batch's accuracy exceeds this.", domain=UNIT
    )
    stage_steps: int = option(
        0, "Also advance after this many optimiser steps in a stage (0: by accuracy only).", domain=NON_NEGATIVE
    )
    success_threshold: float = option(
        1.0, "A completion succeeds when its success reward is >= this.", domain=FINITE
    )
    success_component: str = option(
        "", "Reward component (a reward function's name) that decides success; '' uses the shaped total reward."
    )
    reward_components: tuple[str, ...] = option(
        (),
        "Reward components (reward functions' names) mixed into R = sum_k w_k c_k by shape_rewards, e.g. "
        "('format', 'action_type', 'action_args', 'judge'); () leaves the trainer's reward as it is.",
    )
    reward_weights: tuple[float, ...] = option(
        (), "w_k, one per reward component (() weighs each 1.0); not published in the paper.", domain=FINITE
    )

    def __post_init__(self):
        thresholds = self.pass_rate_thresholds
        if not thresholds or any(a <= b for a, b in zip(thresholds, thresholds[1:])):
            raise ValueError(f"pass_rate_thresholds must be non-empty and strictly decreasing, got {thresholds}")
        if self.reward_weights and len(self.reward_weights) != len(self.reward_components):
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} values for {len(self.reward_components)} reward_components"
            )
        if len(set(self.reward_components)) != len(self.reward_components):
            raise ValueError(f"reward_components repeats a name: {self.reward_components}")


# --------------------------------------------------------------------------------------------- method


class CraftGUI(Method):
    """CRAFT-GUI: train easy-to-hard in stages of per-prompt pass rate, on a weighted hybrid reward."""

    name = "craft_gui"
    Config = CraftGUIConfig
    paper = "https://arxiv.org/abs/2508.11360"
    plugin_api = ">=1.3,<2"  # Needs.runs_first

    def __init__(self, config: CraftGUIConfig | None = None):
        super().__init__(config)
        c = self.config
        self.thresholds = torch.tensor(c.pass_rate_thresholds, dtype=torch.float64)
        self.table = PromptTable(pass_rate=(c.prior_pass_rate, torch.float64, ()), visits=(0, torch.int64, ()))
        self.stage = 0
        self.stage_started_at = 0

    @property
    def last_stage(self) -> int:
        """Index of the final stage, where every bin is eligible."""
        return len(self.config.pass_rate_thresholds)

    def needs(self) -> Needs:
        return Needs(runs_first={"shape_rewards"}, why={"shape_rewards": "it rebuilds the reward from reward_components, so an earlier shaping would be lost"})

    def disabled_hooks(self) -> set[str]:
        off = set()
        if not self.config.curriculum:
            off.add("sample_prompts")
        if not self.config.reward_components:
            off.add("shape_rewards")
        return off

    def bins(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """``(P,)`` current difficulty bin of each prompt id."""
        return difficulty_bins(self.table.get("pass_rate", prompt_ids), self.thresholds)

    @hookimpl
    def sample_prompts(self, round: PromptRound, generator: torch.Generator) -> torch.Tensor:
        """``(P,)`` dataset indices of the current stage (see :func:`curriculum_draw`)."""
        bins = self.bins(torch.arange(round.dataset_size))
        chosen = curriculum_draw(bins, self.stage, round.num_prompts, generator)
        self.log_metric("stage", self.stage)
        self.log_metric("eligible_fraction", (bins <= self.stage).double().mean())
        self.log_metric("sampled_above_stage_fraction", (bins[chosen] > self.stage).double().mean())
        return chosen

    def _components(self, batch: GRPOBatch, names: tuple[str, ...]) -> torch.Tensor:
        """``(N, len(names))`` columns of ``batch.reward_components``; a clear error when one is missing."""
        missing = [n for n in names if n not in batch.reward_names]
        if batch.reward_components is None or missing:
            raise ValueError(
                f"craft_gui needs the reward component(s) {missing or list(names)} (reward functions of those "
                f"names); the trainer's reward components are {list(batch.reward_names)}. Set craft_gui's "
                "reward_components / success_component to your reward functions' names"
            )
        return batch.reward_components[:, [batch.reward_names.index(n) for n in names]]

    @hookimpl
    def shape_rewards(self, batch: GRPOBatch, rewards: torch.Tensor) -> torch.Tensor:
        """``(N,)`` hybrid reward ``sum_k w_k c_k`` over the configured components (it replaces the trainer's
        reward, so craft_gui runs first among the ``shape_rewards`` methods: ``Needs.runs_first``)."""
        c = self.config
        components = self._components(batch, c.reward_components)
        weights = torch.tensor(c.reward_weights or (1.0,) * len(c.reward_components), dtype=torch.float64)
        shaped = hybrid_reward(components.double(), weights)
        for k, name in enumerate(c.reward_components):
            column = components[:, k]
            applied = ~torch.isnan(column)
            if bool(applied.any()):
                self.log_metric(f"component_{name}_mean", column[applied].mean())
        return shaped.to(rewards.dtype)

    def _success(self, batch: GRPOBatch) -> torch.Tensor:
        """``(N,)`` bool: completions whose success reward reaches ``success_threshold``."""
        c = self.config
        reward = self._components(batch, (c.success_component,))[:, 0] if c.success_component else batch.rewards
        return torch.nan_to_num(reward.double(), nan=float("-inf")) >= c.success_threshold

    @hookimpl
    def observe(self, batch: GRPOBatch, step: int) -> None:
        """Update visited prompts' pass rates, then advance the stage if the batch was accurate enough."""
        c = self.config
        success = self._success(batch)
        observed = group_pass_rates(success, batch.group_index, batch.num_groups).cpu()
        rows = self.table.rows(batch.group_prompt_ids)
        columns = self.table.columns
        seen = columns["visits"][rows] > 0
        blended = c.pass_rate_momentum * columns["pass_rate"][rows] + (1 - c.pass_rate_momentum) * observed
        columns["pass_rate"][rows] = torch.where(seen, blended, observed)
        columns["visits"][rows] += 1
        accuracy = float(success.double().mean())
        stage = next_stage(
            self.stage, accuracy, step - self.stage_started_at, self.last_stage, c.advance_accuracy, c.stage_steps
        )
        if stage != self.stage:
            self.stage, self.stage_started_at = stage, step
        self.log_metric("batch_accuracy", accuracy)
        self.log_metric("stage_after_step", self.stage)
        self.log_metric("zero_variance_group_fraction", ((observed == 0) | (observed == 1)).double().mean())

    def state_dict(self) -> dict[str, Any]:
        """The pass-rate table (``keys``, ``pass_rate``, ``visits``), the stage and the step it began."""
        return {**self.table.state_dict(), "stage": self.stage, "stage_started_at": self.stage_started_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        if not state:
            return
        stage = int(state["stage"])
        if not 0 <= stage <= self.last_stage:
            raise ValueError(f"craft_gui state: stage {stage} outside [0, {self.last_stage}] of this config's thresholds")
        self.table.load_state_dict({k: v for k, v in state.items() if k not in ("stage", "stage_started_at")})
        self.stage, self.stage_started_at = stage, int(state["stage_started_at"])
