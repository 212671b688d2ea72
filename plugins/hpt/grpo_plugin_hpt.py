"""HPT: Hybrid Post-Training (arXiv:2509.04419, Lv et al., "Towards a Unified View of Large Language
Model Post-Training").

Per prompt ``q`` with ``n`` generated rollouts, ``c_q`` of them correct (reward >= ``success_threshold``):

- ``c_q <= gate`` -> **SFT mode**: the rollouts are removed from the loss and one demonstration (the
  dataset's ``demonstration_column``) is injected into the batch and trained with the negative
  log-likelihood;
- ``gate < c_q <= gate + band`` -> the rollouts are removed, nothing is added (the paper's band
  between ``switch_gate`` and ``switch_gate_off``; empty by default);
- ``c_q > gate + band`` -> **RL mode**: GRPO on the prompt's rollouts.

The loss of a generation batch::

    L = L_GRPO(rollouts of RL prompts) + c_sft * L_SFT,   L_SFT = sum_{demo tokens} -log pi / (demo tokens)

Mapping onto the hooks: ``inject_rows`` adds the demonstrations (kind ``"demonstration"``); the
advantage stage (``adjust_advantages``, which leaves the advantages unchanged) attaches each row's
policy-loss weight and SFT weight (``row_data``); ``gate_loss`` multiplies each row's policy loss by
its weight (0 on removed rollouts and on demonstrations); ``loss_objectives`` adds the SFT term with
the ``token`` normaliser. Removed rollouts stay in the trainer's batch with weight 0 (a trainer's batch
has a fixed shape): with ``renormalise`` the weight of an RL row is ``T / T_RL`` (tokens of the batch
over tokens of RL rows) when the trainer averages over tokens, ``N / N_RL`` (rows) when it averages
per sequence, so that ``L_GRPO`` is the mean over the RL rows as in the paper's code, which drops the
other rows from the batch. The SFT weight of a demonstration row is ``T / D`` (``D`` its batch's
demonstration tokens): the ``token`` normaliser divides by ``T``, which leaves the mean over
demonstration tokens.

Shapes: ``N`` rows (generated and injected), ``G`` groups, ``B`` rows of a loss micro-batch, ``T``
completion tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpo_plugins import (FINITE, NON_NEGATIVE, Example, GRPOBatch, LossInputs, LossTerm, Method, Needs, hookimpl,
                          option)
from grpo_plugins.injection import injected_rows, rows_of_kind
from grpo_plugins.ops import segment_sum
from grpo_plugins.parallel import ParallelContext

DEMONSTRATION = "demonstration"
SFT, BAND, RL = 0, 1, 2
TOKEN_AGGREGATIONS = ("token_mean",)


def prompt_modes(correct: torch.Tensor, gate: int, band: int) -> torch.Tensor:
    """``(G,)`` int64 mode of each prompt from its correct count ``c`` ``(G,)``: SFT (0) when ``c <= gate``,
    the band (1) when ``gate < c <= gate + band``, RL (2) above."""
    return torch.where(correct <= gate, SFT, torch.where(correct <= gate + band, BAND, RL))


def correct_counts(batch: GRPOBatch, threshold: float) -> torch.Tensor:
    """``(G,)`` correct generated rollouts per group (reward >= ``threshold``); injected rows do not count.

    The rewards are the trainer's, before any ``shape_rewards`` (``batch.unshaped_rewards`` in the advantage
    stage; ``batch.rewards`` before it, in ``inject_rows``), so both hooks decide the same modes."""
    rewards = batch.rewards if batch.unshaped_rewards is None else batch.unshaped_rewards
    generated = ~injected_rows(batch.row_data, rewards)
    correct = (rewards >= threshold) & generated
    return segment_sum(correct.long(), batch.group_index, batch.num_groups)


def loss_weights(modes: torch.Tensor, group_index: torch.Tensor, demonstration: torch.Tensor, mask: torch.Tensor,
                 token_aggregation: bool, renormalise: bool,
                 parallel: ParallelContext | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``((N,) policy weight, (N,) SFT weight)`` of every row.

    Args:
        modes: ``(G,)`` each prompt's mode; group_index: ``(N,)``; demonstration: ``(N,)`` bool, the
        injected demonstrations; mask: ``(N, T)`` completion mask; token_aggregation: whether the
        trainer's policy loss averages over tokens (else per sequence); parallel: the batch's
        data-parallel context (the counts are global).

    Policy weight: 1 on generated rows of RL prompts (``T / T_RL`` or ``N / N_RL`` with ``renormalise``),
    0 elsewhere. SFT weight: ``T / D`` on demonstrations, 0 elsewhere (``T`` the batch's tokens, ``D`` its
    demonstration tokens).
    """
    parallel = parallel or ParallelContext()
    tokens = mask.sum(-1)
    rl = (modes.index_select(0, group_index) == RL) & ~demonstration
    counts = torch.stack([tokens.sum(), tokens[rl].sum(), tokens[demonstration].sum(),
                          tokens.new_tensor(float(rl.numel())), rl.sum().to(tokens.dtype)])
    total, rl_tokens, demo_tokens, rows, rl_rows = parallel.all_reduce_sum(counts).unbind()
    policy = rl.to(mask.dtype)
    if renormalise and bool(rl_rows > 0):
        policy = policy * (total / rl_tokens.clamp(min=1) if token_aggregation else rows / rl_rows)
    sft = torch.where(demonstration, total / demo_tokens.clamp(min=1), torch.zeros_like(tokens))
    return policy, sft


