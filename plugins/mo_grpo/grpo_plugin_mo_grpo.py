"""MO-GRPO: multi-objective GRPO for safe and aligned generation (HydroX AI, arXiv:2503.21819).

A multi-label reward model scores every completion on K aspects (safety, helpfulness,
truthfulness, ...). The policy is trained with plain GRPO on one scalar reward, the weighted mix of
the aspect scores:

    s_{i,k}  <- clip(s_{i,k}, low, high)            (optional: each score to its label range)
    w~_k     = w_k / sum_j w_j                      (w_k >= 0; equal weights by default)
    r_i      = sum_k w~_k s_{i,k}
    A_i      = (r_i - mean_g r) / (std_g r + eps)   (plain GRPO, the built-in estimator)

Because the mix is linear, it equals TRL's own ``reward_weights`` sum with the normalised weights;
the method adds aspect selection by name, weight normalisation, clipping, checks and per-aspect
metrics, and hands its weights to a multi-reward estimator enabled beside it (``gdpo``), which then
normalises each aspect separately: the paper's "each aspect's advantage summed with weight w_k".

Shapes: ``N`` completions, ``K`` reward components (aspect scores), ``A`` aspects used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from grpo_plugins import FINITE, NON_NEGATIVE, GRPOBatch, Method, Needs, ParallelContext, hookimpl, option
from grpo_plugins.rewards import OtherRewards, other_rewards_sum


# ----------------------------------------------------------------- the paper's maths
def normalized_weights(weights: torch.Tensor) -> torch.Tensor:
    """``w / sum(w)`` -> ``(A,)``; ``weights`` ``(A,)`` are non-negative with a positive sum."""
    return weights / weights.sum()


def weighted_aspect_reward(scores: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``r_i = sum_k w_k s_{i,k}`` -> ``(N,)``; ``scores`` ``(N, A)`` finite, ``weights`` ``(A,)``.

    The same arithmetic as TRL's weighted sum of its reward functions (``reward_weights``).
    """
    return (scores * weights.to(scores).unsqueeze(0)).sum(dim=1)


def global_correlation(values: torch.Tensor, target: torch.Tensor, parallel: ParallelContext) -> torch.Tensor:
    """Pearson correlation of each column of ``values`` ``(N, A)`` with ``target`` ``(N,)`` -> ``(A,)``.

    Computed from global sums (correct across data-parallel ranks); a column or target without
    spread gives 0.
    """
    x = values.double()
    y = target.double().unsqueeze(1).expand_as(x)
    count = torch.full_like(x[0], x.shape[0])
    sums = parallel.all_reduce_sum(torch.stack([x.sum(0), y.sum(0), (x * x).sum(0), (y * y).sum(0), (x * y).sum(0), count]))
    sx, sy, sxx, syy, sxy, n = sums.unbind(0)
    n = n.clamp(min=1)
    cov = sxy / n - (sx / n) * (sy / n)
    var_x = (sxx / n - (sx / n) ** 2).clamp(min=0)
    var_y = (syy / n - (sy / n) ** 2).clamp(min=0)
    denom = (var_x * var_y).sqrt()
    return torch.where(denom > 1e-12, cov / denom.clamp(min=1e-12), torch.zeros_like(cov)).float()


# ----------------------------------------------------------------- the method
@dataclass(frozen=True)
class MOGRPOConfig:
    """MO-GRPO (arXiv:2503.21819): one GRPO reward from weighted aspect scores."""

    aspects: tuple[str, ...] = option(
        (), "Names of the reward components that are aspect scores; empty = every reward component."
    )
    weights: tuple[float, ...] = option(
        (), "Aspect weights w_k >= 0, in the order of `aspects` (or of the reward components); empty = equal "
        "weights (inferred).", domain=NON_NEGATIVE,
    )
    normalize_weights: bool = option(True, "Divide the weights by their sum (the paper's sum_k w_k = 1).")
    clip_range: tuple[float, ...] = option(
        (), "(low, high): clip every aspect score to its label range first; empty = no clipping (inferred).",
        domain=FINITE,
    )
    missing_score: Literal["error", "zero"] = option(
        "error", "An aspect score that is missing (None/NaN): 'error' refuses it, 'zero' counts it as 0 (TRL's nansum)."
    )
    share_weights: bool = option(
        True, "Write the aspect weights (and clipped scores) into the batch's reward_weights (reward_components), "
        "so that a multi-reward estimator enabled beside it (gdpo) weights the aspects the same way.",
    )
    other_rewards: OtherRewards = option(
        "error",
        "Reward components outside `aspects`: 'error' refuses them, 'add' adds them with the trainer's weights, "
        "'ignore' leaves them out.",
    )

    def __post_init__(self):
        if len(set(self.aspects)) != len(self.aspects) or "" in self.aspects:
            raise ValueError(f"aspects must be distinct non-empty names, got {list(self.aspects)}")
        if self.weights and self.aspects and len(self.weights) != len(self.aspects):
            raise ValueError(f"weights {list(self.weights)} must have one entry per aspect {list(self.aspects)}")
        if self.weights and sum(self.weights) <= 0:
            raise ValueError(f"weights {list(self.weights)} must have a positive sum")
        if self.clip_range and (len(self.clip_range) != 2 or not self.clip_range[0] < self.clip_range[1]):
            raise ValueError(f"clip_range must be (low, high) with low < high, got {list(self.clip_range)}")


