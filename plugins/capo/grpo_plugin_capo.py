"""CAPO: Curvature-Aware Policy Optimization (Melo, Abate and Gal, 2025, arXiv:2510.00819, "Stabilizing
Policy Gradients for Sample-Efficient Reinforcement Learning in LLM Reasoning"; no public code).

Before the optimiser step, predict with a last-layer model (the LM head only) how far the update the
optimiser is about to take moves the policy at each token, and mask the tokens whose predicted move
breaks a trust region (``mask_tokens``, 0/1 weights). For a token with final hidden state ``h``
``(d,)``, old probabilities ``p = softmax(W h / tau)`` ``(V,)``, sampled token ``y`` and advantage ``A``:

1. **The update being previewed.** The LM-head gradient of the policy loss on the unmasked batch, at
   the old policy (ratio 1, so the clip is inactive), in closed form:
   ``grad_W = sum_{i,t} c_{i,t} (e_y - p) h^T / tau`` with ``c = -A m / Z`` (``m`` the completion mask,
   ``Z`` the loss's normaliser: the batch's token count for ``token_mean``, ``|o_i| N`` for
   ``sequence_mean``); then the optimiser's step for it, ``dW = UpdatePreview.step_for(grad_W)`` (AdamW
   with its moments, bias correction, weight decay and the coming learning rate).
2. **Per token**, the logit change ``dz = dW h / tau`` ``(V,)`` and
   - Fisher quadratic ``q = sum_v p_v dz_v^2 - (sum_v p_v dz_v)^2`` (the variance of ``dz`` under ``p``),
     predicted ``KL(pi_old || pi_new) ~ q / 2``;
   - directional curvature of ``A log pi(y)`` along the step ``c = -A q`` (the Hessian of ``log pi`` in
     ``z`` is ``-(diag p - p p^T)`` for every ``y``): positive (unstable) for negative advantages;
   - first-order gain ``g = A (dz_y - sum_v p_v dz_v)``; predicted objective change ``g + c / 2``.
3. **Mask**: a token is kept when ``q / 2 <= kl_threshold`` and ``c <= curvature_threshold``
   (``granularity='token'``); with ``granularity='sequence'`` the sums over a completion's tokens are
   compared and the whole completion is kept or dropped.

Everything comes from the old-policy probe (``batch.probes['capo']``: hidden states of one chunk and one
block of logits at a time) and the update preview (``batch.update_preview``): two streamed passes of
the probe, the first summing the head's gradient ``(V, d)``, the second computing ``q`` and ``g``.

Shapes: ``N`` completions, ``T`` tokens, ``V`` vocabulary, ``d`` hidden size, ``n`` rows of a chunk,
``L`` positions of a logits block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from grpo_plugins import FINITE, NON_NEGATIVE, Example, GRPOBatch, Method, Needs, Range, hookimpl, option
from grpo_plugins.probe import ProbeChunk, ProbeRequest, UpdatePreview

PROBE = "capo"

# --------------------------------------------------------------------------------------------- maths


def loss_coefficients(advantages: torch.Tensor, mask: torch.Tensor, aggregation: str, tokens: torch.Tensor,
                      sequences: torch.Tensor) -> torch.Tensor:
    """``(N, T)`` ``c = -A m / Z``: the loss ``sum c log pi(y)`` has the policy loss's gradient at ratio 1.

    ``advantages``: ``(N,)`` or ``(N, T)``; ``mask``: ``(N, T)``; ``tokens``, ``sequences``: the global token
    and completion counts. ``token_mean``: ``Z = tokens``; ``sequence_mean``: ``Z = |o_i| sequences``.
    """
    a = advantages if advantages.dim() == 2 else advantages.unsqueeze(1).expand_as(mask)
    keep = mask > 0
    if aggregation == "token_mean":
        scale = 1.0 / tokens.clamp(min=1)
    else:
        scale = 1.0 / (keep.sum(1, keepdim=True).clamp(min=1) * sequences.clamp(min=1))
    return torch.where(keep, -a.float() * scale, torch.zeros((), dtype=torch.float32, device=mask.device))


def head_gradient(chunk: ProbeChunk, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"grad": (V, d)}`` ``sum_{i,t} c_{i,t} (e_{y_{i,t}} - p_{i,t}) h_{i,t}^T / tau`` over the chunk's rows
    (``coefficients`` ``(n, T)``, 0 on padding), one block of positions at a time."""
    ids = chunk.completion_ids.clamp(min=0, max=chunk.vocab_size - 1)
    grad = torch.zeros(chunk.head_weight.shape, dtype=torch.float32, device=chunk.head_weight.device)
    for block in chunk.position_blocks():
        coef = coefficients[:, block].to(grad.device)
        residual = -torch.softmax(chunk.logits(block), dim=-1) * coef.unsqueeze(-1)  # (n, L, V)
        residual.scatter_add_(-1, ids[:, block].unsqueeze(-1), coef.unsqueeze(-1))
        hidden = torch.where((coef != 0).unsqueeze(-1), chunk.hidden_states[:, block].float(), 0.0)
        grad += torch.einsum("nlv,nld->vd", residual, hidden) / chunk.temperature
    return {"grad": grad}


