"""Reg-GRPO: regressive GRPO (arXiv:2506.07464, "DeepVideo-R1: Video Reinforcement Fine-Tuning via
Difficulty-aware Regressive GRPO", Park et al., NeurIPS 2025).

Instead of the clipped surrogate, Reg-GRPO regresses a policy-derived, group-normalised score onto
the GRPO advantage (no clipping, no min, so no zero-gradient plateaus)::

    A_i    = (r_i - mean_g r) / (std_g r + eps)                     population std; target, no gradient
    z_i    = scale * mean_t (log pi(o_it) - log pi_old(o_it))        sequence log-ratio, with gradient
    Ahat_i = (z_i - mean_g z) / (std_g z + eps)                      population std, with gradient
    L      = mean_i (Ahat_i - A_i)^2

``compute_advantages`` gives ``A`` (a group whose rewards are all equal gets exactly 0); the loss
reads the advantages it receives, so a method that adjusts them changes the target. A group whose
targets are all 0 (equal rewards) has nothing to regress to and is skipped (``constant_groups``).
A row with no real token (a completion masked out whole, e.g. a truncated one) has no ``z``: it is left
out of the group's mean and std of ``z`` and its loss is 0.
The squared errors are returned per row with the ``sequence`` normaliser (the mean over the step's
completions); the policy surrogate is 0. The paper's difficulty-aware augmentation perturbs videos
and is not part of this plugin (see the README).

Note: fully on-policy, ``z`` is 0 for every completion at the first gradient step, so ``Ahat``'s
gradient is ``1 / eps`` times larger than once ``z`` spreads; gradient clipping bounds the step.

Shapes: ``N`` completions, ``G`` groups, ``B`` rows of a loss micro-batch, ``T`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from grpo_plugins import POSITIVE, Example, GRPOBatch, LossInputs, LossTerm, Method, Needs, hookimpl, option
from grpo_plugins.ops import constant_groups, masked_mean, segment_max, segment_mean, segment_std, segment_sum
from grpo_plugins.surrogates import replaced_policy_loss


def population_zscore(values: torch.Tensor, group: torch.Tensor, num_groups: int, eps: float,
                      valid: torch.Tensor) -> torch.Tensor:
    """``(N,)`` ``(v - mean_g v) / (std_g v + eps)`` with the population std over the ``valid`` ``(N,)``
    rows of each group, differentiable (a group without spread gets a zero std with a finite gradient).
    Rows that are not valid neither enter the statistics nor get a score (0)."""
    counts = segment_sum(valid.to(values.dtype), group, num_groups).clamp(min=1)
    mean = segment_sum(torch.where(valid, values, 0.0), group, num_groups) / counts
    centred = values - mean.index_select(0, group)
    variance = segment_sum(torch.where(valid, centred.square(), 0.0), group, num_groups) / counts
    std = variance.clamp(min=1e-30).sqrt()
    return torch.where(valid, centred / (std.index_select(0, group) + eps), 0.0)


def reg_grpo_losses(log_probs: torch.Tensor, old_log_probs: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor,
                    group: torch.Tensor, num_groups: int, scale: float, eps: float) -> torch.Tensor:
    """``(B,)`` squared errors ``(Ahat_i - A_i)^2`` (module docstring).

    Args:
        log_probs, old_log_probs, mask: ``(B, T)``; targets: ``(B,)`` advantages ``A``;
        group: ``(B,)`` ids in ``[0, G')``; scale: the factor of ``z``; eps: added to the std of ``z``.

    A row without any real token (e.g. a truncated completion masked out whole) has no ``z``: it is left
    out of its group's mean and std of ``z`` and its error is 0.
    """
    keep = mask > 0
    real = keep.any(dim=-1)
    z = scale * masked_mean(torch.where(keep, log_probs - old_log_probs, 0.0), mask, dim=-1)
    errors = (population_zscore(z, group, num_groups, eps, real) - targets).square()
    return torch.where(real, errors, 0.0)


@dataclass(frozen=True)
class RegGRPOConfig:
    """Reg-GRPO (https://arxiv.org/abs/2506.07464)."""

    eps: float = option(1e-4, "eps added to the group std of the rewards and of z.", paper=1e-4, domain=POSITIVE)
    scale: float = option(1.0, "beta, the factor of the sequence log-ratio z (inferred 1).", paper=1.0, domain=POSITIVE)
    constant_groups: Literal["skip", "regress"] = option(
        "skip", "Groups whose targets are all 0 (equal rewards): 'skip' (no loss) or 'regress' Ahat onto 0.",
        paper="skip")


class RegGRPO(Method):
    """Reg-GRPO: regress the group-normalised sequence log-ratio onto the GRPO advantage."""

    name = "reg_grpo"
    Config = RegGRPOConfig
    paper = "https://arxiv.org/abs/2506.07464"
    plugin_api = ">=1.3,<2"  # Needs.excludes_hooks

    @classmethod
    def example(cls) -> Example:
        return Example(min_group_size=1)

    def needs(self) -> Needs:
        return Needs(loss_fields={"group_index"}, features={"whole_groups"},
                     excludes_hooks={"mask_tokens", "gate_loss"},  # they scale the replaced policy loss
                     why={"whole_groups": "the group statistics of z in its loss",
                          **dict.fromkeys(("mask_tokens", "gate_loss"), "its regression replaces the policy loss "
                                          "that the other method's token weights or gates would scale")})

    @hookimpl
    def compute_advantages(self, batch: GRPOBatch) -> torch.Tensor:
        """``(N,)`` group z-scores of the rewards, population std; equal rewards give exactly 0."""
        rewards, index, groups = batch.rewards, batch.group_index, batch.num_groups
        centred = rewards - segment_mean(rewards, index, groups).index_select(0, index)
        std = segment_std(rewards, index, groups, unbiased=False).index_select(0, index)
        same = constant_groups(rewards, index, groups).index_select(0, index)
        return torch.where(same, 0.0, centred / (std + self.config.eps))

    @hookimpl
    def policy_surrogate(self, inputs: LossInputs) -> torch.Tensor:
        """0: the regression replaces the policy loss."""
        return replaced_policy_loss(inputs)

    @hookimpl
    def loss_objectives(self, inputs: LossInputs) -> dict[str, LossTerm]:
        cfg = self.config
        group, count = inputs.local_groups(self.name)
        targets = masked_mean(torch.where(inputs.mask > 0, inputs.advantages, 0.0), inputs.mask, dim=-1).detach()
        losses = reg_grpo_losses(inputs.log_probs, inputs.old_log_probs, inputs.mask, targets, group, count,
                                 cfg.scale, cfg.eps)
        if cfg.constant_groups == "skip":
            informative = segment_max(targets.abs(), group, count) > 0
            losses = torch.where(informative.index_select(0, group), losses, 0.0)
        return {"regression": LossTerm(losses, "sequence")}