@dataclass(frozen=True)
class HPTConfig:
    """HPT (https://arxiv.org/abs/2509.04419)."""

    gate: int = option(0, "gamma (switch_gate): a prompt with at most this many correct rollouts switches to SFT on its "
                       "demonstration. The paper uses 0 for Qwen, 2 for LLaMA.", paper=0, domain=NON_NEGATIVE)
    band: int = option(0, "switch_gate_off - switch_gate: prompts with gate < correct <= gate + band lose their rollouts "
                       "and get no demonstration; 0 disables the band (the paper's default).", paper=0,
                       domain=NON_NEGATIVE)
    sft_coef: float = option(1.0, "c_sft (sft_loss_coef): weight of the SFT loss on demonstrations; 0.3 for "
                             "Qwen2.5-Math-1.5B in the paper.", paper=1.0, domain=NON_NEGATIVE)
    success_threshold: float = option(1.0, "A rollout counts as correct when its reward is at least this (the paper's "
                                      "verifier gives 1 for a correct answer).", paper=1.0, domain=FINITE)
    demonstration_column: str = option("solution", "Dataset column holding each prompt's demonstration (text).")
    renormalise: bool = option(True, "Scale the RL rows' policy loss so that its normaliser counts only RL rows, as the "
                               "paper's code, which removes the other rows from the batch (module docstring).")


class HPT(Method):
    """HPT: per prompt, SFT on an injected demonstration when its rollouts fail, GRPO otherwise."""

    name = "hpt"
    Config = HPTConfig
    paper = "https://arxiv.org/abs/2509.04419"
    plugin_api = ">=1.3,<2"  # GRPOBatch.unshaped_rewards

    @classmethod
    def example(cls) -> Example:
        return Example(config={"gate": 1}, columns={"solution": lambda pid: f"the answer to {pid} is {pid + 1}"},
                       reward_values=(0.0, 1.0))

    def needs(self) -> Needs:
        return Needs(columns={self.config.demonstration_column}, batch_fields={"rows"}, loss_fields={"row_data"},
                     why={self.config.demonstration_column: "the demonstration injected for prompts in SFT mode"})

    # ------------------------------------------------------------------ after scoring
    @hookimpl
    def inject_rows(self, batch: GRPOBatch) -> list[dict]:
        """One demonstration for every prompt in SFT mode (kind ``"demonstration"``, scored by the trainer)."""
        modes = prompt_modes(correct_counts(batch, self.config.success_threshold), self.config.gate, self.config.band)
        sft = (modes == SFT).nonzero().flatten()
        if not len(sft):
            return []
        column = self.config.demonstration_column
        first = torch.full((batch.num_groups,), batch.num_completions, dtype=torch.long, device=batch.group_index.device)
        first = first.scatter_reduce(0, batch.group_index, torch.arange(batch.num_completions, device=first.device),
                                     reduce="amin")
        rows = []
        for group in sft.tolist():
            row = (batch.rows or [{}] * batch.num_completions)[int(first[group])]
            text = row.get(column)
            if not isinstance(text, str) or not text:
                raise ValueError(f"hpt: prompt id {int(batch.group_prompt_ids[group])} is in SFT mode but its dataset "
                                 f"row has no demonstration in column '{column}' (got {text!r:.60})")
            rows.append({"prompt_id": int(batch.group_prompt_ids[group]), "completion": text, "kind": DEMONSTRATION})
        return rows

    # ------------------------------------------------------------------ advantage stage
    @hookimpl
    def adjust_advantages(self, batch: GRPOBatch, advantages: torch.Tensor) -> torch.Tensor:
        """Unchanged advantages; attaches each row's policy and SFT weights (``row_data['hpt_policy_weight']``,
        ``row_data['hpt_sft_weight']``) and logs the prompts' modes."""
        modes = prompt_modes(correct_counts(batch, self.config.success_threshold), self.config.gate, self.config.band)
        demonstration = rows_of_kind(batch.row_data, DEMONSTRATION, batch.rewards)
        settings = self.context.settings if self.context is not None else {}
        token_aggregation = settings.get("loss_aggregation", "token_mean") in TOKEN_AGGREGATIONS
        policy, sft = loss_weights(modes, batch.group_index, demonstration, batch.token_mask, token_aggregation,
                                   self.config.renormalise, batch.parallel)
        batch.row_data["hpt_policy_weight"] = policy
        batch.row_data["hpt_sft_weight"] = sft
        groups = max(batch.num_groups, 1)
        self.log_metric("sft_prompts", float((modes == SFT).sum()) / groups)
        self.log_metric("band_prompts", float((modes == BAND).sum()) / groups)
        self.log_metric("rl_prompts", float((modes == RL).sum()) / groups)
        self.log_metric("demonstrations", float(demonstration.sum()))
        return advantages

    # ------------------------------------------------------------------ loss stage
    @hookimpl
    def gate_loss(self, inputs: LossInputs) -> torch.Tensor:
        """``(B, 1)`` each row's policy weight: 0 on removed rollouts and demonstrations."""
        return inputs.row_data["hpt_policy_weight"].to(inputs.log_probs.dtype).unsqueeze(-1)

    @hookimpl
    def loss_objectives(self, inputs: LossInputs) -> dict[str, LossTerm]:
        """``c_sft * w * (-log pi)`` per token, ``w`` the SFT weight (``T / D`` on demonstrations), normaliser
        ``token``: the batch's mean negative log-likelihood over demonstration tokens."""
        weight = inputs.row_data["hpt_sft_weight"].to(inputs.log_probs.dtype).unsqueeze(-1)
        keep = (inputs.mask > 0) & (weight > 0)
        nll = torch.where(keep, -inputs.log_probs, torch.zeros((), dtype=inputs.log_probs.dtype,
                                                              device=inputs.log_probs.device))
        return {"sft": LossTerm(self.config.sft_coef * weight * nll, "token")}