def logit_change_statistics(chunk: ProbeChunk, delta_weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"fisher": (n, T), "first_order": (n, T)}``: per token, with ``dz = dW h / tau`` and ``p`` the old
    probabilities, ``q = sum_v p_v (dz_v - mean_p dz)^2`` and ``dz_y - mean_p dz`` (0 on padding)."""
    mask = chunk.completion_mask > 0
    ids = chunk.completion_ids.clamp(min=0, max=chunk.vocab_size - 1)
    fisher = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    first = torch.zeros_like(fisher)
    for block in chunk.position_blocks():
        p = torch.softmax(chunk.logits(block), dim=-1)
        hidden = torch.where(mask[:, block].unsqueeze(-1), chunk.hidden_states[:, block].float(), 0.0)
        dz = torch.einsum("nld,vd->nlv", hidden, delta_weight.float()) / chunk.temperature
        mean = (p * dz).sum(-1, keepdim=True)
        fisher[:, block] = (p * (dz - mean).square()).sum(-1)
        first[:, block] = (dz.gather(-1, ids[:, block].unsqueeze(-1)) - mean).squeeze(-1)
    zero = torch.zeros((), device=mask.device)
    return {"fisher": torch.where(mask, fisher, zero), "first_order": torch.where(mask, first, zero)}


def curvature_mask(fisher: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, kl_threshold: float,
                   curvature_threshold: float, granularity: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(keep (N, T) float 0/1, predicted KL (N, T), curvature (N, T))``: ``kl = q / 2``, ``c = -A q``; a token
    is kept when ``kl <= kl_threshold`` and ``c <= curvature_threshold`` (``granularity='sequence'``: the sums
    over each completion's real tokens decide for the whole completion). Padding holds 0 in the statistics."""
    a = advantages if advantages.dim() == 2 else advantages.unsqueeze(1).expand_as(fisher)
    real = mask > 0
    zero = torch.zeros((), dtype=fisher.dtype, device=fisher.device)
    kl = torch.where(real, fisher / 2, zero)
    curvature = torch.where(real, -a.to(fisher.dtype) * fisher, zero)
    if granularity == "sequence":
        keep_row = (kl.sum(1) <= kl_threshold) & (curvature.sum(1) <= curvature_threshold)
        keep = keep_row.unsqueeze(1).expand_as(real)
    else:
        keep = (kl <= kl_threshold) & (curvature <= curvature_threshold)
    return keep.to(fisher.dtype), kl, curvature


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class CAPOConfig:
    """CAPO (arXiv:2510.00819); thresholds inferred (the paper reports rejecting under 8% of tokens)."""

    kl_threshold: float = option(0.01, "Largest predicted KL(pi_old || pi_new) ~ q/2 of a kept token (of a kept "
                                 "completion's token sum with granularity='sequence').", paper="not given",
                                 domain=NON_NEGATIVE)
    curvature_threshold: float = option(0.01, "Largest directional curvature c = -A q of a kept token (sum for "
                                        "'sequence').", paper="not given", domain=FINITE)
    granularity: Literal["token", "sequence"] = option("token", "Mask single tokens, or whole completions by their "
                                                       "token sums.", paper="token")
    loss_aggregation: Literal["token_mean", "sequence_mean"] = option(
        "token_mean", "The trainer's loss aggregation (TRL loss_type 'dapo'/'bnpo': token_mean; 'grpo': "
        "sequence_mean): the normaliser of the previewed gradient. Checked against the trainer at start-up.")
    logits_block: int = option(2**24, "Elements n*L*V of one block of logits in the probe (memory bound).",
                               domain=Range(1, None))


