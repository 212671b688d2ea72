"""REC, OPMD and AsymRE: group-relative REINFORCE as an off-policy algorithm (arXiv:2509.24203,
"Group-Relative REINFORCE Is Secretly an Off-Policy Algorithm"; code: modelscope/Trinity-RFT,
policy loss ``rec``, advantage ``rec``).

One plugin, three members of the family, chosen by ``variant``:

- group baselines ``b_g`` (``K`` completions of a group, rewards ``r``)::

      rec     b = mean_g r                          A = r - b
      asymre  b = mean_g r + shift  (shift = -0.1)  A = r - mean + 0.1   (positives pushed harder)
      opmd    b = tau log mean_g exp(r / tau)       A = r - b

  optionally divided by the group's population std (``std_normalize``); a group of one has
  ``b = 0`` (the paper's code). ``drop="balance"`` zeroes, at random, the surplus negatives
  (``r < mean``) of a group with more negatives than positives and recomputes ``b`` on the rest.
- the REC token loss, ``rho = exp(log pi - log pi_old)`` read without gradient::

      loss_t = -A_w log pi_t keep_t + coef (log pi_t - log pi_old_t)^2   ('k2')
                                    - coef log pi_t                      ('forward-kl')
      keep:  none | two-side: 1-eps_l <= rho <= 1+eps_h
             one-side: (A >= 0 and rho <= 1+eps_h) or (A <= 0 and rho >= 1-eps_l)
             ring: two-side or (A >= 0 and rho <= 1-eps_l') or (A <= 0 and rho >= 1+eps_h')
      A_w:   A | A rho ('importance_sampling') | A exp(A / temp) ('advantage')

  and OPMD divides the loss by ``1 + tau``. The paper aggregates it as a token mean over the
  micro-batch (TRL ``loss_type='dapo'`` or ``'bnpo'``).

Shapes: ``N`` completions, ``G`` groups, ``B`` rows of a loss micro-batch, ``T`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from grpo_plugins import FINITE, NON_NEGATIVE, POSITIVE, Example, GRPOBatch, LossInputs, Method, Needs, Range, hookimpl, option
from grpo_plugins.ops import constant_groups, segment_count, segment_max, segment_min, segment_sum

Variant = Literal["rec", "asymre", "opmd"]


def balance_drop(rewards: torch.Tensor, index: torch.Tensor, num_groups: int, generator: torch.Generator) -> torch.Tensor:
    """``(N,)`` bool rows kept by the "balance" drop: in a group with more negatives (``r < mean``) than
    positives, ``#neg - #pos`` negatives chosen uniformly at random (``generator``) are dropped. A group
    whose rewards are all equal has no negatives (its float mean may round above the value)."""
    counts = segment_count(index, num_groups)
    mean = segment_sum(rewards, index, num_groups) / counts.clamp(min=1)
    constant = constant_groups(rewards, index, num_groups).index_select(0, index)
    negative = (rewards < mean.index_select(0, index)) & ~constant
    negatives = segment_sum(negative.long(), index, num_groups)
    surplus = (2 * negatives - counts).clamp(min=0)  # #neg - #pos
    # rank the negatives of each group in a random order: sort by (group, random key)
    key = torch.where(negative, index.double() + torch.rand(rewards.shape, generator=generator, dtype=torch.float64), float("inf"))
    position = torch.empty_like(index)
    position[torch.argsort(key)] = torch.arange(index.numel(), device=index.device)
    first = torch.cumsum(negatives, 0) - negatives  # position of each group's first negative
    rank = position - first.index_select(0, index)
    return ~(negative & (rank < surplus.index_select(0, index)))


def group_baseline_advantages(
    rewards: torch.Tensor,
    index: torch.Tensor,
    num_groups: int,
    variant: Variant = "rec",
    shift: float = -0.1,
    tau: float = 1.0,
    std_normalize: bool = False,
    epsilon: float = 1e-6,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(N,)`` advantages ``(r - b_g) / (std_g + epsilon)`` (the division only with ``std_normalize``).

    Args:
        rewards: ``(N,)``; index: ``(N,)`` group ids in ``[0, G)``.
        variant: the baseline (module docstring); ``shift``: AsymRE's delta; ``tau``: OPMD's temperature.
        keep: ``(N,)`` bool rows that count (the balance drop); dropped rows get 0.

    Statistics use the kept rows; a group with at most one kept row has ``b = 0`` and std 1. A group
    whose kept rewards are all equal gets exactly 0 (AsymRE: ``-shift``, never divided by its zero std).
    """
    keep = torch.ones_like(rewards, dtype=torch.bool) if keep is None else keep
    counts = segment_sum(keep.to(rewards.dtype), index, num_groups)
    kept = torch.where(keep, rewards, 0.0)
    mean = segment_sum(kept, index, num_groups) / counts.clamp(min=1)
    if variant == "opmd":  # tau log mean exp(r / tau), shifted by the group's max for stability
        top = segment_max(torch.where(keep, rewards, float("-inf")), index, num_groups).nan_to_num(neginf=0.0)
        scaled = torch.where(keep, torch.exp((rewards - top.index_select(0, index)) / tau), 0.0)
        baseline = top + tau * torch.log(segment_sum(scaled, index, num_groups).clamp(min=1e-30) / counts.clamp(min=1))
    else:
        baseline = mean + (shift if variant == "asymre" else 0.0)
    several = counts > 1
    baseline = torch.where(several, baseline, 0.0)
    advantages = rewards - baseline.index_select(0, index)
    if std_normalize:
        squared = segment_sum(torch.where(keep, (rewards - mean.index_select(0, index)) ** 2, 0.0), index, num_groups)
        std = torch.where(several, (squared / counts.clamp(min=1)).sqrt(), 1.0)
        advantages = advantages / (std.index_select(0, index) + epsilon)
    high = segment_max(torch.where(keep, rewards, float("-inf")), index, num_groups)
    same = (high <= segment_min(torch.where(keep, rewards, float("inf")), index, num_groups)) & several
    constant_value = -shift if variant == "asymre" else 0.0
    advantages = torch.where(same.index_select(0, index), torch.full_like(advantages, constant_value), advantages)
    return torch.where(keep, advantages, 0.0)


