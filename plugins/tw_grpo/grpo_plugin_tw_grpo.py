"""TW-GRPO: Reinforcing Video Reasoning with Focused Thinking (Dang et al., 2025, arXiv:2505.24718;
code ``longmalongma/TW-GRPO``, ``compute_token_importance_kl_logs_uniform`` and ``accuracy_reward``).

**Token weights** (``mask_tokens``) from how much a group's completions disagree about the next token.
For a group of ``G`` completions and each position ``t`` (completions padded to a common ``T``):

- ``l_{j,t}``: the old policy's log-softmax vector (size ``V``) of completion ``j`` at ``t``; past
  completion ``j``'s end it is the uniform distribution, ``log(1/V)``;
- ``lbar_t = (1/G) sum_j l_{j,t}`` (the geometric mean of the distributions, in log space);
- ``d_{j,t} = sum_v [exp(delta) - delta - 1]``, ``delta = clamp(lbar_t(v) - l_{j,t}(v), -c, c)`` (the
  "k3" KL estimator summed over the vocabulary, ``c = 11``);
- ``D_t = mean_j d_{j,t}``, min-max normalised over the group's positions:
  ``n_t = (D_t - min D) / (max D - min D + 1e-8)``;
- ``w_t = 1 + (alpha - 1) n_t``, shared by the group's members at ``t``, times the completion mask.

The weights multiply each token's policy loss; the loss's normaliser stays the completion mask (with
TRL's ``loss_type='dapo'``, the paper's token mean over the batch). They are computed from the old
policy without gradient, through the old-policy probe (``batch.probes['tw_grpo']``, whole groups per
chunk, one block of positions' logits at a time: memory ``G·L·V`` instead of ``G·T·V``).

**Soft multi-choice reward** (``shape_rewards``, off by default): with a predicted option set ``P`` (the
text inside ``<answer>...</answer>``, or the whole completion, split on commas) and the gold set ``S``
(the dataset column ``answer_column``), the partial credit is ``|P|/|S|`` when ``P`` is a non-empty
subset of ``S`` (1 on an exact match), 0 when ``P`` holds a wrong option; it replaces the accuracy
component when larger: ``r' = r + w_acc (max(acc, credit) - acc)``.

Shapes: ``N`` completions, ``T`` tokens, ``V`` vocabulary, ``n`` rows of a probe chunk, ``g`` its groups,
``L`` positions of a logits block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from grpo_plugins import POSITIVE, Example, GRPOBatch, Method, Needs, Range, hookimpl, option
from grpo_plugins.completion_keys import completion_text
from grpo_plugins.ops import segment_mean, segment_sum
from grpo_plugins.probe import ProbeChunk, ProbeRequest
from grpo_plugins.rewards import named_component

PROBE = "tw_grpo"
NORMALISER_EPSILON = 1e-8  # the reference code's min-max denominator

# --------------------------------------------------------------------------------------------- maths


def member_divergence(
    log_probs: torch.Tensor, real: torch.Tensor, group_index: torch.Tensor, num_groups: int, clamp: float = 11.0
) -> torch.Tensor:
    """``(n, L)`` divergence ``d_{j,t} = sum_v [exp(delta) - delta - 1]`` of each member from its group's
    geometric-mean distribution, ``delta = clamp(lbar - l, -clamp, clamp)``.

    ``log_probs``: ``(n, L, V)`` log-softmax vectors; ``real``: ``(n, L)`` bool, False past a completion's
    end (replaced by the uniform ``log(1/V)``; NaN there is ignored); ``group_index``: ``(n,)`` in
    ``[0, num_groups)``.
    """
    vocab = log_probs.shape[-1]
    uniform = torch.full((), -torch.log(torch.tensor(float(vocab))).item(), dtype=log_probs.dtype, device=log_probs.device)
    filled = torch.where(real.unsqueeze(-1), log_probs, uniform)
    mean = segment_mean(filled, group_index, num_groups)  # (g, L, V)
    delta = (mean[group_index] - filled).clamp(-clamp, clamp)
    return (torch.exp(delta) - delta - 1).sum(-1)


def group_divergence(divergence: torch.Tensor, group_index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``(g, L)`` ``D_t = mean_j d_{j,t}`` over each group's members (``divergence`` ``(n, L)``)."""
    return segment_mean(divergence, group_index, num_groups)


