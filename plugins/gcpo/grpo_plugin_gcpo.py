"""GCPO: Group Contrastive Policy Optimization (GeometryZero, Wang et al., arXiv:2506.07160).

Plain GRPO with an auxiliary-construction reward pays every construction, useful or not. GCPO
decides per prompt whether constructing helped: within each group it compares the accuracy of the
completions that construct with the accuracy of those that do not, and pays (``+1``), charges
(``-1``) or ignores (``0``) construction accordingly. A length reward for correct completions
favours longer reasoning. Advantages are then plain GRPO on the shaped reward:

    acc_aux(g) = mean of acc_i over i in g with aux_i = 1,   acc_no(g) = the same over aux_i = 0
    m_g        = +1 if acc_aux - acc_no > eps, -1 if < -eps, else 0;   0 if either subset is empty
    R_len_i    = w_len * min(L_i / L_target, 1) * acc_i
    R_i        = acc_i + fmt_i + m_g aux_i + R_len_i

``acc``, ``fmt`` and ``aux`` (1 where the completion performs an auxiliary construction, e.g. emits an
``<aux>...</aux>`` span) are reward components the user provides; ``L_i`` is the completion's token
count. Shapes: ``N`` completions, ``G`` groups (sizes may differ), ``T`` tokens, ``K`` components.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from grpo_plugins import NON_NEGATIVE, GRPOBatch, Method, Needs, hookimpl, option
from grpo_plugins import Example
from grpo_plugins.ops import segment_count, segment_max, segment_sum
from grpo_plugins.rewards import OtherRewards, named_component, other_rewards_sum


# ----------------------------------------------------------------- the paper's maths
def contrastive_mask(
    accuracy: torch.Tensor, aux: torch.Tensor, index: torch.Tensor, num_groups: int, margin: float = 0.0
) -> torch.Tensor:
    """Group Contrastive Mask ``m_g`` in ``{-1, 0, +1}`` -> ``(G,)`` float.

    Args:
        accuracy: ``(N,)`` correctness of each completion (0/1 or a score).
        aux: ``(N,)`` bool, whether the completion performs an auxiliary construction.
        index: ``(N,)`` group of each completion in ``[0, G)``.
        num_groups: ``G``.
        margin: ``eps``; accuracy gaps of at most ``eps`` in size give 0.

    ``m_g = sign(acc_aux - acc_no)`` where the gap exceeds ``margin``, 0 otherwise and 0 when the group
    has no completion with, or none without, a construction.
    """
    with_aux = aux.to(accuracy.dtype)
    n_aux = segment_sum(with_aux, index, num_groups)
    n_no = segment_count(index, num_groups).to(accuracy.dtype) - n_aux
    acc_aux = segment_sum(accuracy * with_aux, index, num_groups) / n_aux.clamp(min=1)
    acc_no = segment_sum(accuracy * (1 - with_aux), index, num_groups) / n_no.clamp(min=1)
    gap = acc_aux - acc_no
    sign = (gap > margin).to(accuracy.dtype) - (gap < -margin).to(accuracy.dtype)
    return torch.where((n_aux > 0) & (n_no > 0), sign, torch.zeros_like(sign))


def length_reward(
    accuracy: torch.Tensor, lengths: torch.Tensor, index: torch.Tensor, num_groups: int,
    weight: float = 0.5, target_length: int = 0,
) -> torch.Tensor:
    """``R_len_i = weight * min(L_i / L_target, 1) * acc_i`` -> ``(N,)``.

    ``lengths``: ``(N,)`` token counts. ``target_length`` > 0 is a fixed ``L_target`` in tokens; 0 uses
    the longest completion of each group (at least 1 token).
    """
    lengths = lengths.to(accuracy.dtype)
    if target_length > 0:
        target = torch.full_like(lengths, float(target_length))
    else:
        target = segment_max(lengths, index, num_groups).clamp(min=1).index_select(0, index)
    return weight * torch.clamp(lengths / target, max=1.0) * accuracy


def gcpo_rewards(
    accuracy: torch.Tensor, format_flag: torch.Tensor, aux: torch.Tensor, lengths: torch.Tensor,
    index: torch.Tensor, num_groups: int, *, aux_mode: str = "contrastive", margin: float = 0.0,
    length_weight: float = 0.5, target_length: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GCPO's shaped reward ``R = acc + fmt + R_aux + R_len`` -> ``(N,)``, and the mask ``m`` ``(G,)``.

    ``aux_mode``: ``"contrastive"`` (``R_aux = m_g aux``, the paper), ``"unconditional"``
    (``R_aux = aux``, the GRPO baseline the paper compares with) or ``"none"`` (``R_aux = 0``).
    All inputs are ``(N,)``; ``aux`` is bool.
    """
    mask = contrastive_mask(accuracy, aux, index, num_groups, margin)
    if aux_mode == "contrastive":
        aux_reward = mask.index_select(0, index) * aux.to(accuracy.dtype)
    elif aux_mode == "unconditional":
        aux_reward = aux.to(accuracy.dtype)
    else:
        aux_reward = torch.zeros_like(accuracy)
    shaped = accuracy + format_flag + aux_reward + length_reward(
        accuracy, lengths, index, num_groups, length_weight, target_length
    )
    return shaped, mask


