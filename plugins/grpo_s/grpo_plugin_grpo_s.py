"""GRPO-S: GRPO with dynamic reward scaling, from DR-IRL (Cheng et al., 2025, arXiv:2503.18991).

DR-IRL trains category-specific reward models by inverse RL (offline), then aligns the policy with
GRPO-S, which scales each prompt's learning signal by its difficulty: a *data-level hardness* (how far
the prompt lies from its category's safe demonstration in a text encoder's space) and a *model-level
responsiveness* (how far the policy's current rewards lag behind the demonstration's reward):

    h_data(x)  = clip(1 - cos(e(x), e(x_ref)), 0, 1)            e: a text encoder (CLIP's text tower)
    h_model(x) = sigmoid(k (r_ref(x) - mean_i r(y_i)))          mean over the prompt's group
    s(x)       = 1 + alpha h_data(x) + beta h_model(x)          alpha = beta = k = 1

applied either to the reward, ``r'_i = s(x) r_i`` (``apply_to="reward"``, the paper's wording), or to
the advantage, ``A'_i = s(x) A_i`` (``apply_to="advantage"``, the default). With mean-centred
advantages (``A = r - mean``, Dr. GRPO) the two are identical; with GRPO's std normalisation a
per-prompt factor on the reward cancels exactly, so only the advantage form keeps the paper's effect. The
reward form therefore refuses the built-in ``grpo`` estimator (a no-op under its default group std scaling,
the advantage form under ``scale="none"``) and ``gdpo`` at start-up.

The per-prompt inputs come from dataset columns (the encoder and the reward model run offline): the
prompt's and the reference's embeddings (or a precomputed hardness) and the reference reward
``r_ref``. Shapes: ``N`` completions, ``G`` groups, ``D`` embedding width, ``T`` completion tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from grpo_plugins import NON_NEGATIVE, POSITIVE, GRPOBatch, Method, hookimpl, option
from grpo_plugins import Example, Needs
from grpo_plugins.ops import segment_mean


def first_of_group(index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``(G,)`` the batch position of the first member of each group (``index`` ``(N,)`` in ``[0, G)``, every
    group non-empty)."""
    positions = torch.arange(index.numel(), device=index.device)
    first = torch.full((num_groups,), index.numel(), dtype=torch.long, device=index.device)
    return first.scatter_reduce_(0, index, positions, reduce="amin")