def rec_keep_mask(ratio: torch.Tensor, advantages: torch.Tensor, mode: str, eps_low: float, eps_high: float,
                  eps_low_prime: float, eps_high_prime: float) -> torch.Tensor:
    """``(B, T)`` bool: the tokens REC keeps under ``mode`` (module docstring), from the detached ratio."""
    inside = (ratio >= 1 - eps_low) & (ratio <= 1 + eps_high)
    if mode == "two-side":
        return inside
    if mode == "one-side":
        return ((advantages >= 0) & (ratio <= 1 + eps_high)) | ((advantages <= 0) & (ratio >= 1 - eps_low))
    if mode == "ring":
        return inside | ((advantages >= 0) & (ratio <= 1 - eps_low_prime)) | ((advantages <= 0) & (ratio >= 1 + eps_high_prime))
    return torch.ones_like(inside)


@dataclass(frozen=True)
class RECConfig:
    """REC / OPMD / AsymRE (https://arxiv.org/abs/2509.24203)."""

    variant: Variant = option("rec", "Baseline and loss: 'rec' (group mean), 'asymre' (mean + shift), 'opmd' "
                              "(tau log-mean-exp baseline, loss / (1 + tau)).", paper="rec")
    std_normalize: bool = option(False, "Divide the advantage by the group's population std + epsilon.", paper=False)
    epsilon: float = option(1e-6, "Added to the group std (std_normalize).", paper=1e-6, domain=POSITIVE)
    drop: Literal["none", "balance"] = option(
        "none", "'balance': drop, at random, the surplus negatives of groups with more negatives than positives.",
        paper="none")
    shift: float = option(-0.1, "AsymRE's baseline shift delta (b = mean + delta).", paper=-0.1, domain=FINITE)
    tau: float = option(1.0, "OPMD's temperature tau.", paper=1.0, domain=POSITIVE)
    clip_mode: Literal["none", "one-side", "two-side", "ring"] = option(
        "none", "Which tokens the loss keeps, by their ratio rho (module docstring).", paper="none")
    epsilon_low: float = option(0.2, "eps_l: lower edge 1 - eps_l.", paper=0.2, domain=Range(0.0, 1.0, low_open=True))
    epsilon_high: float = option(0.2, "eps_h: upper edge 1 + eps_h.", paper=0.2, domain=POSITIVE)
    epsilon_low_prime: float = option(0.6, "eps_l' of the ring.", paper=0.6, domain=Range(0.0, 1.0, low_open=True))
    epsilon_high_prime: float = option(2.0, "eps_h' of the ring.", paper=2.0, domain=POSITIVE)
    weight: Literal["none", "importance_sampling", "advantage"] = option(
        "none", "Weight of A: none, A rho, or A exp(A / temp).", paper="none")
    temp: float = option(1.0, "Temperature of the 'advantage' weight.", paper=1.0, domain=POSITIVE)
    regularizer: Literal["none", "k2", "forward-kl"] = option(
        "none", "'k2': + coef (log pi - log pi_old)^2; 'forward-kl': - coef log pi.", paper="none")
    regularizer_coef: float = option(0.0, "coef of the regulariser.", paper=0.0, domain=NON_NEGATIVE)

    def __post_init__(self):
        if self.clip_mode == "ring" and self.epsilon_low_prime < self.epsilon_low:
            raise ValueError("epsilon_low_prime must be >= epsilon_low (the ring lies outside the two-side band)")
        if self.clip_mode == "ring" and self.epsilon_high_prime < self.epsilon_high:
            raise ValueError("epsilon_high_prime must be >= epsilon_high (the ring lies outside the two-side band)")