# ----------------------------------------------------------------- reading the reward components


# ----------------------------------------------------------------- the method
@dataclass(frozen=True)
class GCPOConfig:
    """GCPO (GeometryZero, arXiv:2506.07160): group-contrastive auxiliary reward plus a length reward."""

    accuracy_reward: str = option("accuracy", "Reward component with each completion's correctness (acc_i).")
    format_reward: str = option("format", "Reward component with the format flag (fmt_i); '' for no format reward.")
    aux_reward: str = option(
        "aux", "Reward component that is non-zero where the completion performs an auxiliary construction (aux_i)."
    )
    aux_mode: Literal["contrastive", "unconditional", "none"] = option(
        "contrastive",
        "'contrastive': R_aux = m_g aux (GCPO); 'unconditional': R_aux = aux (the GRPO baseline of the paper); "
        "'none': no auxiliary reward.",
    )
    margin: float = option(
        0.0, "eps of the Group Contrastive Mask: accuracy gaps of at most eps give m = 0 (inferred).",
        domain=NON_NEGATIVE,
    )
    length_weight: float = option(0.5, "w_len of the length reward (inferred).", domain=NON_NEGATIVE)
    target_length: int = option(
        0, "L_target in tokens; 0 = the longest completion of the prompt's group (inferred: 'max length').",
        domain=NON_NEGATIVE,
    )
    other_rewards: OtherRewards = option(
        "error",
        "Reward components GCPO does not read: 'error' refuses them, 'add' adds them with the trainer's weights, "
        "'ignore' leaves them out.",
    )

    def __post_init__(self):
        if not self.accuracy_reward:
            raise ValueError("accuracy_reward must name a reward component")
        if not self.aux_reward and self.aux_mode != "none":
            raise ValueError("aux_reward must name a reward component unless aux_mode='none'")
        named = [n for n in (self.accuracy_reward, self.format_reward, self.aux_reward) if n]
        if len(set(named)) != len(named):
            raise ValueError(f"accuracy_reward, format_reward and aux_reward must differ, got {named}")


class GCPO(Method):
    """GCPO: reward auxiliary constructions only in groups where they raise accuracy, plus a length reward."""

    name = "gcpo"
    Config = GCPOConfig
    paper = "https://arxiv.org/abs/2506.07160"
    plugin_api = ">=1.3,<2"  # Needs.runs_first

    @classmethod
    def example(cls) -> Example:
        """The conformance suite's example run (see grpo_plugins.example)."""
        return Example(reward_names=("accuracy", "format", "aux"))

    def requires(self) -> set[str]:
        return {"completion_mask"}

    def needs(self) -> Needs:
        return Needs(excludes={"gdpo"}, runs_first={"shape_rewards"},
                     why={"gdpo": "gdpo normalises the raw reward components and never reads gcpo's shaped reward, "
                                  "so the contrastive mask and the length reward would be lost",
                          "shape_rewards": "it rebuilds the reward from reward_components, so an earlier shaping would be lost"})

    @hookimpl
    def shape_rewards(self, batch: GRPOBatch) -> torch.Tensor:
        """``(N,)`` GCPO reward built from the accuracy, format and aux components and the completion lengths."""
        c = self.config
        accuracy = named_component(batch, c.accuracy_reward, self.name, "accuracy_reward")
        format_flag = (
            named_component(batch, c.format_reward, self.name, "format_reward") if c.format_reward
            else torch.zeros_like(accuracy)
        )
        used = {c.accuracy_reward, c.format_reward, c.aux_reward} - {""}
        if c.aux_mode == "none":
            aux = torch.zeros_like(accuracy, dtype=torch.bool)
        else:
            aux = named_component(batch, c.aux_reward, self.name, "aux_reward") != 0
        lengths = batch.token_mask.gt(0).sum(dim=-1)
        shaped, mask = gcpo_rewards(
            accuracy, format_flag, aux, lengths,
            batch.group_index, batch.num_groups, aux_mode=c.aux_mode, margin=c.margin,
            length_weight=c.length_weight, target_length=c.target_length,
        )
        shaped = shaped + other_rewards_sum(batch, used, c.other_rewards, self.name)
        decided = mask != 0
        self.log_metric("aux_rate", aux.float().mean())
        self.log_metric("groups_aux_helps", (mask > 0).float().mean())
        self.log_metric("groups_aux_hurts", (mask < 0).float().mean())
        self.log_metric("groups_aux_undecided", (~decided).float().mean())
        return shaped.to(batch.rewards.dtype)
