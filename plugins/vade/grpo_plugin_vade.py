"""VADE: variance-aware dynamic sampling from an online per-prompt difficulty posterior.

Hu et al., 2025 (arXiv:2511.18902). Every prompt ``i`` keeps a Beta posterior ``Beta(alpha_i, beta_i)``
over its success probability, relaxed toward the prior ``Beta(a0, b0)`` on two scales:

    time:   at step t,      alpha <- a0 + lam_g^(t - t_i) (alpha - a0)        (same for beta)
    visit:  at each update, alpha <- a0 + lam_v (alpha - a0) + c,  beta <- b0 + lam_v (beta - b0) + (G - c)

(``c`` successes among the prompt's ``G`` completions, ``t_i`` the step of its last update). Before
each round, Thompson sampling draws ``theta_i ~ Beta(alpha_i, beta_i)`` for every candidate, scores it
by the reward variance ``theta_i (1 - theta_i)`` and keeps the ``P`` best: prompts whose outcome is
most uncertain carry the most learning signal, and the draw keeps exploring uncertain ones.

Shapes: ``D`` tracked prompts, ``C`` candidates, ``P`` prompts in a round, ``N`` completions, ``G`` groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpo_plugins import FINITE, NON_NEGATIVE, POSITIVE, GRPOBatch, Method, PromptRound, Range, hookimpl, option
from grpo_plugins.ops import segment_sum
from grpo_plugins.prompt_table import PromptTable

# --------------------------------------------------------------------------------------------- maths


def time_decay(
    alpha: torch.Tensor, beta: torch.Tensor, elapsed: torch.Tensor, decay: float, prior_alpha: float, prior_beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Relax ``(alpha, beta)`` toward the prior by ``decay ** elapsed`` steps, all ``(D,)``."""
    factor = torch.pow(torch.as_tensor(decay, dtype=alpha.dtype), elapsed.to(alpha.dtype))
    return prior_alpha + factor * (alpha - prior_alpha), prior_beta + factor * (beta - prior_beta)


