"""DisCO: Discriminative Constrained Optimization (arXiv:2505.12366; code: Optimization-AI/DisCO,
``compute_policy_loss_disco_logL`` in its verl fork, and verl's ``recipe/disco``).

With binary rewards the completions of a prompt split into positives ``O+`` (reward 1) and negatives
``O-`` (reward 0). DisCO scores each completion and maximises the gap between the two sets, with no
clipping and no group std::

    s(o)   = mean_t log pi(o_t)               ('logL', length-normalised)   or   mean_t pi/pi_old ('Lratio')
    J_q    = mean_{O+} s - tau log mean_{O-} exp(s / tau)     (DisCO; 'basic': mean_{O+} s - mean_{O-} s)
    J      = sum_q J_q / Q                    (Q: every prompt of the step; a prompt without a positive
                                               or without a negative adds 0)
    KL     = token mean of (log pi_old - log pi)   ('kl')   or k3 ('low_var_kl')
    loss   = -J + c KL,   c = beta max(KL - delta, 0), read without gradient

``c KL`` has the gradient of the squared hinge ``beta/2 [KL - delta]_+^2`` (the trust-region
constraint KL <= delta). The code writes ``tau log sum exp`` through ``S / sg(S)`` (same gradient,
value shifted); this module returns the mathematical value. ``-J_q`` is returned on every row of
prompt ``q`` with the ``group`` normaliser (the mean over the step's prompts); ``c KL`` per token with
the ``token`` normaliser, ``c`` from the micro-batch's token-mean KL. The policy surrogate is 0.

Shapes: ``B`` rows of a loss micro-batch, ``T`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from grpo_plugins import FINITE, NON_NEGATIVE, POSITIVE, Example, GRPOBatch, LossInputs, LossTerm, Method, Needs, hookimpl, option
from grpo_plugins.ops import masked_mean, segment_max, segment_sum
from grpo_plugins.surrogates import REPLACED_POLICY_LOSS as REPLACED, replaced_policy_loss


def disco_objective(scores: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, group: torch.Tensor,
                    num_groups: int, tau: float | None) -> torch.Tensor:
    """``(G',)`` per-group objective ``J_q``; 0 for a group without a positive or without a negative.

    Args:
        scores: ``(B,)`` scores ``s`` (with gradient); positive, negative: ``(B,)`` bool;
        group: ``(B,)`` ids in ``[0, G')``; tau: DisCO's temperature, or None for DisCO-b
            (``mean_{O+} s - mean_{O-} s``).
    """
    pos_count = segment_sum(positive.to(scores.dtype), group, num_groups)
    neg_count = segment_sum(negative.to(scores.dtype), group, num_groups)
    pos_mean = segment_sum(torch.where(positive, scores, 0.0), group, num_groups) / pos_count.clamp(min=1)
    if tau is None:
        neg_term = segment_sum(torch.where(negative, scores, 0.0), group, num_groups) / neg_count.clamp(min=1)
    else:  # tau log mean exp(s / tau) over negatives, shifted by their (detached) max
        scaled = torch.where(negative, scores / tau, float("-inf"))
        top = segment_max(scaled.detach(), group, num_groups).nan_to_num(neginf=0.0)
        exp = torch.where(negative, torch.exp(torch.where(negative, scaled, 0.0) - top.index_select(0, group)), 0.0)
        neg_term = tau * (top + torch.log(segment_sum(exp, group, num_groups).clamp(min=1e-30) / neg_count.clamp(min=1)))
    valid = (pos_count > 0) & (neg_count > 0)
    return torch.where(valid, pos_mean - neg_term, 0.0)


def kl_to_old(log_probs: torch.Tensor, old_log_probs: torch.Tensor, kind: str) -> torch.Tensor:
    """``(B, T)`` per-token KL estimate to the behaviour policy: ``log pi_old - log pi`` ('kl') or k3
    ``exp(log pi - log pi_old) - (log pi - log pi_old) - 1`` ('low_var_kl')."""
    log_ratio = log_probs - old_log_probs
    return -log_ratio if kind == "kl" else torch.exp(log_ratio) - log_ratio - 1


@dataclass(frozen=True)
class DisCOConfig:
    """DisCO (https://arxiv.org/abs/2505.12366)."""

    objective: Literal["disco", "basic"] = option(
        "disco", "'disco': log-mean-exp over negatives (DRO); 'basic': DisCO-b, the plain mean.", paper="disco")
    score: Literal["logL", "Lratio"] = option(
        "logL", "Score s(o): mean token log-prob ('logL') or mean token ratio pi/pi_old ('Lratio').", paper="logL")
    tau: float = option(10.0, "tau of the log-mean-exp (10 for logL, 1 recommended for Lratio).", paper=10.0,
                        domain=POSITIVE)
    delta: float = option(1e-4, "delta, the KL trust region.", paper=1e-4, domain=NON_NEGATIVE)
    beta: float = option(1e3, "beta, the weight of the squared-hinge constraint.", paper=1e3, domain=NON_NEGATIVE)
    kl: Literal["kl", "low_var_kl"] = option(
        "kl", "KL estimate to the old policy: 'kl' (log pi_old - log pi) or 'low_var_kl' (k3).", paper="kl")
    positive_threshold: float = option(0.5, "Rewards above it are positives, the others negatives (binary rewards: "
                                       "1 and 0, as in the code).", paper=0.5, domain=FINITE)


class DisCO(Method):
    """DisCO: a discriminative positive-vs-negative objective with a squared-hinge KL constraint."""

    name = "disco"
    Config = DisCOConfig
    paper = "https://arxiv.org/abs/2505.12366"
    plugin_api = ">=1.3,<2"  # Needs.excludes_hooks

    @classmethod
    def example(cls) -> Example:
        return Example(reward_names=("correct",), reward_values=(0.0, 1.0), min_group_size=1)

    def needs(self) -> Needs:
        return Needs(loss_fields={"group_index", "row_data"}, features={"whole_groups"},
                     excludes_hooks={"mask_tokens", "gate_loss", "adjust_advantages"},
                     why={"whole_groups": "its objective over each prompt's positives and negatives", **dict.fromkeys(
                         ("mask_tokens", "gate_loss", "adjust_advantages"), REPLACED)})

    @hookimpl
    def compute_advantages(self, batch: GRPOBatch) -> torch.Tensor:
        """Marks positives for the loss (``row_data['disco_positive']``); the advantages are 0, unused (the
        recipe's dummy advantage estimator)."""
        batch.row_data["disco_positive"] = batch.rewards > self.config.positive_threshold
        return torch.zeros_like(batch.rewards)

    @hookimpl
    def policy_surrogate(self, inputs: LossInputs) -> torch.Tensor:
        """0: the discriminative objective replaces the policy loss."""
        return replaced_policy_loss(inputs)

    @hookimpl
    def loss_objectives(self, inputs: LossInputs) -> dict[str, LossTerm]:
        cfg = self.config
        group, count = inputs.local_groups(self.name)
        mask = inputs.mask
        values = inputs.log_probs if cfg.score == "logL" else inputs.ratio
        scores = masked_mean(torch.where(mask > 0, values, 0.0), mask, dim=-1)
        positive = inputs.row_data["disco_positive"].bool()
        objective = disco_objective(scores, positive, ~positive, group, count, cfg.tau if cfg.objective == "disco" else None)
        kl = torch.where(mask > 0, kl_to_old(inputs.log_probs, inputs.old_log_probs, cfg.kl), 0.0)
        mean_kl = masked_mean(kl, mask).detach()
        coef = cfg.beta * (mean_kl - cfg.delta).clamp(min=0)
        self.log_metric("kl_old", mean_kl)
        self.log_metric("constraint_active", (mean_kl > cfg.delta).float())
        return {"objective": LossTerm(-objective.index_select(0, group), "group"),
                "constraint": LossTerm(coef * kl, "token")}