class CAPO(Method):
    """CAPO: mask the tokens whose predicted move under the optimiser's coming LM-head update breaks a trust region."""

    name = "capo"
    Config = CAPOConfig
    paper = "https://arxiv.org/abs/2510.00819"
    plugin_api = ">=1.2,<2"

    @classmethod
    def example(cls) -> Example:
        return Example()

    def requires(self) -> set[str]:
        return {"completion_ids"}

    def needs(self) -> Needs:
        request = ProbeRequest(update_preview=True, logits_budget=self.config.logits_block)
        return Needs(
            probes={PROBE: request},
            settings={"on_policy": (True,), "loss_aggregation": (self.config.loss_aggregation,)},
            why={"old_policy_probe": "the old policy's final hidden states and probabilities",
                 "update_preview": "the optimiser's coming LM-head update",
                 "on_policy": "the preview is of the one optimiser step each generation batch feeds",
                 "loss_aggregation": "the previewed gradient's normaliser (config loss_aggregation)"},
        )

    def preview_update(self, batch: GRPOBatch) -> torch.Tensor:
        """``(V, d)`` the change the optimiser would make to the LM head for the unmasked batch's loss."""
        preview: UpdatePreview | None = batch.update_preview
        if preview is None:
            raise ValueError("capo: the batch carries no update preview (batch.update_preview); the adapter must provide "
                             "trainer feature 'update_preview'")
        mask = batch.token_mask
        counts = batch.parallel.all_reduce_sum(torch.stack([mask.sum(), torch.tensor(float(mask.shape[0]), device=mask.device)]))
        coefficients = loss_coefficients(batch.advantages, mask, self.config.loss_aggregation, counts[0], counts[1])
        probe = batch.probes[PROBE]
        grad = probe.sum(lambda chunk: head_gradient(chunk, coefficients[chunk.rows.to(coefficients.device)]))["grad"]
        return preview.step_for(grad)

    @hookimpl
    def mask_tokens(self, batch: GRPOBatch) -> torch.Tensor:
        cfg = self.config
        delta = self.preview_update(batch)
        stats = batch.probes[PROBE].map(lambda chunk: logit_change_statistics(chunk, delta.to(chunk.head_weight.device)))
        mask = batch.token_mask
        fisher = stats["fisher"].to(mask.device)
        keep, kl, curvature = curvature_mask(fisher, batch.advantages, mask, cfg.kl_threshold, cfg.curvature_threshold,
                                             cfg.granularity)
        a = batch.advantages if batch.advantages.dim() == 2 else batch.advantages.unsqueeze(1)
        gain = torch.where(mask > 0, a * stats["first_order"].to(mask.device) + curvature / 2, 0.0)
        tokens = batch.parallel.all_reduce_sum(mask.sum()).clamp(min=1)
        self.log_metric("rejected_fraction", float(batch.parallel.all_reduce_sum(torch.where(mask > 0, 1 - keep, 0.0).sum()) / tokens))
        self.log_metric("predicted_kl", float(batch.parallel.all_reduce_sum(kl.sum()) / tokens))
        self.log_metric("predicted_gain", float(batch.parallel.all_reduce_sum(gain.sum())))
        self.log_metric("update_norm", float(delta.norm()))
        return keep