class REC(Method):
    """REC / OPMD / AsymRE: group-relative REINFORCE with clipping masks, for stale (off-policy) data."""

    name = "rec"
    Config = RECConfig
    paper = "https://arxiv.org/abs/2509.24203"
    plugin_api = ">=1.1,<2"

    @classmethod
    def example(cls) -> Example:
        return Example(min_group_size=1, nonzero_constant_groups="a group of one completion has baseline 0 "
                       "(the paper's code), so its advantage is its reward")

    def needs(self) -> Needs:
        if self.config.drop == "balance":
            return Needs(features={"step_generator"}, why={"step_generator": "the balance drop's random choice"})
        return Needs()

    @hookimpl
    def compute_advantages(self, batch: GRPOBatch) -> torch.Tensor:
        cfg = self.config
        keep = None
        if cfg.drop == "balance":
            keep = balance_drop(batch.rewards, batch.group_index, batch.num_groups, self.step_generator(batch.step))
            self.log_metric("frac_dropped", (~keep).float().mean())
        return group_baseline_advantages(batch.rewards, batch.group_index, batch.num_groups, cfg.variant, cfg.shift,
                                         cfg.tau, cfg.std_normalize, cfg.epsilon, keep)

    @hookimpl
    def policy_surrogate(self, inputs: LossInputs) -> torch.Tensor:
        """``(B, T)`` REC loss (module docstring); aggregated with the trainer's loss aggregation."""
        cfg = self.config
        ratio = inputs.ratio.detach()
        advantages = inputs.advantages
        keep = rec_keep_mask(ratio, advantages, cfg.clip_mode, cfg.epsilon_low, cfg.epsilon_high,
                             cfg.epsilon_low_prime, cfg.epsilon_high_prime)
        if cfg.weight == "importance_sampling":
            advantages = advantages * ratio
        elif cfg.weight == "advantage":
            advantages = advantages * torch.exp(advantages / cfg.temp)
        loss = -advantages * inputs.log_probs * keep.to(inputs.log_probs.dtype)
        if cfg.regularizer == "k2":
            loss = loss + cfg.regularizer_coef * inputs.log_ratio.square()
        elif cfg.regularizer == "forward-kl":
            loss = loss - cfg.regularizer_coef * inputs.log_probs
        if cfg.variant == "opmd":
            loss = loss / (1 + cfg.tau)
        real = inputs.mask > 0
        self.log_metric("clip_frac", (~keep & real).sum() / real.sum().clamp(min=1))
        return loss