class MOGRPO(Method):
    """MO-GRPO: plain GRPO on a weighted mix of aspect scores (safety, helpfulness, ...), normalised weights."""

    name = "mo_grpo"
    Config = MOGRPOConfig
    paper = "https://arxiv.org/abs/2503.21819"
    plugin_api = ">=1.3,<2"  # Needs.runs_first

    def needs(self) -> Needs:
        return Needs(runs_first={"shape_rewards"},
                     why={"shape_rewards": "it rebuilds the reward from reward_components, so an earlier shaping would be lost"})

    def _aspect_columns(self, batch: GRPOBatch) -> list[int]:
        """Indices of the aspect components; a clear error for a missing name or a weight-count mismatch."""
        c = self.config
        names = tuple(batch.reward_names) if batch.reward_components is not None else ()
        if not names:
            raise ValueError(
                "mo_grpo mixes aspect scores, but the trainer gives no reward components: give one reward function "
                "per aspect (TRL: reward_funcs; verl: reward_extra_info keys)"
            )
        aspects = c.aspects or names
        missing = [a for a in aspects if a not in names]
        if missing:
            raise ValueError(
                f"mo_grpo reads the aspect score(s) {missing} (config 'aspects'), but the trainer has reward components "
                f"{list(names)}. Add a reward function for each (TRL: a function with that __name__ in reward_funcs; "
                "verl: a reward_extra_info key), or correct 'aspects'"
            )
        if c.weights and len(c.weights) != len(aspects):
            raise ValueError(
                f"mo_grpo has {len(c.weights)} weights {list(c.weights)} for the {len(aspects)} reward components "
                f"{list(aspects)}; give one weight per component, or name the aspects in 'aspects'"
            )
        return [names.index(a) for a in aspects]

    @hookimpl
    def shape_rewards(self, batch: GRPOBatch) -> torch.Tensor:
        """``(N,)`` weighted aspect reward; replaces the trainer's sum (run it before other shaping methods)."""
        c = self.config
        columns = self._aspect_columns(batch)
        names = tuple(batch.reward_names)
        scores = batch.reward_components[:, columns].float()
        missing = torch.isnan(scores)
        if bool(missing.any()):
            if c.missing_score == "error":
                rows, cols = missing.nonzero().unbind(1)
                raise ValueError(
                    f"mo_grpo: aspect score(s) {sorted({names[columns[k]] for k in cols.tolist()})} are missing "
                    f"(None/NaN) for completions {sorted(set(rows.tolist()))[:5]}; fix the reward model or set "
                    "missing_score='zero'"
                )
            scores = torch.where(missing, torch.zeros_like(scores), scores)
        raw = torch.tensor(c.weights, dtype=torch.float32) if c.weights else torch.ones(len(columns))
        weights = normalized_weights(raw) if c.normalize_weights else raw
        if c.clip_range:
            scores = scores.clamp(min=c.clip_range[0], max=c.clip_range[1])
        reward = weighted_aspect_reward(scores, weights)
        trainer_weights = torch.ones(len(names)) if batch.reward_weights is None else batch.reward_weights.float().cpu()
        reward = reward + other_rewards_sum(batch, {names[k] for k in columns}, c.other_rewards, self.name)
        if c.share_weights:
            shared = trainer_weights.clone() if c.other_rewards == "add" else torch.zeros(len(names))
            shared[columns] = weights
            components = batch.reward_components.clone()
            components[:, columns] = scores.to(components)
            batch.reward_weights = shared.to(batch.reward_components.device)
            batch.reward_components = components
        for k, column in enumerate(columns):
            self.log_metric(f"mean_{names[column]}", scores[:, k].mean())
        return reward.to(batch.rewards.dtype)

    @hookimpl
    def observe(self, batch: GRPOBatch) -> None:
        """Log each aspect's correlation with the final advantages (``adv_corr_<aspect>``)."""
        if batch.advantages is None or batch.reward_components is None:
            return
        names = tuple(batch.reward_names)
        aspects = [a for a in (self.config.aspects or names) if a in names]
        advantages = batch.advantages
        if advantages.dim() == 2:  # per-token advantages: their mean over each completion's tokens
            mask = batch.token_mask > 0
            advantages = torch.where(mask, advantages, torch.zeros_like(advantages)).sum(1) / mask.sum(1).clamp(min=1)
        scores = torch.nan_to_num(batch.reward_components[:, [names.index(a) for a in aspects]].float())
        for aspect, value in zip(aspects, global_correlation(scores, advantages.float(), batch.parallel).tolist()):
            self.log_metric(f"adv_corr_{aspect}", value)
