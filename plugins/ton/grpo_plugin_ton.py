"""TON: Think or Not? Selective reasoning via RL (Wang et al., 2025, arXiv:2505.16854).

TON trains a policy to decide *whether* to reason. Stage 1 (supervised, outside the GRPO trainer)
applies *thought dropout* to the cold-start data: with probability ``p`` (0.5 in the release) a
response's reasoning is replaced by an empty thought, ``<think>\\n\\n</think><answer>..</answer>``
(:func:`drop_thought`). Stage 2 is plain GRPO whose reward is accuracy plus a format reward that
accepts both a full thought and an empty one, so that skipping the reasoning is never punished by the
format and is reinforced wherever it is as accurate:

    status_i = skip      if the completion matches the format and its thought is blank
               thought   if it matches with a non-blank thought
               malformed otherwise
    f_i      = 1[status_i != malformed]                                 (think-or-not format reward)
    r'_i     = r_i - w c_i + w f_i                                      (shape_rewards)

``add`` mode (the default): ``c = 0`` and ``w = format_weight`` (1.0, the paper's ``acc + format``).
``replace`` mode: ``c`` is the trainer's own format reward component (its raw values, NaN read as 0)
and ``w`` its reward weight, so a format reward that demands a non-empty thought is swapped for the
think-or-not one at the same weight. ``none`` mode leaves the reward alone and only observes. The
advantage is then GRPO's, unchanged. Logged: ``skip_rate`` (the share of completions with a blank
thought, the paper's headline metric), ``format_rate``, the mean shaped reward and the mean reward of
skipping and thinking completions.

Shapes: ``N`` completions. Parsing the completions' text is a Python loop over strings (text cannot
be vectorised); the reward maths is tensor arithmetic.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

from grpo_plugins import NON_NEGATIVE, GRPOBatch, Method, hookimpl, option
from grpo_plugins import Example

#: The release's format (``src/r1-v/src/open_r1/grpo.py``), with the thought captured as ``think``.
DEFAULT_PATTERN = r"<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>"
MALFORMED, THOUGHT, SKIP = 0, 1, 2


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the last message of a chat completion (whose content may
    be a string or a list of ``{"type": "text", "text": ...}`` parts)."""
    if isinstance(completion, list):
        completion = completion[-1] if completion else ""
    if isinstance(completion, dict):
        completion = completion.get("content", "")
    if isinstance(completion, list):
        completion = "".join(str(part.get("text", "")) for part in completion if isinstance(part, dict))
    return str(completion)


def classify_completions(completions: Sequence[Any], pattern: str = DEFAULT_PATTERN) -> torch.Tensor:
    """Each completion's status -> ``(N,)`` int64: 0 malformed, 1 with a thought, 2 thought skipped.

    A completion is well formed when ``pattern`` (a regular expression with a ``think`` group) matches
    its whole text (``re.DOTALL``); its thought is skipped when that group holds only whitespace.
    """
    compiled = re.compile(pattern, re.DOTALL)
    codes = []
    for completion in completions:
        match = compiled.fullmatch(completion_text(completion))
        codes.append(MALFORMED if match is None else SKIP if not match.group("think").strip() else THOUGHT)
    return torch.tensor(codes, dtype=torch.long)


def think_or_not_format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """The think-or-not format reward as a reward function (TRL's ``reward_funcs`` signature): 1.0 for a
    completion in the default format, with or without a thought, else 0.0."""
    return classify_completions(completions).ne(MALFORMED).float().tolist()


def think_or_not_rewards(
    rewards: torch.Tensor,
    status: torch.Tensor,
    weight: float | torch.Tensor,
    replaced: torch.Tensor | None = None,
) -> torch.Tensor:
    """``r' = r - w c + w f`` with ``f = 1[status != malformed]`` -> ``(N,)``.

    Args:
        rewards: ``(N,)`` finite rewards.
        status: ``(N,)`` statuses from :func:`classify_completions`.
        weight: ``w``, the weight of the think-or-not format reward.
        replaced: ``(N,)`` the format reward ``c`` it replaces (NaN: did not apply, read as 0), or None
            to add the format reward on top.
    """
    formatted = status.ne(MALFORMED).to(rewards.dtype)
    weight = torch.as_tensor(weight, dtype=rewards.dtype, device=rewards.device)
    shaped = rewards + weight * formatted
    if replaced is not None:
        replaced = replaced.to(rewards.dtype)
        shaped = shaped - weight * torch.where(torch.isnan(replaced), torch.zeros_like(replaced), replaced)
    return shaped


def drop_thought(
    text: str, rng: random.Random, ratio: float = 0.5, pattern: str = DEFAULT_PATTERN, empty: str = "\n\n"
) -> str:
    """Stage-1 thought dropout for building the supervised cold-start data: with probability ``ratio``
    replace the thought of a well-formed response by ``empty`` (the release uses 0.5 and ``"\\n\\n"``).
    Responses that do not match ``pattern`` are returned unchanged."""
    match = re.fullmatch(pattern, text, re.DOTALL)
    if match is None or rng.random() >= ratio:
        return text
    start, end = match.span("think")
    return text[:start] + empty + text[end:]


