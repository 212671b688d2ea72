"""CoPG: Contrastive Policy Gradient (arXiv:2406.19185, Flet-Berliac et al., "Contrastive Policy
Gradient: Aligning LLMs on sequence-level scores in a supervised-friendly fashion").

CoPG replaces the clipped surrogate with a pairwise least-squares objective between the completions
of a prompt. With the sequence log-ratio to the reference policy and the regularised reward::

    a(y)      = sum_t (log pi(y_t) - log pi_ref(y_t))           (B,)   with gradient
    R_beta(y) = R(y) - beta a(y)
    l(y, y')  = (R_beta(y) - R_beta(y'))^2

the loss of a group of ``K`` completions is the mean over its ``P = K (K - 1) / 2`` pairs,
``L_g = 1/P sum_{i<j} (R_beta_i - R_beta_j)^2 = 2 / (K - 1) sum_i (R_beta_i - mean_g R_beta)^2``,
and the run's loss the mean over groups. Its gradient ``-2 beta (R_beta(y) - R_beta(y'))
(grad log pi(y) - grad log pi(y'))`` is a policy gradient whose baseline is the other sample's
regularised reward: no importance ratio, on- or off-policy. The optimum has ``a(y) - a(y') =
(R(y) - R(y')) / beta``, i.e. ``pi* ~ pi_ref exp(R / beta)``. The pairwise form over ``K > 2`` is
the paper's two-sample loss averaged over all pairs (the card's inferred group extension).

The objective is returned per row as ``2K / (K - 1) (R_beta_i - mean_g R_beta)^2`` with the
``group`` normaliser, whose mean over a group is ``L_g``; the policy surrogate is 0. A group of one
has no pair and adds 0.

Shapes: ``N`` completions, ``B`` rows of a loss micro-batch, ``T`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpo_plugins import POSITIVE, Example, GRPOBatch, LossInputs, LossTerm, Method, Needs, hookimpl, option
from grpo_plugins.ops import segment_count, segment_mean
from grpo_plugins.surrogates import REPLACED_POLICY_LOSS as REPLACED, replaced_policy_loss


def pairwise_losses(rewards: torch.Tensor, log_ratio: torch.Tensor, group: torch.Tensor, num_groups: int,
                    beta: float) -> torch.Tensor:
    """``(B,)`` per-row CoPG loss ``2K / (K - 1) (R_beta_i - mean_g R_beta)^2``, 0 in groups of one.

    Args:
        rewards: ``(B,)`` sequence rewards ``R``; log_ratio: ``(B,)`` ``a(y) = log pi(y) - log pi_ref(y)``
            (with gradient); group: ``(B,)`` ids in ``[0, G')``; beta: the regularisation strength.

    The mean over a group's rows is the mean over its pairs of ``(R_beta_i - R_beta_j)^2``.
    """
    regularised = rewards - beta * log_ratio
    centred = regularised - segment_mean(regularised, group, num_groups).index_select(0, group)
    size = segment_count(group, num_groups).index_select(0, group).to(rewards.dtype)
    scale = torch.where(size > 1, 2 * size / (size - 1).clamp(min=1), 0.0)
    return scale * centred.square()


@dataclass(frozen=True)
class CoPGConfig:
    """CoPG (https://arxiv.org/abs/2406.19185)."""

    beta: float = option(0.03, "beta, the KL regularisation strength (R_beta = R - beta log pi/pi_ref); the paper "
                         "sweeps it and reports 0.03 on summarisation.", paper=0.03, domain=POSITIVE)


class CoPG(Method):
    """CoPG: a pairwise least-squares objective on regularised rewards replaces the clipped surrogate."""

    name = "copg"
    Config = CoPGConfig
    paper = "https://arxiv.org/abs/2406.19185"
    plugin_api = ">=1.3,<2"  # Needs.excludes_hooks

    @classmethod
    def example(cls) -> Example:
        return Example(min_group_size=1)

    def needs(self) -> Needs:
        return Needs(loss_fields={"ref_log_probs", "group_index", "row_data"}, features={"whole_groups"},
                     excludes_hooks={"mask_tokens", "gate_loss", "adjust_advantages"},
                     why={"whole_groups": "its pairwise objective over each group's completions", **dict.fromkeys(
                         ("mask_tokens", "gate_loss", "adjust_advantages"), REPLACED)})

    @hookimpl
    def compute_advantages(self, batch: GRPOBatch) -> torch.Tensor:
        """Carries each completion's (shaped) reward to the loss (``row_data['copg_reward']``); the
        advantages are 0, unused: the pairwise objective replaces the estimator and the surrogate."""
        batch.row_data["copg_reward"] = batch.rewards.detach().clone()
        return torch.zeros_like(batch.rewards)

    @hookimpl
    def policy_surrogate(self, inputs: LossInputs) -> torch.Tensor:
        """0: the pairwise objective replaces the policy loss."""
        return replaced_policy_loss(inputs)

    @hookimpl
    def loss_objectives(self, inputs: LossInputs) -> dict[str, LossTerm]:
        if inputs.ref_log_probs is None:
            raise ValueError("copg: LossInputs.ref_log_probs is missing (the adapter computes reference log-probs "
                             "for methods that declare them)")
        group, count = inputs.local_groups(self.name)
        keep = inputs.mask > 0
        log_ratio = torch.where(keep, inputs.log_probs - inputs.ref_log_probs, 0.0).sum(-1)
        rewards = inputs.row_data["copg_reward"].to(log_ratio.dtype)
        losses = pairwise_losses(rewards, log_ratio, group, count, self.config.beta)
        self.log_metric("log_ratio_to_ref", log_ratio.detach().mean())
        return {"pairwise": LossTerm(losses, "group")}
