"""DCPO: Distribution-Centric Policy Optimization (Li et al., 2026, arXiv:2601.12730; code 597358816/DCPO).

Entropy control written as an advantage-level regulariser evaluated under a temperature-scaled target
distribution, then a dual-clip PPO surrogate:

1. **Target temperature** from the batch's mean token entropy ``H`` (the behaviour policy's,
   ``GRPOBatch.old_entropies``, token mean over the global batch): ``tau = tau_high`` if ``H <= H0`` (heat the
   target when entropy is at or below the target ``H0``), else ``tau_low``.
2. **Second ratio** (no gradient) ``rho_{i,t} = pi_old^tau(o_{i,t}) / pi_old(o_{i,t})`` from the behaviour
   log-probs at ``tau`` and at 1 (``GRPOBatch.old_log_probs_at``, one extra forward of the old policy).
3. **Mixing** (``adjust_advantages``): correctness ``c_i = 1[r_i > threshold]``, ``p = mean_i c_i`` over the batch,
   ``alpha = min(|H0 - H|, cap) / p``, ``alpha' = alpha / (1 + alpha)`` (0 when ``p = 0``), and the per-token
   advantage ``A'_{i,t} = (1 - alpha') A_i + alpha' c_i rho_{i,t}``: REINFORCE on correct samples under the
   target distribution.
4. **Dual-clip surrogate** (``policy_surrogate``): ``l = max(-A' r, -A' clip(r, 1 - eps_low, 1 + eps_high))`` and,
   where ``A' < 0``, ``min(l, -c A')`` (``c = dual_clip``), ``r = pi_theta / pi_old``.

Shapes: ``N`` completions, ``T`` tokens, ``B`` rows of a loss micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpo_plugins import NON_NEGATIVE, POSITIVE, Example, GRPOBatch, LossInputs, Method, Needs, Range, hookimpl, option
from grpo_plugins.ops import global_masked_mean
from grpo_plugins.surrogates import dual_clip_loss

BEHAVIOUR_TEMPERATURE = 1.0

# --------------------------------------------------------------------------------------------- maths


def target_temperature(entropy: float, entropy_target: float, tau_low: float, tau_high: float) -> float:
    """``tau_high`` when ``entropy <= entropy_target``, else ``tau_low``."""
    return tau_high if entropy <= entropy_target else tau_low


def mixing_weight(entropy: float, entropy_target: float, cap: float, correct_fraction: float) -> float:
    """``alpha' = alpha / (1 + alpha)`` with ``alpha = min(|H0 - H|, cap) / p``; 0 when ``p = 0``."""
    if correct_fraction <= 0:
        return 0.0
    alpha = min(abs(entropy_target - entropy), cap) / correct_fraction
    return alpha / (1.0 + alpha)


def dcpo_advantages(
    advantages: torch.Tensor, correct: torch.Tensor, rho: torch.Tensor, mask: torch.Tensor, weight: float
) -> torch.Tensor:
    """``(N, T)`` ``(1 - alpha') A + alpha' c rho`` on real tokens (0 on padding).

    ``advantages``: ``(N,)`` or ``(N, T)``; ``correct``: ``(N,)`` bool; ``rho``: ``(N, T)``; ``mask``: ``(N, T)``.
    """
    base = advantages if advantages.dim() == 2 else advantages.unsqueeze(1)
    mixed = (1 - weight) * base + weight * correct.to(rho.dtype).unsqueeze(1) * rho
    return torch.where(mask > 0, mixed, torch.zeros((), dtype=mixed.dtype, device=mixed.device))


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DCPOConfig:
    """DCPO (arXiv:2601.12730); defaults of the released script."""

    entropy_target: float = option(0.5, "Target token entropy H0 (nats).", paper=0.5, domain=NON_NEGATIVE)
    temperature_high: float = option(1.2, "Target temperature when the entropy is at or below H0.", paper=1.2,
                                     domain=POSITIVE)
    temperature_low: float = option(0.8, "Target temperature when the entropy is above H0.", paper=0.8,
                                    domain=POSITIVE)
    cap: float = option(0.1, "Cap on |H0 - H| in the mixing weight.", paper=0.1, domain=NON_NEGATIVE)
    correct_threshold: float = option(0.05, "A completion is correct when its reward exceeds this.", paper=0.05,
                                      domain=Range(None, None))
    dual_clip: float = option(3.0, "Dual-clip constant c (negative advantages: the loss is at most -c A).",
                              paper=3.0, domain=Range(1, None, low_open=True))
    use_surrogate: bool = option(True, "Provide the dual-clip policy_surrogate; False keeps the trainer's own loss.")

    def __post_init__(self):
        if self.temperature_low == BEHAVIOUR_TEMPERATURE or self.temperature_high == BEHAVIOUR_TEMPERATURE:
            raise ValueError("temperature_low and temperature_high must differ from 1 (rho would be 1)")


class DCPO(Method):
    """DCPO: a REINFORCE regulariser on correct samples under a temperature-scaled target, with dual clipping."""

    name = "dcpo"
    Config = DCPOConfig
    paper = "https://arxiv.org/abs/2601.12730"
    plugin_api = ">=1.1,<2"

    @classmethod
    def example(cls) -> Example:
        return Example(temperatures=(0.8, BEHAVIOUR_TEMPERATURE, 1.2),
                       nonzero_constant_groups="the regulariser alpha' c rho rewards correct completions even in a group "
                                               "whose rewards are all equal (the paper's REINFORCE term)")

    def disabled_hooks(self) -> set[str]:
        return set() if self.config.use_surrogate else {"policy_surrogate"}

    def needs(self) -> Needs:
        temperatures = {self.config.temperature_low, self.config.temperature_high, BEHAVIOUR_TEMPERATURE}
        return Needs(batch_fields={"old_entropies", "old_log_probs_at"}, temperatures=temperatures,
                     why={"old_entropies": "the batch's mean entropy H",
                          "old_log_probs_at": "the second ratio pi_old^tau / pi_old"})

    @hookimpl
    def adjust_advantages(self, batch: GRPOBatch, advantages: torch.Tensor) -> torch.Tensor:
        cfg, mask = self.config, batch.token_mask
        entropy = float(global_masked_mean(torch.where(mask > 0, batch.old_entropies, 0.0), mask, batch.parallel))
        tau = target_temperature(entropy, cfg.entropy_target, cfg.temperature_low, cfg.temperature_high)
        correct = batch.rewards > cfg.correct_threshold
        count = batch.parallel.all_reduce_sum(torch.stack([correct.sum().double(), correct.new_tensor(correct.numel(), dtype=torch.float64)]))
        fraction = float(count[0] / count[1].clamp(min=1))
        weight = mixing_weight(entropy, cfg.entropy_target, cfg.cap, fraction)
        at = batch.old_log_probs_at
        log_rho = torch.where(mask > 0, at[tau] - at[BEHAVIOUR_TEMPERATURE], 0.0)
        self.log_metric("entropy", entropy)
        self.log_metric("target_temperature", tau)
        self.log_metric("mixing_weight", weight)
        return dcpo_advantages(advantages, correct, torch.exp(log_rho), mask, weight)

    @hookimpl
    def policy_surrogate(self, inputs: LossInputs) -> torch.Tensor:
        return dual_clip_loss(inputs.ratio, inputs.advantages, inputs.clip_low, inputs.clip_high, self.config.dual_clip)
