"""OBLR-PO: Optimal Baseline and Learning-Rate Policy Optimization (Huang, Sheng, Zheng, 2025, arXiv:2511.23310).

1. **Optimal baseline** (``compute_advantages``). For the REINFORCE estimator ``g_i = (R_i - b) grad log pi(y_i)``
   the variance-minimising constant baseline of a group is the gradient-weighted mean reward

       b*_g = sum_{i in g} w_i R_i / sum_{i in g} w_i,        A_i = R_i - b*_{g(i)}      (no division by a std)

   with ``w_i`` a proxy of ``|grad log pi(y_i)|^2``: the completion length ``|y_i|`` (``weights='length'``, the
   proxy of OPO, arXiv:2505.23585), ``sum_t (1 - p_t)^2`` over the completion's tokens from the behaviour
   log-probs (``'token_surprise'``, the last-layer gradient norm of a softmax head up to the hidden-state
   norms), or 1 (``'uniform'``: the plain group mean). A group whose weights sum to 0 falls back to the plain
   mean; a group whose rewards are all equal (a group of one included) gets exactly 0.
2. **SNR-adaptive step size** (``scale_update``). From the step's ``M`` unit gradients ``u_j`` with mean
   ``g`` (``GRPOBatch.gradient_statistics``, one unit per micro-batch and rank)::

       noise = sum_j |u_j - g|^2 / (M - 1) = (sum_j |u_j|^2 - M |g|^2) / (M - 1)
       SNR   = |g|^2 / (noise / M)                       (the squared mean over the variance of the mean)
       SNR~  = m SNR~_prev + (1 - m) SNR                 (EMA, the first step takes SNR itself)
       eta_t = eta_max SNR~ / (1 + SNR~)                 (the factor SNR~ / (1 + SNR~) multiplies the learning rate)

   A step without noise (``noise = 0``), with a single unit (``M = 1``) or whose unit gradients are all zero
   (``0 / 0``) has no usable estimate: it is not scaled, and an all-zero step leaves the EMA alone.

Shapes: ``N`` completions, ``G`` groups, ``T`` tokens, ``M`` unit gradients of a step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from grpo_plugins import UNIT, Example, GRPOBatch, GradientStatistics, Method, Needs, Range, hookimpl, option
from grpo_plugins.ops import constant_groups, segment_sum

# --------------------------------------------------------------------------------------------- maths


def optimal_baseline_advantages(
    rewards: torch.Tensor, weights: torch.Tensor, index: torch.Tensor, num_groups: int
) -> torch.Tensor:
    """``(N,)`` advantages ``R_i - b*_g`` with ``b*_g = sum w R / sum w`` over the group (``(N,)`` inputs).

    A group whose weights sum to 0 uses the plain mean; a group whose rewards are all equal gets exactly 0.
    """
    weights = weights.to(rewards.dtype)
    weight_sum = segment_sum(weights, index, num_groups)
    weighted = segment_sum(weights * rewards, index, num_groups) / weight_sum.clamp(min=torch.finfo(rewards.dtype).tiny)
    counts = segment_sum(torch.ones_like(rewards), index, num_groups)
    plain = segment_sum(rewards, index, num_groups) / counts.clamp(min=1)
    baseline = torch.where(weight_sum > 0, weighted, plain)
    advantages = rewards - baseline.index_select(0, index)
    constant = constant_groups(rewards, index, num_groups).index_select(0, index)
    return advantages.masked_fill(constant, 0.0)


def gradient_weights(kind: str, mask: torch.Tensor, old_log_probs: torch.Tensor | None) -> torch.Tensor:
    """``(N,)`` proxies of ``|grad log pi(y_i)|^2``: ``'length'`` the real-token count, ``'token_surprise'``
    ``sum_t (1 - p_t)^2`` with ``p_t = exp(old_log_probs)`` (``(N, T)``), ``'uniform'`` ones."""
    real = mask > 0
    if kind == "length":
        return real.sum(-1).to(torch.float32)
    if kind == "uniform":
        return torch.ones(mask.shape[0], dtype=torch.float32, device=mask.device)
    surprise = (1 - torch.exp(torch.where(real, old_log_probs, 0.0))) ** 2
    return torch.where(real, surprise, 0.0).sum(-1).float()


def gradient_snr(statistics: GradientStatistics) -> torch.Tensor:
    """``()`` ``|g|^2 / (noise / M)`` with ``noise = (sum_j |u_j|^2 - M |g|^2) / (M - 1)`` (clamped at 0);
    ``inf`` when there is no noise, NaN (no estimate) when ``M < 2`` or when both ``|g|^2`` and the noise
    are 0 (all-zero gradients: ``0 / 0``)."""
    units = statistics.unit_sq_norms.double()
    m = units.numel()
    mean_sq = statistics.mean_sq_norm.double()
    if m < 2:
        return torch.tensor(float("nan"), dtype=torch.float64)
    noise = ((units.sum() - m * mean_sq) / (m - 1)).clamp(min=0)
    if not bool(noise > 0) and not bool(mean_sq > 0):
        return torch.tensor(float("nan"), dtype=torch.float64)
    return torch.where(noise > 0, mean_sq / (noise / m).clamp(min=torch.finfo(torch.float64).tiny),
                       torch.tensor(float("inf"), dtype=torch.float64))


def snr_step_factor(snr: torch.Tensor) -> torch.Tensor:
    """``()`` ``SNR / (1 + SNR)`` in ``[0, 1]`` (1 for an infinite SNR)."""
    return torch.where(torch.isinf(snr), torch.ones_like(snr), snr / (1 + snr))


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class OBLRPOConfig:
    """OBLR-PO (arXiv:2511.23310); no public code, the estimators are the method card's reconstruction."""

    weights: Literal["length", "token_surprise", "uniform"] = option(
        "length", "Proxy of each completion's squared score-function norm weighting the baseline: 'length' (OPO's "
        "|y|), 'token_surprise' (sum_t (1 - p_t)^2 from the behaviour log-probs), 'uniform' (the plain mean).",
        paper="gradient-weighted (proxy inferred)",
    )
    use_baseline: bool = option(True, "Provide compute_advantages (the optimal baseline); False keeps only the step size.")
    adaptive_step: bool = option(True, "Provide scale_update: the learning rate times SNR / (1 + SNR).", paper=True)
    snr_momentum: float = option(0.9, "EMA momentum m of the SNR (0: this step's SNR alone).", paper=0.9,
                                 domain=Range(0, 1, high_open=True))
    min_scale: float = option(0.0, "Lower bound of the step factor (0: none).", domain=UNIT)

    def __post_init__(self):
        if not self.use_baseline and not self.adaptive_step:
            raise ValueError("use_baseline and adaptive_step are both False, so oblr_po would change nothing; "
                             "enable at least one (or do not enable oblr_po)")


