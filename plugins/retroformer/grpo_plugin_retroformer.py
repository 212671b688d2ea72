"""Retroformer: retrospective LLM agents with policy-gradient optimisation (Yao et al., ICLR 2024,
arXiv:2308.02151).

A frozen *actor* LLM attempts a task in an environment. After a failed trial ``k`` (return ``G_k``),
the trained *retrospective* model reads the trajectory and writes a reflection ``y_k`` (the root cause
of the failure and a plan); the actor retries with the reflection in its prompt and earns ``G_{k+1}``.
The reflection's reward is the return gain it caused:

    rating(y_k) = G_{k+1} - G_k                                  (reward="gain", the paper)
                = 1[G_{k+1} - G_k > threshold]                   (reward="improved", the release's label)

This method trains the retrospective model with GRPO: the completions of one prompt are reflections
sampled for the same failed trial, so they share ``G_k``. The environment stays on the user's side:

- each dataset row carries the failed trial's return ``G_k`` in the column ``previous_return_column``;
- a reward function runs the actor with the reflection and returns ``G_{k+1}``: the trainer's whole
  reward (``return_component=""``) or the reward component named ``return_component``.

The reflection's shaped reward replaces ``G_{k+1}`` by its rating, keeping the other components:

    r'_i = r_i - w G_{k+1,i} + w rating_i        (w: the return component's weight; 1 for the whole reward)

With ``reward="gain"`` and GRPO's group baseline the shared ``G_k`` cancels, so the advantages equal
plain GRPO on ``G_{k+1}``; the gain matters as the reward's absolute level (metrics, estimators without
a group mean, groups of one) and ``reward="improved"`` changes the advantages themselves.

Shapes: ``N`` completions (reflections), ``K`` reward components.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from grpo_plugins import FINITE, GRPOBatch, Method, hookimpl, option
from grpo_plugins import Example, Needs
from grpo_plugins.ops import segment_max, segment_min


def return_gain_ratings(
    next_returns: torch.Tensor,
    previous_returns: torch.Tensor,
    reward: Literal["gain", "improved"] = "gain",
    threshold: float = 0.25,
) -> torch.Tensor:
    """A reflection's rating from the returns around it -> ``(N,)``.

    Args:
        next_returns: ``(N,)`` ``G_{k+1}``, the return of the trial run with the reflection.
        previous_returns: ``(N,)`` ``G_k``, the return of the failed trial it reflects on.
        reward: ``"gain"``: ``G_{k+1} - G_k``; ``"improved"``: ``1[G_{k+1} - G_k > threshold]``.
        threshold: the gain above which a reflection counts as helpful (``"improved"`` only).
    """
    gain = next_returns - previous_returns
    return gain if reward == "gain" else (gain > threshold).to(gain.dtype)


def retroformer_rewards(
    rewards: torch.Tensor, next_returns: torch.Tensor, ratings: torch.Tensor, weight: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """``r' = r - w G_{k+1} + w rating`` -> ``(N,)``: the return term of the reward replaced by the rating."""
    weight = torch.as_tensor(weight, dtype=rewards.dtype, device=rewards.device)
    return rewards + weight * (ratings.to(rewards.dtype) - next_returns.to(rewards.dtype))


@dataclass(frozen=True)
class RetroformerConfig:
    """Retroformer (arXiv:2308.02151): a reflection's reward is the return gain of the next trial."""

    previous_return_column: str = option(
        "previous_return",
        "Dataset column: G_k, the return of the failed trial the prompt's reflections are about (one number per "
        "row, equal for every completion of a prompt).",
    )
    return_component: str = option(
        "",
        "The reward that returns G_{k+1}, the next trial's return with the reflection: '' for the trainer's whole "
        "reward (one reward function), or the name of one reward component (TRL: the reward function's name); the "
        "other components are kept as they are.",
    )
    reward: Literal["gain", "improved"] = option(
        "gain",
        "The rating: 'gain' = G_{k+1} - G_k (the paper); 'improved' = 1 if the gain exceeds improvement_threshold, "
        "else 0 (the label the release trains its reward model on).",
    )
    improvement_threshold: float = option(
        0.25, "With reward='improved': the gain above which a reflection counts as helpful (the release: 0.25).",
        domain=FINITE,
    )


