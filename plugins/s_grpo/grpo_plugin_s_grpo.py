"""S-GRPO: suggestion-aware GRPO for pre-operative GUI critics (GUI-Critic-R1, Wanyan et al., arXiv:2506.04614).

A GUI critic reads the screen state and an action an agent proposes, and outputs its reasoning, a
score ``l^`` in ``[0, 1]`` (is the action correct?) and, for a wrong action, a suggestion of the right
one. S-GRPO trains it with plain GRPO on three rule-based rewards:

    R_format = 1 if the output parses into the required tagged sections, else 0
    R_acc    = 1 if 1[l^ >= 0.5] equals the gold label l_gt, else 0
    R_sugg   = 1 if l_gt = 0 (the action is wrong) and the suggestion matches the gold correction, else 0
    R        = w_f R_format + w_a R_acc + w_s R_sugg          (maximum 3 for a wrong action, 2 for a right one,
                                                              with the weights of 1 the paper implies)
    A_i      = (R_i - mean_g R) / (std_g R + eps)             (plain GRPO)

The three rewards are reward components the user provides (the suggestion matcher, rule or LLM, is
the user's ``suggestion`` function); the gold label, read from a dataset column, limits the
suggestion reward to wrong actions. The weighted sum equals TRL's ``reward_weights`` sum of the
three functions once the suggestion reward is 0 for right actions; the weights are the trainer's unless
set in the config. Shapes: ``N`` completions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpo_plugins import NON_NEGATIVE, GRPOBatch, Method, hookimpl, option
from grpo_plugins import Example, Needs
from grpo_plugins.rewards import OtherRewards, named_component


# ----------------------------------------------------------------- the paper's maths
def suggestion_aware_reward(
    format_reward: torch.Tensor, accuracy_reward: torch.Tensor, suggestion_reward: torch.Tensor,
    action_is_correct: torch.Tensor | None = None, weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """``R = w_f R_format + w_a R_acc + w_s R_sugg 1[l_gt = 0]`` -> ``(N,)``, and the gated ``R_sugg`` ``(N,)``.

    Args:
        format_reward, accuracy_reward: ``(N,)`` finite rewards.
        suggestion_reward: ``(N,)``; NaN (the matcher did not apply) counts as 0.
        action_is_correct: ``(N,)`` bool gold labels ``l_gt``; None trusts the suggestion reward as given.
        weights: ``(w_f, w_a, w_s)``.
    """
    suggestion = torch.where(torch.isnan(suggestion_reward), torch.zeros_like(suggestion_reward), suggestion_reward)
    if action_is_correct is not None:
        suggestion = torch.where(action_is_correct, torch.zeros_like(suggestion), suggestion)
    w_f, w_a, w_s = weights
    return w_f * format_reward + w_a * accuracy_reward + w_s * suggestion, suggestion


# ----------------------------------------------------------------- reading the inputs

def gold_labels(batch: GRPOBatch, column: str, method: str) -> torch.Tensor:
    """``(N,)`` bool ``l_gt`` (True: the proposed action is correct) from the dataset column ``column``."""
    if batch.rows is None:
        raise ValueError(f"{method} reads the gold label column '{column}' (config 'label_column'), but the batch "
                         "carries no dataset rows; set label_column='' to trust the suggestion reward as given")
    try:
        values = [row[column] for row in batch.rows]  # one value per row: data extraction
    except KeyError:
        raise ValueError(
            f"{method} reads the gold label column '{column}' (config 'label_column'; 1 = the proposed action is "
            f"correct, 0 = wrong), but the dataset rows have columns {sorted(batch.rows[0])}; add it, name yours in "
            "label_column, or set label_column='' when the suggestion reward is already 0 for correct actions"
        ) from None
    offending = list(dict.fromkeys(repr(value) for value in values if not _is_binary(value)))
    if offending:
        raise ValueError(
            f"{method}: the gold labels in '{column}' (config 'label_column') must be 0 or 1 (1 = the proposed "
            f"action is correct), got {', '.join(offending[:5])}"
        )
    return torch.tensor([float(value) == 1 for value in values], device=batch.prompt_ids.device)


def _is_binary(value) -> bool:
    """Whether a label reads as the number 0 or 1 (None, text and other numbers do not)."""
    try:
        return float(value) in (0.0, 1.0)
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------- the method
@dataclass(frozen=True)
class SGRPOConfig:
    """S-GRPO (GUI-Critic-R1, arXiv:2506.04614): format + critic accuracy + suggestion rewards."""

    format_reward: str = option("format", "Reward component: 1 where the output parses into the required sections.")
    accuracy_reward: str = option("accuracy", "Reward component: 1 where 1[score >= 0.5] equals the gold label.")
    suggestion_reward: str = option(
        "suggestion", "Reward component: 1 where the suggestion matches the gold correction (None/NaN = not applicable)."
    )
    format_weight: float | None = option(
        None, "w_f (inferred 1); None takes the trainer's weight of format_reward (1 without one). A set value needs "
        "the trainer's weight of that reward to be 1 or the same value.", paper=1.0, domain=NON_NEGATIVE,
    )
    accuracy_weight: float | None = option(
        None, "w_a (inferred 1); None takes the trainer's weight of accuracy_reward, as format_weight.",
        paper=1.0, domain=NON_NEGATIVE,
    )
    suggestion_weight: float | None = option(
        None, "w_s (inferred 1); None takes the trainer's weight of suggestion_reward, as format_weight.",
        paper=1.0, domain=NON_NEGATIVE,
    )
    label_column: str = option(
        "label", "Dataset column with the gold label l_gt (1 = the proposed action is correct); the suggestion reward "
        "counts only where it is 0. '' trusts the suggestion reward as given.",
    )
    share_weights: bool = option(
        True, "Write the three weights (and the gated suggestion reward) into the batch's reward_weights "
        "(reward_components), so that a multi-reward estimator enabled beside it (gdpo) uses them.",
    )
    other_rewards: OtherRewards = option(
        "error",
        "Reward components S-GRPO does not read: 'error' refuses them, 'add' adds them with the trainer's weights, "
        "'ignore' leaves them out.",
    )

    def __post_init__(self):
        names = [self.format_reward, self.accuracy_reward, self.suggestion_reward]
        if "" in names or len(set(names)) != 3:
            raise ValueError(f"format_reward, accuracy_reward and suggestion_reward must be three distinct names, got {names}")


class SGRPO(Method):
    """S-GRPO: GRPO for a GUI critic on format + accuracy + a suggestion reward for wrong actions."""

    name = "s_grpo"
    Config = SGRPOConfig
    paper = "https://arxiv.org/abs/2506.04614"
    plugin_api = ">=1.3,<2"  # Needs.runs_first

    @classmethod
    def example(cls) -> Example:
        """The conformance suite's example run (see grpo_plugins.example)."""
        return Example(
            reward_names=("format", "accuracy", "suggestion"),
            columns={"label": lambda row: row % 2},
        )

    def needs(self) -> Needs:
        """The dataset columns this config reads; s_grpo runs first among the reward shapers."""
        return Needs(columns={self.config.label_column} - {""}, runs_first={"shape_rewards"},
                     why={"shape_rewards": "it rebuilds the reward from reward_components, so an earlier shaping would be lost"})

    def requires(self) -> set[str]:
        return {"rows"} if self.config.label_column else set()

    def weights(self, trainer_weights: list[float], rewards: list[str]) -> tuple[float, float, float]:
        """``(w_f, w_a, w_s)``: each option's value, or the trainer's weight of that reward where it is None.

        ``trainer_weights``: the trainer's weights of the format, accuracy and suggestion rewards (named
        ``rewards``). A weight set in the config while the trainer weighs the same reward by something other
        than 1 or that value is refused: the two settings disagree and neither silently wins.
        """
        options = ("format_weight", "accuracy_weight", "suggestion_weight")
        chosen = []
        for option_name, reward_name, trainer in zip(options, rewards, trainer_weights):  # three rewards
            value = getattr(self.config, option_name)
            if value is not None and trainer not in (1.0, value):
                raise ValueError(
                    f"{self.name}: {option_name}={value:g}, but the trainer weighs the reward '{reward_name}' by "
                    f"{trainer:g}; set the weight in one place: leave {option_name} unset (None) to use the "
                    "trainer's, or set the trainer's weight of that reward to 1"
                )
            chosen.append(trainer if value is None else value)
        return tuple(chosen)

    @hookimpl
    def shape_rewards(self, batch: GRPOBatch) -> torch.Tensor:
        """``(N,)`` suggestion-aware reward; replaces the trainer's sum of the three components."""
        c = self.config
        fmt = named_component(batch, c.format_reward, self.name, "format_reward")
        acc = named_component(batch, c.accuracy_reward, self.name, "accuracy_reward")
        sugg = named_component(batch, c.suggestion_reward, self.name, "suggestion_reward", allow_nan=True)
        correct = gold_labels(batch, c.label_column, self.name) if c.label_column else None
        names = tuple(batch.reward_names)
        used = [names.index(n) for n in (c.format_reward, c.accuracy_reward, c.suggestion_reward)]
        others = [k for k in range(len(names)) if k not in used]
        trainer_weights = torch.ones(len(names)) if batch.reward_weights is None else batch.reward_weights.float().cpu()
        weights = self.weights(trainer_weights[used].tolist(), [names[k] for k in used])
        reward, gated = suggestion_aware_reward(fmt, acc, sugg, correct, weights)
        if others and c.other_rewards == "error":
            raise ValueError(
                f"s_grpo builds the reward from {[names[k] for k in used]}, but the trainer also has reward(s) "
                f"{[names[k] for k in others]}; set other_rewards='add' to add them with the trainer's weights, or "
                "'ignore' to leave them out"
            )
        if others and c.other_rewards == "add":
            extra = batch.reward_components[:, others].float()
            reward = reward + (extra * trainer_weights[others].to(extra)).nansum(dim=1)
        if c.share_weights:
            shared = trainer_weights.clone() if c.other_rewards == "add" else torch.zeros(len(names))
            shared[used] = torch.tensor(weights)
            components = batch.reward_components.clone()
            components[:, used[2]] = gated.to(components)
            batch.reward_weights = shared.to(components.device)
            batch.reward_components = components
        self.log_metric("format_rate", fmt.mean())
        self.log_metric("critic_accuracy", acc.mean())
        wrong = ~correct if correct is not None else ~torch.isnan(sugg)
        if bool(wrong.any()):
            self.log_metric("suggestion_accuracy", gated[wrong].mean())
        return reward.to(batch.rewards.dtype)