def visit_update(
    alpha: torch.Tensor,
    beta: torch.Tensor,
    successes: torch.Tensor,
    trials: torch.Tensor,
    decay: float,
    prior_alpha: float,
    prior_beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior after one visit: ``(a0 + lam_v (alpha - a0) + c, b0 + lam_v (beta - b0) + G - c)``, all ``(G,)``."""
    return (
        prior_alpha + decay * (alpha - prior_alpha) + successes,
        prior_beta + decay * (beta - prior_beta) + (trials - successes),
    )


def expected_variance_score(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``E[theta (1 - theta)] = alpha beta / ((alpha + beta)(alpha + beta + 1))`` under ``Beta(alpha, beta)``."""
    total = alpha + beta
    return alpha * beta / (total * (total + 1))


def sample_gamma(shape: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One ``Gamma(shape, 1)`` draw per element of ``shape`` (any shape, > 0), using ``generator`` only.

    Marsaglia & Tsang's squeeze-rejection method, vectorised (each round redraws only the rejected
    entries; acceptance is above 95%); shapes below 1 use ``Gamma(a + 1) * U^(1/a)``.
    """
    a = shape.double().reshape(-1)
    boost = a < 1
    d = torch.where(boost, a + 1, a) - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.empty_like(a)
    pending = torch.arange(a.numel())
    while pending.numel():
        x = torch.randn(pending.numel(), dtype=torch.float64, generator=generator)
        u = torch.rand(pending.numel(), dtype=torch.float64, generator=generator)
        v = (1 + c[pending] * x) ** 3
        accept = (v > 0) & (torch.log(u) < 0.5 * x**2 + d[pending] * (1 - v + torch.log(v.clamp(min=1e-300))))
        out[pending[accept]] = (d[pending] * v)[accept]
        pending = pending[~accept]
    if bool(boost.any()):
        u = torch.rand(int(boost.sum()), dtype=torch.float64, generator=generator)
        out[boost] = out[boost] * u.pow(1.0 / a[boost])
    return out.reshape(shape.shape)


def sample_beta(alpha: torch.Tensor, beta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One ``Beta(alpha, beta)`` draw per element, ``X / (X + Y)`` with ``X ~ Gamma(alpha)``, ``Y ~ Gamma(beta)``."""
    x = sample_gamma(alpha, generator)
    y = sample_gamma(beta, generator)
    total = x + y
    return torch.where(total > 0, x / total.clamp(min=1e-300), (alpha / (alpha + beta)).double())


def thompson_select(
    alpha: torch.Tensor, beta: torch.Tensor, num_selected: int, generator: torch.Generator
) -> torch.Tensor:
    """Indices ``(P,)`` of the candidates ``(C,)`` with the largest sampled ``theta (1 - theta)``.

    With more selections than candidates the ranking repeats from the top.
    """
    theta = sample_beta(alpha, beta, generator)
    order = torch.topk(theta * (1 - theta), min(num_selected, theta.numel())).indices
    return order[torch.arange(num_selected) % order.numel()]


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class VADEConfig:
    """VADE (Hu et al., 2025, arXiv:2511.18902); decay constants inferred (the paper's code is not public)."""

    prior_alpha: float = option(
        1.0, "a0: prior successes of Beta(a0, b0), also the level decay relaxes toward.", domain=POSITIVE
    )
    prior_beta: float = option(1.0, "b0: prior failures.", domain=POSITIVE)
    time_decay: float = option(
        0.99, "lam_g in (0, 1]: evidence keeps lam_g^(steps since the last update) of its weight.",
        domain=Range(0, 1, low_open=True),
    )
    visit_decay: float = option(
        1.0, "lam_v in (0, 1]: evidence kept at each new visit before adding it.", domain=Range(0, 1, low_open=True)
    )
    pool_size: int = option(
        0, "Candidates scored per round: 0 = the whole dataset; else a uniform random pool of this many (at least P).",
        domain=NON_NEGATIVE,
    )
    reward_range: tuple[float, float] = option(
        (0.0, 1.0), "Rewards are mapped from this range onto [0, 1] (and clipped) to count successes.", domain=FINITE
    )

    def __post_init__(self):
        if self.prior_alpha <= 0 or self.prior_beta <= 0:
            raise ValueError("prior_alpha and prior_beta must be > 0")
        if not (0 < self.time_decay <= 1 and 0 < self.visit_decay <= 1):
            raise ValueError(f"time_decay and visit_decay must be in (0, 1], got {self.time_decay}, {self.visit_decay}")
        if self.pool_size < 0:
            raise ValueError("pool_size must be >= 0")
        if not self.reward_range[1] > self.reward_range[0]:
            raise ValueError(f"reward_range must be (low, high) with high > low, got {self.reward_range}")


# --------------------------------------------------------------------------------------------- method


class VADE(Method):
    """VADE: Thompson-sample prompts with the most expected reward variance from decaying Beta posteriors."""

    name = "vade"
    Config = VADEConfig
    paper = "https://arxiv.org/abs/2511.18902"

    def __init__(self, config=None):
        super().__init__(config)
        c = self.config
        self.table = PromptTable(
            alpha=(c.prior_alpha, torch.float64, ()),  # as of the last update
            beta=(c.prior_beta, torch.float64, ()),
            updated_at=(0, torch.int64, ()),  # step of the last update
        )

    def posterior(self, prompt_ids: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Time-decayed ``(alpha, beta)`` ``(P,)`` of ``prompt_ids`` as of ``step``; the state is unchanged."""
        table = self.table
        columns = (table.get(name, prompt_ids) for name in ("alpha", "beta", "updated_at"))
        return self._decayed(*columns, step)

    def _decayed(
        self, alpha: torch.Tensor, beta: torch.Tensor, updated_at: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`time_decay` of stored ``(alpha, beta)`` last updated at ``updated_at`` (all ``(P,)``) to ``step``."""
        c = self.config
        return time_decay(alpha, beta, (step - updated_at).clamp(min=0), c.time_decay, c.prior_alpha, c.prior_beta)

    @hookimpl
    def sample_prompts(self, round: PromptRound, generator: torch.Generator) -> torch.Tensor:
        """``(P,)`` dataset indices: Thompson-sampled top-P by ``theta (1 - theta)`` among the candidates."""
        size, pool = round.dataset_size, self.config.pool_size
        if pool and pool < size:
            candidates = torch.randperm(size, generator=generator)[: max(pool, round.num_prompts)]
        else:
            candidates = torch.arange(size)
        alpha, beta = self.posterior(candidates, round.step)
        chosen = thompson_select(alpha, beta, round.num_prompts, generator)
        self.log_metric("selected_expected_variance", expected_variance_score(alpha[chosen], beta[chosen]).mean())
        self.log_metric("pool_expected_variance", expected_variance_score(alpha, beta).mean())
        return candidates[chosen]

    @hookimpl
    def observe(self, batch: GRPOBatch, step: int) -> None:
        """Decay each visited prompt's posterior to ``step`` and add the group's successes and failures."""
        low, high = self.config.reward_range
        rewards = (batch.rewards.double() - low) / (high - low)
        if not bool(torch.isfinite(rewards).all()):
            raise ValueError("rewards contain NaN/inf; the posterior cannot be updated")
        ids, c, col = batch.group_prompt_ids, self.config, self.table.columns
        rows = self.table.rows(ids)  # one lookup; unseen prompts are inserted with the prior, as get() reads them
        alpha, beta = self._decayed(*(col[name][rows].to(ids.device) for name in ("alpha", "beta", "updated_at")), step)
        successes = segment_sum(rewards.clamp(0, 1), batch.group_index, batch.num_groups)
        trials = batch.group_sizes.double()
        alpha, beta = visit_update(alpha, beta, successes, trials, c.visit_decay, c.prior_alpha, c.prior_beta)
        col["alpha"][rows], col["beta"][rows] = alpha, beta
        col["updated_at"][rows] = step
        mixed = (successes > 0) & (successes < trials)
        self.log_metric("mixed_group_fraction", mixed.double().mean())

    def state_dict(self) -> dict:
        return self.table.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.table.load_state_dict(state)