@dataclass(frozen=True)
class TONConfig:
    """TON (arXiv:2505.16854): a format reward that accepts a skipped thought, and the skip rate."""

    pattern: str = option(
        DEFAULT_PATTERN,
        "Regular expression (matched against the whole completion, re.DOTALL) of a well-formed completion; "
        "its group 'think' holds the thought, which counts as skipped when blank. The default is the release's "
        "<think>..</think><answer>..</answer> format.",
    )
    format_reward: Literal["add", "replace", "none"] = option(
        "add",
        "'add': add format_weight x the think-or-not format reward to the reward (the paper's accuracy + format, "
        "when the trainer's reward is the accuracy). 'replace': swap the trainer's reward component "
        "format_component for the think-or-not format reward, at that component's weight. 'none': leave the "
        "reward unchanged and only log the skip rate (your format reward already accepts empty thoughts).",
    )
    format_weight: float = option(
        1.0, "Weight of the think-or-not format reward in 'add' mode (the paper sums accuracy and format); "
        "only 'add' reads it, other modes refuse a value other than 1.",
        domain=NON_NEGATIVE,
    )
    format_component: str = option(
        "", "In 'replace' mode: the name of the trainer's format reward (TRL: the reward function's name)."
    )

    def __post_init__(self) -> None:
        try:
            compiled = re.compile(self.pattern, re.DOTALL)
        except re.error as error:
            raise ValueError(f"pattern is not a valid regular expression: {error}") from error
        if "think" not in compiled.groupindex:
            raise ValueError(
                f"pattern must capture the thought in a group named 'think', e.g. (?P<think>.*?); got {self.pattern!r}"
            )
        if self.format_reward == "replace" and not self.format_component:
            raise ValueError("format_reward='replace' needs format_component: the name of the reward it replaces")
        if self.format_reward != "replace" and self.format_component:
            raise ValueError(f"format_component={self.format_component!r} is only read with format_reward='replace'")
        if self.format_reward != "add" and self.format_weight != 1.0:
            raise ValueError(
                f"format_weight={self.format_weight:g} is only read with format_reward='add' (got "
                f"format_reward={self.format_reward!r}"
                + (": 'replace' uses the weight the trainer gives format_component)" if self.format_reward == "replace"
                   else ": 'none' leaves the reward unchanged)")
            )


class TON(Method):
    """TON: think-or-not format reward (a skipped thought is well formed) and the logged skip rate."""

    name = "ton"
    Config = TONConfig
    paper = "https://arxiv.org/abs/2505.16854"

    @classmethod
    def example(cls) -> Example:
        """The conformance suite's example run (see grpo_plugins.example)."""
        return Example(
            completions=(
                "<think>add the units first</think> <answer>42</answer>",
                "<think>\n\n</think><answer>7</answer>",
                "<think>carry</think> <answer>13</answer>",
                "42",
            ),
        )

    def requires(self) -> set[str]:
        """The decoded completions, whose thoughts are read."""
        return {"completions"}

    @hookimpl
    def shape_rewards(self, batch: GRPOBatch, rewards: torch.Tensor) -> torch.Tensor:
        """``(N,)`` rewards with the think-or-not format reward added or swapped in (see the module docstring)."""
        if batch.completions is None:
            raise ValueError(
                "TON reads each completion's thought, but the batch carries no decoded completions; the adapter must "
                "fill GRPOBatch.completions (this method requires it)"
            )
        status = classify_completions(batch.completions, self.config.pattern).to(rewards.device)
        mode = self.config.format_reward
        if mode == "add":
            shaped = think_or_not_rewards(rewards, status, self.config.format_weight)
        elif mode == "replace":
            column, weight = self._format_column(batch)
            shaped = think_or_not_rewards(rewards, status, weight, replaced=column)
        else:
            shaped = rewards
        self._log(status, shaped)
        return shaped

    def _format_column(self, batch: GRPOBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N,)`` raw values and the weight of the reward component that 'replace' swaps out."""
        name = self.config.format_component
        if batch.reward_components is None or name not in batch.reward_names:
            have = list(batch.reward_names) if batch.reward_components is not None else "none (a single scalar reward)"
            raise ValueError(
                f"format_reward='replace' swaps out the reward component format_component={name!r}, but the trainer's "
                f"reward components are {have}; set format_component to your format reward's name"
            )
        k = batch.reward_names.index(name)
        weights = batch.reward_weights if batch.reward_weights is not None else torch.ones(len(batch.reward_names))
        return batch.reward_components[:, k], weights[k]

    def _log(self, status: torch.Tensor, shaped: torch.Tensor) -> None:
        with torch.no_grad():
            skip, thought = status.eq(SKIP), status.eq(THOUGHT)
            self.log_metric("skip_rate", skip.float().mean())
            self.log_metric("mean_reward", shaped.mean())
            self.log_metric("format_rate", status.ne(MALFORMED).float().mean())
            if bool(skip.any()):
                self.log_metric("mean_reward_skip", shaped[skip].mean())
            if bool(thought.any()):
                self.log_metric("mean_reward_thought", shaped[thought].mean())