class OBLRPO(Method):
    """OBLR-PO: a gradient-weighted optimal baseline per group and an SNR-adaptive learning rate."""

    name = "oblr_po"
    Config = OBLRPOConfig
    paper = "https://arxiv.org/abs/2511.23310"
    plugin_api = ">=1.1,<2"

    @classmethod
    def example(cls) -> Example:
        return Example(min_group_size=1)

    def __init__(self, config: OBLRPOConfig | None = None):
        super().__init__(config)
        self.snr_ema: float | None = None

    def disabled_hooks(self) -> set[str]:
        off = set()
        if not self.config.use_baseline:
            off.add("compute_advantages")
        if not self.config.adaptive_step:
            off.add("scale_update")
        return off

    def requires(self) -> set[str]:
        needed = set()
        if self.config.use_baseline and self.config.weights == "token_surprise":
            needed.add("old_log_probs")
        if self.config.adaptive_step:
            needed.add("gradient_statistics")
        return needed

    def needs(self) -> Needs:
        if self.config.use_baseline and self.config.weights == "token_surprise":
            return Needs(why={"old_log_probs": "the token-surprise baseline weights"})
        return Needs()

    @hookimpl
    def compute_advantages(self, batch: GRPOBatch) -> torch.Tensor:
        weights = gradient_weights(self.config.weights, batch.token_mask, batch.old_log_probs)
        advantages = optimal_baseline_advantages(batch.rewards, weights.to(batch.rewards.device), batch.group_index,
                                                 batch.num_groups)
        self.log_metric("advantage_abs_mean", advantages.abs().mean())
        return advantages

    @hookimpl
    def scale_update(self, batch: GRPOBatch, step: int) -> torch.Tensor:
        statistics = batch.gradient_statistics
        if statistics is None:
            raise ValueError("oblr_po's adaptive step needs GRPOBatch.gradient_statistics, which the adapter did not set")
        snr = gradient_snr(statistics)
        if torch.isnan(snr):  # one unit gradient or all-zero gradients: no estimate, step and EMA left alone
            self.log_metric("snr", float("nan"))
            return torch.tensor(1.0)
        value = float(snr)
        momentum = self.config.snr_momentum
        if self.snr_ema is None or value == float("inf") or self.snr_ema == float("inf"):
            self.snr_ema = value
        else:
            self.snr_ema = momentum * self.snr_ema + (1 - momentum) * value
        factor = snr_step_factor(torch.tensor(self.snr_ema, dtype=torch.float64)).clamp(min=self.config.min_scale)
        self.log_metric("snr", min(value, 1e30))
        self.log_metric("step_factor", factor)
        return factor.float()

    def state_dict(self) -> dict:
        return {"snr_ema": self.snr_ema}

    def load_state_dict(self, state: dict) -> None:
        self.snr_ema = state.get("snr_ema")
