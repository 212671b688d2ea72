"""CurES: a gradient-analysis curriculum — which prompts to train on and how many rollouts each gets.

Zeng, Sun et al., 2025 (arXiv:2510.01037; the released code calls the method "EPIC"). Every prompt
``x`` keeps Beta-Binomial counts: ``a_x`` accepted completions (reward ``> threshold``) out of ``n_x``.

Sampling (``sample_prompts``), from the posterior-mean accuracy ``p_hat = (a + 1) / (n + 2)``::

    P(x) = softmax_x( sqrt(p_hat_x (1 - p_hat_x)) / tau_x )            (D,) over the dataset

with ``tau_x = tau`` (``temperature_mode="constant"``) or the released sampler's per-prompt
``tau_x = (a_x + 1) / 0.01`` (``"released_code"``, nearly uniform). A round draws ``P`` distinct
prompts; with ``pass_without_replacement`` prompts drawn earlier in the current pass over the dataset
are excluded until fewer than ``P`` remain (then a new pass starts), as in the released sampler.

Allocation (``allocate_rollouts``): the per-prompt gradient standard deviation with equal gradient
norms is ``sigma_x = sqrt(p_x q_x)`` (``p_x = a_x / n_x``, the empirical accuracy; ``q = 1 - p``), and

    n_x = largest-remainder rounding of  budget * sigma_x / sum_y sigma_y

(exact total; the released code rounds each share and lets the total drift). Prompts with fewer than
``probe_rollouts`` observed completions have no estimate yet and get ``probe_rollouts`` (the released
pipeline's ``N_min`` probe); prompts with ``p in {0, 1}`` have ``sigma = 0`` and get ``settled_rollouts``
(0 by default: they are dropped from the round, as the released trainer drops zero-size prompts);
the others get at least ``min_rollouts`` (2, so that GRPO sees a group it can normalise).

Shapes: ``D`` dataset prompts, ``P`` prompts in a round, ``N`` completions, ``G`` groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from grpo_plugins import FINITE, NON_NEGATIVE, POSITIVE, GRPOBatch, Method, PromptRound, Range, hookimpl, option
from grpo_plugins.budgets import apportion
from grpo_plugins.prompt_table import PromptTable, group_outcomes, unit_outcomes

RELEASED_TEMPERATURE_SCALE = 0.01  # the released sampler's tau_x = (a_x + 1) / 0.01

# --------------------------------------------------------------------------------------------- maths


def posterior_accuracy(accepted: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """``p_hat = (a + 1) / (n + 2)``, the mean of ``Beta(a + 1, n - a + 1)``; any shape."""
    return (accepted.double() + 1) / (seen.double() + 2)


def sampling_probabilities(
    accepted: torch.Tensor, seen: torch.Tensor, temperature: float = 0.1,
    temperature_mode: Literal["constant", "released_code"] = "constant",
) -> torch.Tensor:
    """``(D,)`` probabilities ``softmax(sqrt(p_hat (1 - p_hat)) / tau)`` from counts ``(D,)``.

    ``temperature_mode="released_code"`` uses ``tau_x = (a_x + 1) / 0.01`` per prompt instead of ``tau``.
    Deterministic given the counts.
    """
    p = posterior_accuracy(accepted, seen)
    score = torch.sqrt(p * (1 - p))
    if temperature_mode == "released_code":
        tau = (accepted.double() + 1) / RELEASED_TEMPERATURE_SCALE
    else:
        tau = torch.full_like(score, float(temperature))
    return torch.softmax(score / tau, dim=0)


def gradient_std(p: torch.Tensor) -> torch.Tensor:
    """``sigma = sqrt(p (1 - p))``: the per-prompt gradient std with equal gradient norms; any shape."""
    return torch.sqrt((p.double() * (1 - p.double())).clamp(min=0))


def cures_allocation(
    p: torch.Tensor, known: torch.Tensor, budget: int, probe_rollouts: int = 4, min_rollouts: int = 2,
    settled_rollouts: int = 0, max_rollouts: int | None = None,
) -> torch.Tensor:
    """``(P,)`` int64 rollouts summing exactly to ``budget``.

    ``p``: ``(P,)`` accuracy estimates; ``known``: ``(P,)`` bool, whether ``p`` is an estimate. Prompts
    without one get ``min(probe_rollouts, budget // P)``; prompts with ``p in {0, 1}`` (``sigma = 0``)
    get ``settled_rollouts`` (0: dropped); the others share the rest in proportion to
    ``sigma = sqrt(p (1 - p))``, with at least ``min_rollouts`` and at most ``max_rollouts`` each
    (largest remainder).

    The whole budget is spent (the hook's contract). When the prompts with ``0 < p < 1`` are all at
    ``max_rollouts``, what is left goes evenly to the other prompts of the round (the probed ones and
    settled ones with ``settled_rollouts > 0``) up to ``max_rollouts``; when every prompt of the round is
    at ``max_rollouts``, the cap yields and the rest goes beyond it (in proportion to ``sigma``, else
    evenly). A dropped prompt stays dropped, so no prompt is handed a single rollout it was never
    meant to have; only when no prompt is in the round at all is the budget split evenly over every
    prompt.

    Example (the card): ``p = [0.5, 0.25, 0]``, budget 16 -> ``sigma = [0.5, 0.433, 0]`` -> ``[9, 7, 0]``.
    """
    num = int(p.numel())
    probe = min(int(probe_rollouts), int(budget) // max(num, 1))
    sigma = torch.where(known, gradient_std(p), torch.zeros((), dtype=torch.float64))
    mixed = sigma > 0
    cap = float(budget if max_rollouts is None else max_rollouts)
    low = torch.where(known, torch.where(mixed, float(min_rollouts), float(settled_rollouts)), float(probe))
    high = torch.where(known, torch.where(mixed, cap, float(settled_rollouts)), float(probe))
    in_round = (low > 0) | mixed
    if float(high.sum()) < budget:  # the mixed prompts are full: the other prompts of the round, up to the cap
        high = torch.where(in_round, high.clamp(min=cap), high)  # (a probe above the cap keeps its probe)
    if float(high.sum()) < budget:  # every prompt of the round is at the cap: the cap yields
        low, high = torch.where(in_round, high, low), torch.where(in_round, float(budget), high)
    if float(high.sum()) < budget:  # no prompt in the round (every one settled and dropped): an even split
        high = torch.full_like(high, float(budget))
    return apportion(sigma, budget, low, high)


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class CurESConfig:
    """CurES (Zeng, Sun et al., 2025, arXiv:2510.01037); defaults of the released scripts where they exist."""

    use_sampler: bool = option(True, "Choose the prompts (sample_prompts); False leaves prompt choice to the trainer or another method.")
    use_allocation: bool = option(
        True, "Choose rollouts per prompt (allocate_rollouts); False leaves the even split or another method's allocation."
    )
    temperature: float = option(
        0.1, "tau of the sampling softmax over sqrt(p_hat (1 - p_hat)) (temperature_mode='constant').", domain=POSITIVE
    )
    temperature_mode: Literal["constant", "released_code"] = option(
        "constant",
        "'constant': one tau for every prompt (the paper's formula); 'released_code': tau_x = (a_x + 1) / 0.01 as in "
        "the released sampler, which makes the distribution almost uniform.",
    )
    pass_without_replacement: bool = option(
        True, "Exclude prompts drawn earlier in the current pass over the dataset (the released sampler's default)."
    )
    threshold: float = option(0.5, "A completion is accepted when its reward is above this.", domain=FINITE)
    probe_rollouts: int = option(
        4, "N_min: rollouts of a prompt without an estimate, and completions observed before its estimate is used "
        "(at least 2: one would be a group of one).", domain=Range(2, None),
    )
    min_rollouts: int = option(
        2, "Fewest rollouts of a prompt with 0 < p < 1: 0 or at least 2 (two give GRPO a non-zero advantage, one "
        "would be a group of one; the released code has no minimum).", paper=0, domain=NON_NEGATIVE,
    )
    settled_rollouts: int = option(
        0, "Rollouts of a prompt with p in {0, 1} (sigma = 0): 0 drops it from the round, as the released code does; "
        "otherwise at least 2 (one would be a group of one).", domain=NON_NEGATIVE,
    )
    max_rollouts: int | None = option(
        None, "Most rollouts of one prompt; None = no cap (released code). It yields only when every prompt of the "
        "round is at the cap and budget is left.", domain=Range(1, None)
    )
    allocation_estimate: Literal["empirical", "posterior"] = option(
        "empirical",
        "Accuracy used by the allocation: 'empirical' a / n (released code) or 'posterior' (a + 1) / (n + 2).",
    )

    def __post_init__(self):
        for name in ("min_rollouts", "settled_rollouts"):
            if getattr(self, name) == 1:
                raise ValueError(
                    f"{name} must be 0 or at least 2, got 1: a prompt with one rollout is a group of one, "
                    "whose advantage GRPO cannot normalise"
                )
        if self.max_rollouts is not None and self.max_rollouts < max(self.min_rollouts, self.settled_rollouts):
            raise ValueError(
                f"max_rollouts ({self.max_rollouts}) must be >= min_rollouts ({self.min_rollouts}) and settled_rollouts "
                f"({self.settled_rollouts})"
            )


# --------------------------------------------------------------------------------------------- method


class CurES(Method):
    """CurES: sample prompts by their accuracy's Bernoulli std, allocate rollouts in proportion to it."""

    name = "cures"
    Config = CurESConfig
    paper = "https://arxiv.org/abs/2510.01037"

    def __init__(self, config=None):
        super().__init__(config)
        self.table = PromptTable(accepted=(0.0, torch.float64, ()), seen=(0.0, torch.float64, ()))
        self.drawn = torch.zeros(0, dtype=torch.bool)  # (D,) prompts drawn in the current pass

    def disabled_hooks(self) -> set[str]:
        off = set()
        if not self.config.use_sampler:
            off.add("sample_prompts")
        if not self.config.use_allocation:
            off.add("allocate_rollouts")
        return off

    def counts(self, prompt_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, n)`` ``(P,)`` float64 accepted and observed completions of ``prompt_ids``."""
        return self.table.get("accepted", prompt_ids), self.table.get("seen", prompt_ids)

    def set_counts(self, prompt_ids: torch.Tensor, accepted: torch.Tensor, seen: torch.Tensor) -> None:
        """Overwrite the counts of the distinct ``prompt_ids`` (e.g. from an offline probe pass)."""
        self.table.set("accepted", prompt_ids, accepted)
        self.table.set("seen", prompt_ids, seen)

    @hookimpl
    def sample_prompts(self, round: PromptRound, generator: torch.Generator) -> torch.Tensor:
        """``(P,)`` distinct dataset indices drawn from :func:`sampling_probabilities`."""
        c, size, num = self.config, round.dataset_size, round.num_prompts
        accepted, seen = self.counts(torch.arange(size))
        probs = sampling_probabilities(accepted, seen, c.temperature, c.temperature_mode)
        if c.pass_without_replacement:
            if self.drawn.shape != (size,) or int((~self.drawn).sum()) < num:
                self.drawn = torch.zeros(size, dtype=torch.bool)  # a new pass over the dataset
            probs = torch.where(self.drawn, 0.0, probs)
        chosen = torch.multinomial(probs, num, replacement=num > int((probs > 0).sum()), generator=generator)
        if c.pass_without_replacement:
            self.drawn[chosen] = True
        p = posterior_accuracy(accepted[chosen], seen[chosen])
        self.log_metric("sampled_accuracy_std", torch.sqrt(p * (1 - p)).mean())
        return chosen

    @hookimpl
    def allocate_rollouts(self, round: PromptRound, prompt_ids: torch.Tensor) -> torch.Tensor:
        """``(P,)`` rollouts summing to ``round.budget``, in proportion to ``sqrt(p (1 - p))`` (:func:`cures_allocation`)."""
        c = self.config
        accepted, seen = self.counts(prompt_ids)
        known = seen >= c.probe_rollouts
        if c.allocation_estimate == "posterior":
            p = posterior_accuracy(accepted, seen)
        else:
            p = accepted / seen.clamp(min=1)
        counts = cures_allocation(
            p, known, round.budget, c.probe_rollouts, c.min_rollouts, c.settled_rollouts, c.max_rollouts
        )
        self.log_metric("dropped_prompts", (counts == 0).double().sum())
        self.log_metric("max_rollouts", counts.max())
        return counts.to(prompt_ids.device)

    @hookimpl
    def observe(self, batch: GRPOBatch) -> None:
        """``a += #(reward > threshold)``, ``n += #completions`` for every prompt of the batch."""
        ids, accepted, trials = group_outcomes(batch, unit_outcomes(batch.rewards, threshold=self.config.threshold))
        self.table.add("accepted", ids, accepted)
        self.table.add("seen", ids, trials)
        rate = accepted / trials
        self.log_metric("mixed_group_fraction", ((rate > 0) & (rate < 1)).double().mean())

    def state_dict(self) -> dict:
        return {"table": self.table.state_dict(), "drawn": self.drawn.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.table.load_state_dict(state["table"])
            self.drawn = state["drawn"].bool().clone()