def position_weights(divergence: torch.Tensor, real: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(g, T)`` weights ``1 + (alpha - 1) (D - min D) / (max D - min D + 1e-8)``, the min and max over each
    group's real positions (``real`` ``(g, T)``: some member has a token there); 1 elsewhere."""
    low = torch.where(real, divergence, torch.inf).amin(dim=1, keepdim=True)
    high = torch.where(real, divergence, -torch.inf).amax(dim=1, keepdim=True)
    normalised = (divergence - low) / (high - low + NORMALISER_EPSILON)
    return torch.where(real, 1 + (alpha - 1) * normalised, torch.ones((), dtype=divergence.dtype))


def chunk_token_weights(chunk: ProbeChunk, alpha: float, clamp: float) -> dict[str, torch.Tensor]:
    """``{"weights": (n, T), "divergence": (n, T)}`` for a chunk of whole groups: one block of positions'
    log-probs at a time (``chunk.position_blocks()``), then the min-max over each group's positions.
    Padded positions hold 0."""
    mask = chunk.completion_mask > 0
    index, groups = chunk.group_index, chunk.num_groups
    divergence = torch.zeros(groups, mask.shape[1], dtype=torch.float32, device=mask.device)
    for block in chunk.position_blocks():
        member = member_divergence(chunk.log_probs(block), mask[:, block], index, groups, clamp)
        divergence[:, block] = group_divergence(member, index, groups)
    real = segment_sum(mask.float(), index, groups) > 0
    weights = position_weights(divergence, real, alpha)[index]
    zero = torch.zeros((), dtype=weights.dtype, device=weights.device)
    return {"weights": torch.where(mask, weights, zero), "divergence": torch.where(mask, divergence[index], zero)}


def answer_options(text: str) -> set[str]:
    """The options of an answer: the text inside ``<answer>...</answer>`` (or all of it), spaces removed,
    split on commas, empty items dropped."""
    match = re.search(r"<answer>(.*?)</answer>", text, re.DOTALL)
    inner = match.group(1) if match else text
    return {item for item in inner.replace(" ", "").split(",") if item}


def partial_credit(completion: str, gold: str) -> float:
    """``|P|/|S|`` when the predicted options ``P`` are a non-empty subset of the gold set ``S``, else 0."""
    predicted, truth = answer_options(completion), answer_options(gold)
    if not predicted or not truth or not predicted <= truth:
        return 0.0
    return len(predicted) / len(truth)


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TWGRPOConfig:
    """TW-GRPO (arXiv:2505.24718); defaults of the released script (``scripts/tw-grpo.sh``)."""

    alpha: float = option(1.7, "Largest token weight: weights run from 1 (least divergent position of the group) to "
                          "alpha (most divergent).", paper=1.7, domain=Range(1, None))
    divergence_clamp: float = option(11.0, "Clamp on the log-ratio delta inside the k3 estimator.", paper=11.0,
                                     domain=POSITIVE)
    logits_block: int = option(2**24, "Elements n*L*V of one block of logits in the probe (memory bound of the "
                               "weights' computation).", domain=Range(1, None))
    soft_reward: bool = option(False, "Give partial credit to multi-choice answers that are a subset of the gold set "
                               "(needs the dataset column answer_column and the reward accuracy_reward).", paper=True)
    accuracy_reward: str = option("accuracy", "Name of the trainer's accuracy reward function the soft credit replaces "
                                  "when larger.", paper="accuracy")
    answer_column: str = option("solution", "Dataset column holding the gold options (e.g. 'A,C' or "
                                "'<answer>A,C</answer>').", paper="solution")


class TWGRPO(Method):
    """TW-GRPO: token weights from the divergence of a group's next-token distributions, plus a soft multi-choice reward."""

    name = "tw_grpo"
    Config = TWGRPOConfig
    paper = "https://arxiv.org/abs/2505.24718"
    plugin_api = ">=1.2,<2"

    @classmethod
    def example(cls) -> Example:
        return Example(
            config={"soft_reward": True},
            reward_names=("accuracy", "format"),
            columns={"solution": lambda prompt_id: ["A", "A,C", "B,C,D", "<answer>D</answer>"][prompt_id % 4]},
            completions=("<answer>A</answer>", "<answer>A,C</answer>", "<answer>C</answer>", "<answer>B,E</answer>", "D"),
        )

    def disabled_hooks(self) -> set[str]:
        return set() if self.config.soft_reward else {"shape_rewards"}

    def requires(self) -> set[str]:
        return {"completion_ids", "completions", "rows"} if self.config.soft_reward else {"completion_ids"}

    def needs(self) -> Needs:
        request = ProbeRequest(whole_groups=True, logits_budget=self.config.logits_block)
        columns = {self.config.answer_column} if self.config.soft_reward else set()
        return Needs(probes={PROBE: request}, columns=columns,
                     why={"old_policy_probe": "the full next-token distributions of every member of a group"})

    @hookimpl
    def shape_rewards(self, batch: GRPOBatch, rewards: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        accuracy = named_component(batch, cfg.accuracy_reward, self.name, "accuracy_reward")
        if batch.completions is None or batch.rows is None:
            raise ValueError("tw_grpo: soft_reward needs the decoded completions and the dataset rows in the batch")
        credit = torch.tensor([partial_credit(completion_text(c), str(row[cfg.answer_column]))
                               for c, row in zip(batch.completions, batch.rows)], dtype=rewards.dtype, device=rewards.device)
        k = batch.reward_names.index(cfg.accuracy_reward)
        weight = 1.0 if batch.reward_weights is None else float(batch.reward_weights[k])
        soft = torch.maximum(accuracy.to(rewards.dtype), credit)
        self.log_metric("partial_credit_rate", float(((credit > 0) & (credit < 1)).float().mean()))
        return rewards + weight * (soft - accuracy.to(rewards.dtype))

    @hookimpl
    def mask_tokens(self, batch: GRPOBatch) -> torch.Tensor:
        cfg = self.config
        out = batch.probes[PROBE].map(lambda chunk: chunk_token_weights(chunk, cfg.alpha, cfg.divergence_clamp))
        weights, mask = out["weights"].to(batch.token_mask.device), batch.token_mask
        real = mask.sum().clamp(min=1)
        self.log_metric("mean_weight", float(torch.where(mask > 0, weights, 0.0).sum() / real))
        self.log_metric("mean_divergence", float(torch.where(mask > 0, out["divergence"].to(mask.device), 0.0).sum() / real))
        return weights