def data_hardness(embeddings: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """``clip(1 - cos(e, e_ref), 0, 1)`` -> ``(N,)`` from ``(N, D)`` prompt and reference embeddings."""
    cosine = F.cosine_similarity(embeddings.double(), references.double(), dim=-1)
    return (1.0 - cosine).clamp(0.0, 1.0).to(embeddings.dtype)


def model_responsiveness(
    reference_rewards: torch.Tensor, rewards: torch.Tensor, index: torch.Tensor, num_groups: int, sharpness: float = 1.0
) -> torch.Tensor:
    """``sigmoid(k (r_ref - mean_g r))`` -> ``(N,)``.

    Args:
        reference_rewards: ``(N,)`` the reward of each completion's prompt's demonstration.
        rewards: ``(N,)`` the policy's rewards.
        index: ``(N,)`` group of each completion in ``[0, G)``.
        num_groups: ``G``.
        sharpness: ``k``.
    """
    group_mean = segment_mean(rewards, index, num_groups).index_select(0, index)
    return torch.sigmoid(sharpness * (reference_rewards - group_mean))


def difficulty_scale(
    hardness: torch.Tensor, responsiveness: torch.Tensor, alpha: float = 1.0, beta: float = 1.0
) -> torch.Tensor:
    """``s = 1 + alpha h_data + beta h_model`` -> ``(N,)``, each in ``[1, 1 + alpha + beta]``."""
    return 1.0 + alpha * hardness + beta * responsiveness


@dataclass(frozen=True)
class GRPOSConfig:
    """GRPO-S (DR-IRL, arXiv:2503.18991): scale each prompt's signal by data hardness and model responsiveness."""

    apply_to: Literal["advantage", "reward"] = option(
        "advantage",
        "Multiply the scale into the advantage (A' = s A: keeps its effect under GRPO's std normalisation) or into "
        "the reward (r' = s r, the paper's wording: cancels under std normalisation, so use it with mean-centred "
        "advantages, e.g. TRL scale_rewards='none'). Identical under mean-centred advantages.",
        paper="reward",
    )
    data_hardness: Literal["embeddings", "column"] = option(
        "embeddings",
        "Where h_data comes from: 'embeddings' computes clip(1 - cos, 0, 1) from the embedding_column and "
        "reference_embedding_column of each row (the paper's form); 'column' reads a precomputed value in [0, 1] "
        "from hardness_column.",
    )
    hardness_weight: float = option(
        1.0, "alpha: weight of the data hardness in the scale (inferred: 1).", domain=NON_NEGATIVE
    )
    responsiveness_weight: float = option(
        1.0, "beta: weight of the model responsiveness in the scale (inferred: 1).", domain=NON_NEGATIVE
    )
    gap_sharpness: float = option(
        1.0, "k: slope of the sigmoid of the reward gap r_ref - mean r (inferred: 1).", domain=POSITIVE
    )
    embedding_column: str = option(
        "prompt_embedding", "Dataset column: the prompt's text-encoder embedding (a list of D floats)."
    )
    reference_embedding_column: str = option(
        "reference_embedding",
        "Dataset column: the embedding of the prompt's reference (its category's safe demonstration).",
    )
    hardness_column: str = option("hardness", "Dataset column read when data_hardness='column': h_data in [0, 1].")
    reference_reward_column: str = option(
        "reference_reward", "Dataset column: r_ref, the reward of the prompt's demonstration under the run's reward."
    )


class GRPOS(Method):
    """GRPO-S (DR-IRL): scale each prompt's advantage or reward by 1 + data hardness + model responsiveness."""

    name = "grpo_s"
    Config = GRPOSConfig
    paper = "https://arxiv.org/abs/2503.18991"

    @classmethod
    def example(cls) -> Example:
        """The conformance suite's example run (see grpo_plugins.example)."""
        return Example(
            columns={
                "prompt_embedding": lambda row: [1.0, (row % 5) / 5, 0.5],
                "reference_embedding": lambda row: [1.0, 0.2, (row % 3) / 3],
                "reference_reward": lambda row: (row % 4) / 4,
            },
        )

    def needs(self) -> Needs:
        """The dataset columns this config reads; with ``apply_to="reward"`` the estimators under which the
        reward form is a no-op or a copy of the advantage form are refused."""
        c, columns = self.config, set()
        if c.hardness_weight > 0:
            embeddings = {c.embedding_column, c.reference_embedding_column}
            columns |= embeddings if c.data_hardness == "embeddings" else {c.hardness_column}
        if c.responsiveness_weight > 0:
            columns.add(c.reference_reward_column)
        if c.apply_to != "reward":
            return Needs(columns=columns)
        return Needs(columns=columns, excludes={"grpo", "gdpo"}, why={
            "grpo": "grpo_s apply_to='reward' with the built-in grpo estimator: under its group std scaling "
                    "(scale='group', the default) the per-prompt factor s(x) cancels exactly, and under scale='none' "
                    "the reward form equals apply_to='advantage'; set apply_to='advantage' (or pair the reward form "
                    "with another advantage estimator)",
            "gdpo": "grpo_s apply_to='reward': gdpo z-scores every reward within its group (the factor s(x) "
                    "cancels) or reads the reward components (the scaled reward is dropped); set apply_to='advantage'",
        })

    def requires(self) -> set[str]:
        """The dataset rows, which carry the per-prompt columns."""
        return {"rows"}

    def disabled_hooks(self) -> set[str]:
        """Only the hook of the configured ``apply_to`` runs."""
        return {"adjust_advantages"} if self.config.apply_to == "reward" else {"shape_rewards"}

    @hookimpl
    def shape_rewards(self, batch: GRPOBatch, rewards: torch.Tensor) -> torch.Tensor:
        """``(N,)`` ``s(x) r`` (``apply_to="reward"``)."""
        return self.scale(batch, rewards) * rewards

    @hookimpl
    def adjust_advantages(self, batch: GRPOBatch, advantages: torch.Tensor) -> torch.Tensor:
        """``(N,)`` or ``(N, T)`` ``s(x) A`` (``apply_to="advantage"``; the responsiveness reads ``batch.rewards``)."""
        scale = self.scale(batch, batch.rewards).to(advantages.dtype)
        return advantages * (scale if advantages.dim() == 1 else scale[:, None])

    def scale(self, batch: GRPOBatch, rewards: torch.Tensor) -> torch.Tensor:
        """``(N,)`` the difficulty scale ``s(x)`` of each completion's prompt."""
        config, index, groups = self.config, batch.group_index, batch.num_groups
        hardness = torch.zeros_like(rewards)
        if config.hardness_weight > 0:
            if config.data_hardness == "embeddings":
                embeddings = self._column(batch, config.embedding_column, "embedding_column", vector=True)
                references = self._column(
                    batch, config.reference_embedding_column, "reference_embedding_column", vector=True
                )
                if embeddings.shape != references.shape:
                    raise ValueError(
                        f"embedding_column '{config.embedding_column}' has width {embeddings.shape[1]} but "
                        f"reference_embedding_column '{config.reference_embedding_column}' has {references.shape[1]}"
                    )
                hardness = data_hardness(embeddings, references).to(rewards)
            else:
                hardness = self._column(batch, config.hardness_column, "hardness_column").to(rewards)
                if not bool(((hardness >= 0) & (hardness <= 1)).all()):
                    raise ValueError(f"hardness_column '{config.hardness_column}' must hold values in [0, 1]")
        responsiveness = torch.zeros_like(rewards)
        if config.responsiveness_weight > 0:
            reference = self._column(batch, config.reference_reward_column, "reference_reward_column").to(rewards)
            responsiveness = model_responsiveness(reference, rewards, index, groups, config.gap_sharpness)
        scale = difficulty_scale(hardness, responsiveness, config.hardness_weight, config.responsiveness_weight)
        with torch.no_grad():
            self.log_metric("mean_scale", scale.mean())
            self.log_metric("max_scale", scale.max())
            self.log_metric("mean_data_hardness", hardness.mean())
            self.log_metric("mean_responsiveness", responsiveness.mean())
        return scale

    def _column(self, batch: GRPOBatch, column: str, setting: str, vector: bool = False) -> torch.Tensor:
        """``(N,)`` (or ``(N, D)`` with ``vector``) values of a per-prompt dataset column, read from the first
        row of each prompt's group (``G`` rows, not ``N``) and checked: present, numeric and finite."""
        if batch.rows is None:
            raise ValueError(
                f"GRPO-S reads the per-prompt column {setting}='{column}', but the batch carries no dataset rows"
            )
        rows = [batch.rows[i] for i in first_of_group(batch.group_index, batch.num_groups).tolist()]  # one per prompt
        missing = [row for row in rows if column not in row]
        if missing:
            raise ValueError(
                f"{setting}='{column}' is not a column of the dataset (rows have {sorted(missing[0])}); add it to the "
                f"training dataset, or set {setting} to the column that holds it"
            )
        try:
            values = torch.tensor([row[column] for row in rows], dtype=torch.float64)
        except (TypeError, ValueError) as error:
            shape = "a list of D floats per row" if vector else "one number per row"
            raise ValueError(f"{setting}='{column}' must hold {shape}: {error}") from error
        if values.dim() != (2 if vector else 1):
            kind = "a vector" if vector else "a number"
            raise ValueError(f"{setting}='{column}' must hold {kind} per row, got shape {tuple(values.shape)[1:]}")
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"{setting}='{column}' holds NaN or inf")
        return values.float().index_select(0, batch.group_index)
