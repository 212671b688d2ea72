"""MultiRole-R1: diversity-enhanced reasoning for subjective questions (Wang et al., arXiv:2507.20187).

RL with a verifiable reward narrows a model to one line of reasoning, which hurts questions whose
answer depends on whose perspective is taken. MultiRole-R1 keeps the verifiable accuracy reward and
adds two diversity rewards, then runs plain GRPO on the sum:

    D_per(y) = min(#distinct roles named in y, K_max) / K_max                  (perspective diversity)
    D_lex(y) = #distinct n-grams of y / #n-grams of y, 0 below n tokens         (lexical diversity, distinct-n)
    r        = r_acc + gate * (lambda_per D_per + lambda_lex D_lex),   gate = 1, or 1[r_acc > 0] if gated
    A_i      = (r_i - mean_g r) / (std_g r + eps)                               (plain GRPO)

``r_acc`` and the role count come from reward components the user provides (the roles a completion
names are parsed by the user's reward function or judge); ``D_lex`` is computed here from the
completion tokens with vectorised tensor operations. Shapes: ``N`` completions, ``T`` tokens,
``n`` the n-gram order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpo_plugins import NON_NEGATIVE, GRPOBatch, Method, Range, hookimpl, option
from grpo_plugins import Example, Needs
from grpo_plugins.rewards import OtherRewards, named_component, other_rewards_sum


# ----------------------------------------------------------------- the paper's maths
def distinct_ngram_ratio(token_ids: torch.Tensor, mask: torch.Tensor, n: int = 2) -> torch.Tensor:
    """distinct-n of each completion: ``#unique n-grams / #n-grams`` -> ``(N,)`` float.

    Args:
        token_ids: ``(N, T)`` integer completion tokens (padding may hold anything).
        mask: ``(N, T)``, > 0 on real tokens; an n-gram counts only if all its ``n`` tokens are real.
        n: the n-gram order.

    A completion with fewer than ``n`` real tokens gets 0. The ``K`` complete n-grams ``(K, n)`` get
    dense ids column by column: ``id = dense(id * #values_j + dense(token_j))``, each ``dense`` a
    ``torch.unique(return_inverse=True)``, so every number stays below ``K^2`` whatever the vocabulary
    size and n. The distinct ``(row, id)`` pairs are then counted per row: no loop over completions or
    tokens (only over the ``n`` n-gram positions).
    """
    num, width = token_ids.shape
    if width < n:
        return torch.zeros(num, dtype=torch.float32, device=token_ids.device)
    complete = (mask > 0).unfold(1, n, 1).all(-1)  # (N, T - n + 1): the windows of n real tokens
    grams = token_ids.long().unfold(1, n, 1)[complete]  # (K, n)
    count = max(grams.shape[0], 1)
    gram = torch.zeros(grams.shape[0], dtype=torch.long, device=token_ids.device)
    for column in grams.unbind(-1):  # n is tiny (1-4)
        values, rank = torch.unique(column, return_inverse=True)
        gram = torch.unique(gram * values.numel() + rank, return_inverse=True)[1]  # dense id of the prefix
    rows = complete.nonzero()[:, 0]
    distinct = torch.bincount(torch.unique(rows * count + gram) // count, minlength=num)
    total = complete.sum(dim=1)
    return torch.where(total > 0, distinct / total.clamp(min=1), 0.0).float()


def perspective_diversity(role_counts: torch.Tensor, max_roles: int = 4) -> torch.Tensor:
    """``D_per = min(roles, K_max) / K_max`` -> ``(N,)``; ``role_counts`` ``(N,)`` >= 0."""
    return role_counts.clamp(max=max_roles) / max_roles


def multirole_rewards(
    accuracy: torch.Tensor, perspective: torch.Tensor, lexical: torch.Tensor,
    perspective_weight: float = 0.5, lexical_weight: float = 0.5, gate_on_accuracy: bool = False,
) -> torch.Tensor:
    """``r = r_acc + gate (lambda_per D_per + lambda_lex D_lex)`` -> ``(N,)``; all inputs ``(N,)``."""
    bonus = perspective_weight * perspective + lexical_weight * lexical
    if gate_on_accuracy:
        bonus = torch.where(accuracy > 0, bonus, torch.zeros_like(bonus))
    return accuracy + bonus


# ----------------------------------------------------------------- reading the reward components


# ----------------------------------------------------------------- the method
@dataclass(frozen=True)
class MultiRoleConfig:
    """MultiRole-R1 (arXiv:2507.20187): accuracy + perspective diversity + lexical diversity (distinct-n)."""

    accuracy_reward: str = option("accuracy", "Reward component with the verifiable accuracy r_acc.")
    roles_reward: str = option(
        "roles", "Reward component with the number of distinct roles/stakeholders a completion names; '' = no "
        "perspective term.",
    )
    max_roles: int = option(4, "K_max: role counts above it earn no more (inferred).", domain=Range(1, None))
    perspective_weight: float = option(0.5, "lambda_per (inferred).", domain=NON_NEGATIVE)
    lexical_weight: float = option(0.5, "lambda_lex (inferred).", domain=NON_NEGATIVE)
    ngram: int = option(2, "n of distinct-n (the paper's lexical diversity: distinct-2).", domain=Range(1, 4))
    gate_on_accuracy: bool = option(
        False, "Add the diversity terms only where r_acc > 0, so verbose wrong answers earn nothing (inferred).",
    )
    other_rewards: OtherRewards = option(
        "error",
        "Reward components the method does not read: 'error' refuses them, 'add' adds them with the trainer's "
        "weights, 'ignore' leaves them out.",
    )

    def __post_init__(self):
        if not self.accuracy_reward:
            raise ValueError("accuracy_reward must name a reward component")
        if self.roles_reward == self.accuracy_reward:
            raise ValueError(f"roles_reward and accuracy_reward must differ, got '{self.roles_reward}' for both")


class MultiRole(Method):
    """MultiRole-R1: GRPO on accuracy plus perspective (role count) and lexical (distinct-2) diversity rewards."""

    name = "multirole"
    Config = MultiRoleConfig
    paper = "https://arxiv.org/abs/2507.20187"
    plugin_api = ">=1.3,<2"  # Needs.runs_first

    @classmethod
    def example(cls) -> Example:
        """The conformance suite's example run (see grpo_plugins.example)."""
        return Example(reward_names=("accuracy", "roles"), reward_values=(0.0, 1.0, 2.0, 3.0))

    def requires(self) -> set[str]:
        return {"completion_ids", "completion_mask"}

    def needs(self) -> Needs:
        return Needs(runs_first={"shape_rewards"},
                     why={"shape_rewards": "it rebuilds the reward from reward_components, so an earlier shaping would be lost"})

    @hookimpl
    def shape_rewards(self, batch: GRPOBatch) -> torch.Tensor:
        """``(N,)`` accuracy plus weighted diversity rewards; replaces the trainer's sum of the components it reads."""
        c = self.config
        accuracy = named_component(batch, c.accuracy_reward, self.name, "accuracy_reward")
        if c.roles_reward:
            roles = named_component(batch, c.roles_reward, self.name, "roles_reward")
            if bool((roles < 0).any()):
                raise ValueError(f"multirole: the role counts of '{c.roles_reward}' must be >= 0")
            perspective = perspective_diversity(roles, c.max_roles)
        else:
            perspective = torch.zeros_like(accuracy)
        if batch.completion_ids is None:
            raise ValueError("multirole computes distinct-n from the completion tokens, but the batch has none")
        lexical = distinct_ngram_ratio(batch.completion_ids, batch.token_mask, c.ngram).to(accuracy)
        shaped = multirole_rewards(
            accuracy, perspective, lexical, c.perspective_weight, c.lexical_weight, c.gate_on_accuracy
        )
        shaped = shaped + other_rewards_sum(batch, {c.accuracy_reward, c.roles_reward} - {""}, c.other_rewards, self.name)
        self.log_metric("accuracy", accuracy.mean())
        self.log_metric(f"distinct_{c.ngram}", lexical.mean())
        self.log_metric("perspective_diversity", perspective.mean())
        self.log_metric("mean_length", batch.token_mask.gt(0).sum(-1).float().mean())
        return shaped.to(batch.rewards.dtype)
