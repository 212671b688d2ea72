"""LLDS: the lazy-likelihood-displacement regulariser (arXiv:2512.04220, "On GRPO Collapse in Search-R1").

GRPO can lower the likelihood of tokens of correct responses ("lazy likelihood displacement"); on a
multi-turn tool task this feeds a collapse. LLDS adds a penalty on every token of a non-negative-
advantage response whose log-likelihood fell during the update, ``max(0, log pi_old - log pi)``,
switched on only for the actions (contiguous runs of trainable tokens between masked tool output)
or responses whose total log-likelihood fell.

Shapes: ``B`` rows of a loss micro-batch, ``T`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from grpo_plugins import NON_NEGATIVE, LossInputs, LossTerm, Method, Needs, hookimpl, option


def _run_starts(trainable: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` bool: the token is trainable and the previous token of its row is not."""
    starts = torch.empty_like(trainable)
    starts[:, :1] = trainable[:, :1]
    torch.gt(trainable[:, 1:], trainable[:, :-1], out=starts[:, 1:])
    return starts


def _running_action(trainable: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` int32/int64 number of actions started at or before each token (over the flattened batch)."""
    dtype = torch.int32 if trainable.numel() < (1 << 31) else torch.int64
    return torch.cumsum(_run_starts(trainable).view(-1), 0, dtype=dtype).view_as(trainable)


def action_index(trainable: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` integer id of each token's action; 0 outside, actions numbered 1.. over the whole batch.

    An action is a maximal run of consecutive ``trainable`` ``(B, T)`` tokens within a row (runs never
    cross rows). Found with one cumulative sum over run starts.
    """
    return _running_action(trainable) * trainable


def _gate(
    displacement: torch.Tensor, preserving: torch.Tensor, level: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, T)`` gate of :func:`displacement_gate`, the number of gated actions and of all actions (0-d)."""
    d = displacement.detach()
    if level == "response":
        gate = (torch.where(preserving, d, 0.0).sum(dim=1, keepdim=True) > 0) & preserving
        starts = _run_starts(preserving).sum(dim=1)
        return gate, (gate[:, 0] * starts).sum(), starts.sum()
    # Tokens off the preserving set go to bin 0, whatever their (possibly padded, non-finite) d.
    running = _running_action(preserving)
    ids = (running * preserving).view(-1)
    rows, width = preserving.shape
    bins = rows * ((width + 1) // 2) + 1  # at most ceil(T / 2) actions per row, plus bin 0
    totals = d.new_zeros(bins).index_add_(0, ids, d.reshape(-1))
    gate = (totals.index_select(0, ids).view_as(d) > 0) & preserving
    return gate, (totals[1:] > 0).sum(), running.view(-1)[-1]


def displacement_gate(
    displacement: torch.Tensor, preserving: torch.Tensor, level: Literal["action", "response"] = "action"
) -> torch.Tensor:
    """``(B, T)`` bool: the token's action (or response) lost likelihood in total.

    Args:
        displacement: ``(B, T)`` ``d_t = log pi_old - log pi`` (read without gradient).
        preserving: ``(B, T)`` bool trainable tokens with advantage ``>= 0``.
        level: ``"action"``: ``1[sum over the token's action of d > 0]``; ``"response"``:
            ``1[sum over the row's preserving tokens of d > 0]``. Always 0 outside ``preserving``.
    """
    return _gate(displacement, preserving, level)[0]


def _penalty_parts(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, level: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``d`` (with gradient), the 0/1 ``(B, T)`` factor ``g * 1[d >= 0]`` (penalty = ``d`` times it), the
    gate, and the numbers of gated and of all actions (0-d)."""
    preserving = (mask > 0) & (advantages >= 0)
    # Zero off the preserving set, so that padded (possibly NaN) log-probs never reach the loss or its gradient.
    displacement = torch.where(preserving, old_log_probs.detach() - log_probs, 0.0)
    gate, gated, actions = _gate(displacement, preserving, level)
    # ``g * max(0, d)`` as ``d * 1[g and d >= 0]``: ``>=`` keeps clamp's gradient at d = 0.
    active = (gate & (displacement >= 0)).to(log_probs.dtype)
    return displacement, active, gate, gated, actions


def llds_penalty(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    level: Literal["action", "response"] = "action",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token LLDS penalty ``g_{k(t)} * max(0, log pi_old - log pi)``.

    Args:
        log_probs: ``(B, T)`` current log-probs (with gradient).
        old_log_probs: ``(B, T)`` behaviour log-probs.
        advantages: ``(B, T)`` advantages; tokens with ``A >= 0`` form the preserving set.
        mask: ``(B, T)`` loss mask; > 0 on trainable tokens (tool output is 0).
        level: gate per ``"action"`` or per ``"response"``.

    Returns:
        ``(penalty (B, T), gate (B, T) bool)``; the penalty carries gradient through ``log_probs``
        only, the gate none.
    """
    displacement, active, gate, _, _ = _penalty_parts(log_probs, old_log_probs, advantages, mask, level)
    return displacement * active, gate


@dataclass(frozen=True)
class LLDSConfig:
    """LLDS: lazy-likelihood-displacement regulariser (https://arxiv.org/abs/2512.04220)."""

    coef: float = option(0.2, "lambda, the weight of the regulariser.", paper=0.2, domain=NON_NEGATIVE)
    level: Literal["action", "response"] = option(
        "action",
        "Gate per action (runs of trainable tokens between masked tool output; the paper's best) or per response.",
        paper="action",
    )
    answer_coef: float | None = option(
        None,
        "lambda_ans for answer-span tokens (the weight used there is min(answer_coef, coef)); needs "
        "row_data['answer_span'] (B, T), 1 on answer tokens. None: no answer masking (paper default).",
        paper=None,
        domain=NON_NEGATIVE,
    )
    normaliser: Literal["token", "policy"] = option(
        "policy",
        "'token': the term's token mean over the step's tokens, whatever the trainer's loss aggregation (the "
        "paper; hook loss_objectives); 'policy': aggregated like the policy loss (hook loss_terms; equal to "
        "'token' under token-mean losses such as TRL's loss_type='dapo', and runs where an adapter lacks "
        "trainer feature 'loss_normalisers'). The default 'policy' runs on every trainer; TRL also runs "
        "the paper's 'token'.",
        paper="token",
    )


class LLDS(Method):
    """LLDS: penalise falling likelihood of non-negative-advantage tokens, gated per action or response."""

    name = "llds"
    Config = LLDSConfig
    paper = "https://arxiv.org/abs/2512.04220"
    plugin_api = ">=1.1,<2"

    def disabled_hooks(self) -> set[str]:
        return {"loss_terms"} if self.config.normaliser == "token" else {"loss_objectives"}

    def needs(self) -> Needs:
        why = {"loss_normalisers": "its token-mean term (normaliser='policy' aggregates it like the policy loss instead)"}
        if self.config.answer_coef is None:
            return Needs(why=why)
        return Needs(loss_fields={"row_data"}, why={**why, "row_data": "answer_coef reads row_data['answer_span'], "
                                                                        "which another method attaches"})

    @hookimpl
    def loss_objectives(self, inputs: LossInputs) -> dict[str, LossTerm]:
        """``{"llds": LossTerm((B, T) lambda_t * penalty_t, "token")}``: the paper's token mean."""
        return {"llds": LossTerm(self.loss_terms(inputs)["llds"], "token")}

    @hookimpl
    def loss_terms(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        """``{"llds": (B, T) lambda_t * penalty_t}``, aggregated like the policy loss (``normaliser='policy'``)."""
        cfg = self.config
        displacement, active, _, gated, actions = _penalty_parts(
            inputs.log_probs, inputs.old_log_probs, inputs.advantages, inputs.mask, cfg.level
        )
        if cfg.answer_coef is None:
            weight = active * cfg.coef
        else:
            span = inputs.row_data.get("answer_span")
            if span is None or tuple(span.shape) != tuple(inputs.log_probs.shape):
                got = "missing" if span is None else f"of shape {tuple(span.shape)}"
                raise ValueError(
                    f"llds: answer_coef={cfg.answer_coef} needs row_data['answer_span'] {tuple(inputs.log_probs.shape)}, "
                    f"1 on answer tokens, but it is {got}. Another enabled method must attach it at the advantage "
                    "stage (GRPOBatch.row_data['answer_span'], (N, T); no method of this project does), and the "
                    "adapter carries it to the loss; or leave answer_coef=None"
                )
            low, coef = active.new_tensor(min(cfg.answer_coef, cfg.coef)), active.new_tensor(cfg.coef)
            weight = active * torch.where(span.to(torch.bool), low, coef)
        self.log_metric("frac_gated_actions", gated / actions.clamp(min=1))
        return {"llds": displacement * weight}  # lambda_t * g * max(0, d), one product with gradient