class Retroformer(Method):
    """Retroformer: reward a reflection by the return gain of the trial it guided (retrospective agents)."""

    name = "retroformer"
    Config = RetroformerConfig
    paper = "https://arxiv.org/abs/2308.02151"

    @classmethod
    def example(cls) -> Example:
        """The conformance suite's example run (see grpo_plugins.example)."""
        return Example(
            config={"return_component": "next_return"},
            reward_names=("next_return", "format"),
            reward_values=(0.0, 0.5, 1.0),
            columns={"previous_return": lambda row: (row % 3) / 2},
        )

    def needs(self) -> Needs:
        """The dataset columns this config reads."""
        return Needs(columns={self.config.previous_return_column})

    def requires(self) -> set[str]:
        """The dataset rows, which carry the previous trial's return."""
        return {"rows"}

    @hookimpl
    def shape_rewards(self, batch: GRPOBatch, rewards: torch.Tensor) -> torch.Tensor:
        """``(N,)`` rewards with the next trial's return replaced by the reflection's rating."""
        next_returns, weight = self._next_returns(batch, rewards)
        previous = self._previous_returns(batch).to(rewards)
        ratings = return_gain_ratings(next_returns, previous, self.config.reward, self.config.improvement_threshold)
        with torch.no_grad():
            gain = next_returns - previous
            self.log_metric("mean_return_gain", gain.mean())
            self.log_metric("frac_improved", gain.gt(0).float().mean())
            self.log_metric("frac_worse", gain.lt(0).float().mean())
            self.log_metric("mean_previous_return", previous.mean())
        return retroformer_rewards(rewards, next_returns, ratings, weight)

    def _next_returns(self, batch: GRPOBatch, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        """``(N,)`` ``G_{k+1}`` and the weight it carries in ``rewards``."""
        name = self.config.return_component
        names = list(batch.reward_names)
        components = batch.reward_components
        if not name:
            if components is not None and components.shape[1] > 1:
                raise ValueError(
                    f"the trainer has {components.shape[1]} reward functions {names}; set return_component to the one "
                    "that returns the next trial's return G_{k+1}"
                )
            return rewards, 1.0
        if components is None or name not in names:
            raise ValueError(
                f"return_component='{name}' is not one of the trainer's reward functions "
                f"({names or 'a single scalar reward'}); name the reward function that returns the next trial's return"
            )
        k = names.index(name)
        column = components[:, k].to(rewards)
        missing = torch.isnan(column)
        if bool(missing.any()):
            where = missing.nonzero().flatten()[:5].tolist()
            raise ValueError(
                f"return_component='{name}' gave no return (NaN/None) for completions {where}: the environment must "
                "return G_{k+1} for every reflection"
            )
        weights = batch.reward_weights if batch.reward_weights is not None else torch.ones(len(names))
        return column, weights[k].to(rewards)

    def _previous_returns(self, batch: GRPOBatch) -> torch.Tensor:
        """``(N,)`` ``G_k`` from the dataset rows, checked: present, finite, equal within each prompt."""
        column = self.config.previous_return_column
        if batch.rows is None:
            raise ValueError(
                f"Retroformer reads previous_return_column='{column}' from the dataset rows, but the batch has none"
            )
        missing = [row for row in batch.rows if column not in row]
        if missing:
            raise ValueError(
                f"previous_return_column='{column}' is not a column of the dataset (rows have {sorted(missing[0])}); "
                "each row must carry the return G_k of the failed trial its reflections are about"
            )
        try:
            values = torch.tensor([row[column] for row in batch.rows], dtype=torch.float64)
        except (TypeError, ValueError) as error:
            raise ValueError(f"previous_return_column='{column}' must hold one number per row: {error}") from error
        if values.dim() != 1 or not bool(torch.isfinite(values).all()):
            raise ValueError(f"previous_return_column='{column}' must hold one finite number per row")
        index, groups = batch.group_index, batch.num_groups
        if not bool((segment_min(values, index, groups) == segment_max(values, index, groups)).all()):
            raise ValueError(
                f"previous_return_column='{column}' differs between completions of one prompt: the reflections of a "
                "prompt must be about the same failed trial (give each trial its own prompt_id)"
            )
        return values.float()
