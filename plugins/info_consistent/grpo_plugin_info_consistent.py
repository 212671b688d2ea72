"""Information-consistent recommendations through GRPO (Prabhune, Padmanabhan & Dutta, 2025, arXiv:2512.12858).

An assistant should give the same information whatever the phrasing of a request. The method puts
K semantically equivalent phrasings ("variants") of one request in one GRPO group, each asked in a
fresh conversation, and rewards completions whose information agrees with the other variants':

    I_k          set of information units (e.g. recommended products) extracted from completion k
    f_q(u)       = share of group q's completions whose set contains u               (u in U_q, the union)
    h(f)         = -(f log f + (1 - f) log(1 - f))                                   (0 at f in {0, 1})
    r_stab_k     = -(1 / |I_k|) sum_{u in I_k} h(f_q(u))                             (0 for an empty set)
                   (card); or, with stability='agreement',
                   -(1 / |U_q|) sum_{u in U_q} |1[u in I_k] - f_q(u)|
    r_help_k     = coverage |I_k & relevant| / |relevant|, or min(|I_k| / target, 1), or the
                   trainer's reward clipped to [0, 1]
    R_k          = lambda_h r_help_k + lambda_s r_stab_k,  then plain GRPO within the group
    H_q          = (1 / |U_q|) sum_{u in U_q} h(f_q(u))                              (logged: 0 = consistent)

Groups are keyed by the request, not by the dataset row: every variant row carries the request's id
in a ``prompt_id`` column, which the adapters use as the group key. ``sample_prompts`` draws whole
requests (the K contiguous variant rows of each), ``augment_prompts`` resets each variant's
conversation, ``shape_rewards`` forms ``R``.

Shapes: ``N`` completions, ``G`` groups (requests), ``E`` (completion, unit) pairs, ``U`` distinct
units in the batch, ``D`` dataset rows, ``K`` variants per request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

from grpo_plugins import NON_NEGATIVE, GRPOBatch, Method, PromptRound, Range, hookimpl, option
from grpo_plugins import Example, Needs
from grpo_plugins.ops import segment_count, segment_sum

GROUP_COLUMN = "prompt_id"

# --------------------------------------------------------------------------------------------- maths


def binary_entropy(f: torch.Tensor) -> torch.Tensor:
    """``h(f) = -(f log f + (1 - f) log(1 - f))`` elementwise, exactly 0 at ``f`` = 0 or 1 (natural log)."""
    return -(torch.special.xlogy(f, f) + torch.special.xlogy(1 - f, 1 - f))


def unit_frequencies(
    rows: torch.Tensor, units: torch.Tensor, index: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each group's share of completions holding each of its units.

    ``rows``, ``units``: ``(E,)`` int64 distinct (completion, unit) pairs; ``index``: ``(N,)`` group of
    each completion. Returns ``pair_frequency`` ``(E,)`` (``f_q(u)`` of each pair's group and unit),
    and, per distinct (group, unit), ``key_group`` and ``key_frequency`` (both ``(M,)``).
    """
    width = int(units.max()) + 1 if units.numel() else 1
    group = index[rows]
    keys, inverse, counts = torch.unique(group * width + units, return_inverse=True, return_counts=True)
    key_group = torch.div(keys, width, rounding_mode="floor")
    sizes = segment_count(index, num_groups)
    key_frequency = counts.double() / sizes[key_group].double()
    return key_frequency[inverse], key_group, key_frequency


def stability_rewards(
    rows: torch.Tensor, units: torch.Tensor, index: torch.Tensor, num_groups: int
) -> torch.Tensor:
    """``(N,)`` ``r_stab_k = -mean_{u in I_k} h(f_q(u))``; a completion without units gets 0.

    ``rows``, ``units``: ``(E,)`` distinct (completion, unit) pairs; ``index``: ``(N,)`` groups.
    """
    n = index.shape[0]
    pair_frequency, _, _ = unit_frequencies(rows, units, index, num_groups)
    total = segment_sum(binary_entropy(pair_frequency), rows, n)
    return -total / segment_count(rows, n).clamp(min=1).double()


def agreement_rewards(
    rows: torch.Tensor, units: torch.Tensor, index: torch.Tensor, num_groups: int
) -> torch.Tensor:
    """``(N,)`` ``-(1 / |U_q|) sum_{u in U_q} |1[u in I_k] - f_q(u)|``: minus the mean distance of the
    completion's unit indicator to its group's unit frequencies (0 when every completion agrees).

    Computed from the pairs as ``sum_{u in I_k} (1 - 2 f_q(u)) + sum_{u in U_q} f_q(u)``.
    """
    n = index.shape[0]
    pair_frequency, key_group, key_frequency = unit_frequencies(rows, units, index, num_groups)
    own = segment_sum(1 - 2 * pair_frequency, rows, n)
    group_total = segment_sum(key_frequency, key_group, num_groups)
    union = segment_count(key_group, num_groups).clamp(min=1).double()
    return -(own + group_total[index]) / union[index]


def group_instability(
    rows: torch.Tensor, units: torch.Tensor, index: torch.Tensor, num_groups: int
) -> torch.Tensor:
    """``(G,)`` ``H_q = mean_{u in U_q} h(f_q(u))``: 0 when every completion of the group gives the same set."""
    _, key_group, key_frequency = unit_frequencies(rows, units, index, num_groups)
    total = segment_sum(binary_entropy(key_frequency), key_group, num_groups)
    return total / segment_count(key_group, num_groups).clamp(min=1).double()


def coverage(
    rows: torch.Tensor, units: torch.Tensor, relevant_rows: torch.Tensor, relevant_units: torch.Tensor, n: int
) -> torch.Tensor:
    """``(N,)`` ``|I_k & relevant_k| / |relevant_k|`` from distinct pairs (0 where nothing is relevant).

    ``rows``/``units`` ``(E,)`` and ``relevant_rows``/``relevant_units`` ``(F,)`` index one shared unit vocabulary.
    """
    width = int(torch.cat([units, relevant_units]).max()) + 1 if units.numel() + relevant_units.numel() else 1
    hit = torch.isin(rows * width + units, relevant_rows * width + relevant_units)
    covered = segment_sum(hit.double(), rows, n)
    return covered / segment_count(relevant_rows, n).clamp(min=1).double()


def unit_count(rows: torch.Tensor, n: int, target: int) -> torch.Tensor:
    """``(N,)`` ``min(|I_k| / target, 1)``."""
    return (segment_count(rows, n).double() / target).clamp(max=1.0)


def token_units(completion_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct (completion, token id) pairs of the real tokens -> ``rows``, ``units`` ``(E,)`` (units dense)."""
    n, t = completion_ids.shape
    real = mask > 0
    rows = torch.arange(n, device=completion_ids.device).unsqueeze(1).expand(n, t)[real]
    ids = completion_ids[real].long()
    _, units = torch.unique(ids, return_inverse=True)
    width = int(units.max()) + 1 if units.numel() else 1
    pairs = torch.unique(rows * width + units)
    return torch.div(pairs, width, rounding_mode="floor"), pairs % width


# --------------------------------------------------------------------------------------------- text


def normalise_unit(text: str) -> str:
    """A unit as compared: lower case, inner whitespace collapsed, ends stripped."""
    return " ".join(text.split()).lower()


def extract_units(text: Any, pattern: re.Pattern) -> list[str]:
    """The distinct normalised units ``pattern`` finds in ``text`` (a string, a list of units, or a chat message list)."""
    if isinstance(text, (list, tuple)):
        if text and isinstance(text[-1], dict):  # a chat completion: its last message's content
            text = text[-1].get("content") or ""
        else:
            return sorted({u for u in (normalise_unit(str(x)) for x in text) if u})
    return sorted({u for u in (normalise_unit(m) for m in pattern.findall(str(text or ""))) if u})


def pairs_of(unit_lists: Sequence[list[str]], vocabulary: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows``, ``units`` ``(E,)`` int64 of per-completion unit lists, growing ``vocabulary`` as units appear."""
    rows = [i for i, units in enumerate(unit_lists) for _ in units]
    ids = [vocabulary.setdefault(u, len(vocabulary)) for units in unit_lists for u in units]
    return torch.tensor(rows, dtype=torch.long), torch.tensor(ids, dtype=torch.long)


def reset_conversation(prompt: Any) -> Any:
    """A chat prompt reduced to its system messages and its last user message (a fresh conversation);
    a plain-string prompt is returned unchanged."""
    if isinstance(prompt, str) or not isinstance(prompt, (list, tuple)):
        return prompt
    users = [i for i, m in enumerate(prompt) if m.get("role") == "user"]
    keep = {i for i, m in enumerate(prompt) if m.get("role") == "system"} | set(users[-1:])
    return [dict(m) for i, m in enumerate(prompt) if i in keep]


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class InfoConsistentConfig:
    """Information-consistent GRPO (arXiv:2512.12858); the paper's code is not public and the card's
    maths is inferred: every inferred choice is an option (see the README)."""

    pair_prompts: bool = option(
        True, "Provide sample_prompts: draw whole requests (their K contiguous variant rows); false leaves the slot free."
    )
    variants_per_request: int = option(
        3, "K: variant rows per request; the dataset holds each request's K rows contiguously, sharing a prompt_id.",
        paper=3, domain=Range(1),
    )
    rollouts_per_variant: int = option(
        1, "Completions per variant (the card: one); a round takes budget / (K * this) requests.", domain=Range(1)
    )
    reset_context: bool = option(
        True, "Ask each variant in a fresh conversation: chat prompts keep only system messages and the last user turn."
    )
    units: Literal["text", "tokens"] = option(
        "text", "Information units: 'text' = matches of unit_pattern in the completion; 'tokens' = its distinct token ids."
    )
    unit_pattern: str = option(
        r"[^,;\n]+", "Regular expression whose matches in a completion are its units (default: comma/semicolon/line items)."
    )
    stability: Literal["entropy", "agreement"] = option(
        "entropy",
        "r_stab: 'entropy' = -mean over the completion's units of h(f) (the card); 'agreement' = minus the mean "
        "distance of the completion's units to the group's unit frequencies (rewards the majority; see README).",
    )
    helpfulness: Literal["coverage", "unit_count", "reward"] = option(
        "coverage",
        "r_help: 'coverage' of the row's relevant units (column relevant_column), 'unit_count' = min(|I| / target_units, 1), "
        "or 'reward' = the trainer's reward clipped to [0, 1].",
    )
    relevant_column: str = option(
        "relevant_units", "Dataset column listing a request's relevant units (helpfulness='coverage')."
    )
    target_units: int = option(5, "Units that make a complete answer (helpfulness='unit_count').", domain=Range(1))
    helpfulness_weight: float = option(1.0, "lambda_h.", domain=NON_NEGATIVE)
    stability_weight: float = option(1.0, "lambda_s.", domain=NON_NEGATIVE)
    trainer_reward: Literal["error", "add", "ignore"] = option(
        "error",
        "With helpfulness 'coverage' or 'unit_count' (which do not read the incoming reward: the trainer's reward "
        "functions, after any earlier shape_rewards): 'error' refuses a batch whose incoming reward is not all 0 "
        "(it would be discarded), 'add' adds it to R, 'ignore' drops it (the card's R). Must stay 'error' with "
        "helpfulness='reward', where the incoming reward is r_help.",
        paper="ignore",
    )

    def __post_init__(self):
        try:
            re.compile(self.unit_pattern)
        except re.error as error:
            raise ValueError(f"unit_pattern is not a regular expression: {error}") from error
        if self.helpfulness_weight == 0 and self.stability_weight == 0:
            raise ValueError("helpfulness_weight and stability_weight are both 0: every reward would be 0")
        if self.helpfulness == "reward" and self.trainer_reward != "error":
            raise ValueError(f"trainer_reward='{self.trainer_reward}' has no meaning with helpfulness='reward', where "
                             "the trainer's reward is r_help; leave trainer_reward at 'error'")


# --------------------------------------------------------------------------------------------- method


class InfoConsistent(Method):
    """Information-consistent GRPO: paraphrase variants of a request form one group; agreement is rewarded."""

    name = "info_consistent"
    Config = InfoConsistentConfig
    paper = "https://arxiv.org/abs/2512.12858"

    @classmethod
    def example(cls) -> Example:
        """The conformance suite's example run (see grpo_plugins.example)."""
        return Example(
            columns={"prompt_id": lambda row: row // 3, "relevant_units": lambda row: "apples, pears, plums"},
            completions=("apples, pears", "pears; plums", "apples", "figs, apples, plums", ""),
            dataset_size=33,
            rollouts_per_prompt=3,
            config={"trainer_reward": "add"},  # the suite's rewards are not 0: add them to R
        )

    def needs(self) -> Needs:
        """The dataset columns this config reads; ``gdpo`` is refused (it would drop the shaped reward)."""
        return Needs(columns=self.required_columns(), batch_fields={"rows"} if self.config.helpfulness == "coverage" else set(),
                     excludes={"gdpo"}, why={"gdpo": "gdpo normalises the trainer's reward components and never reads "
                                                     "info_consistent's shaped reward R = lambda_h r_help + lambda_s r_stab"})

    def __init__(self, config: InfoConsistentConfig | None = None):
        super().__init__(config)
        self.pattern = re.compile(self.config.unit_pattern)

    def disabled_hooks(self) -> set[str]:
        return set() if self.config.pair_prompts else {"sample_prompts"}

    def requires(self) -> set[str]:
        return {"completion_ids"} if self.config.units == "tokens" else {"completions"}

    # ------------------------------------------------------------------ data checks
    def required_columns(self) -> list[str]:
        """Dataset columns this config reads: the group key, and the relevant units for coverage."""
        return [GROUP_COLUMN] + ([self.config.relevant_column] if self.config.helpfulness == "coverage" else [])

    def check_rows(self, rows: Sequence[dict] | None, where: str) -> None:
        """Raise a clear error naming the method and the column when ``rows`` lack a required column."""
        if rows is None:
            raise ValueError(f"info_consistent needs the dataset rows ({where}) to read {self.required_columns()}; the trainer gave none")
        for column in self.required_columns():
            missing = [i for i, row in enumerate(rows) if column not in row]
            if missing:
                why = "the group key (the request id shared by a request's variant rows)" if column == GROUP_COLUMN else (
                    "the relevant units of helpfulness='coverage' (or set info_consistent's relevant_column / helpfulness)"
                )
                raise ValueError(
                    f"info_consistent needs the dataset column '{column}', {why}; row {missing[0]} has columns "
                    f"{sorted(rows[missing[0]])}"
                )

    def check_blocks(self, rows: Sequence[dict]) -> None:
        """The round's rows come in blocks of K variants of one request: each block shares one prompt_id."""
        k = self.config.variants_per_request
        ids = [row[GROUP_COLUMN] for row in rows]
        if len(ids) % k:
            return  # rows with identical texts are merged by the trainer; nothing to check reliably
        for start in range(0, len(ids), k):
            if len(set(ids[start : start + k])) != 1:
                raise ValueError(
                    f"info_consistent draws K={k} contiguous dataset rows per request, but rows of one draw carry the "
                    f"prompt_ids {ids[start : start + k]}: lay out each request's {k} variant rows contiguously with "
                    "one shared prompt_id, or set variants_per_request"
                )

    # ------------------------------------------------------------------ hooks
    @hookimpl
    def sample_prompts(self, round: PromptRound, generator: torch.Generator) -> torch.Tensor:
        """``(R * K,)`` dataset indices: R requests drawn uniformly without replacement, each as its K
        contiguous variant rows; ``R = budget / (K * rollouts_per_variant)``."""
        k, per_variant = self.config.variants_per_request, self.config.rollouts_per_variant
        if round.dataset_size % k:
            raise ValueError(
                f"info_consistent: the dataset has {round.dataset_size} rows, not a multiple of variants_per_request={k}"
            )
        if round.budget % (k * per_variant):
            raise ValueError(
                f"info_consistent: the round's budget of {round.budget} completions is not a multiple of "
                f"variants_per_request * rollouts_per_variant = {k} * {per_variant}"
            )
        num = round.budget // (k * per_variant)
        requests = round.dataset_size // k
        draws = torch.cat([torch.randperm(requests, generator=generator) for _ in range(-(-num // requests))])[:num]
        return (draws.unsqueeze(1) * k + torch.arange(k)).reshape(-1)

    @hookimpl
    def augment_prompts(self, round: PromptRound, prompt_ids: torch.Tensor, prompts: list, rows: list[dict]) -> list:
        """Check the data, then ask every variant in a fresh conversation (``reset_context``)."""
        self.check_rows(rows, "augment_prompts")
        if self.config.pair_prompts:
            self.check_blocks(rows)
        return [reset_conversation(p) for p in prompts] if self.config.reset_context else list(prompts)

    def _unit_pairs(self, batch: GRPOBatch) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
        if self.config.units == "tokens":
            if batch.completion_ids is None:
                raise ValueError("info_consistent with units='tokens' needs the batch's completion_ids")
            rows, units = token_units(batch.completion_ids, batch.token_mask)
            return rows.cpu(), units.cpu(), {}
        if batch.completions is None:
            raise ValueError("info_consistent with units='text' needs the decoded completions; the trainer gave none")
        vocabulary: dict[str, int] = {}
        rows, units = pairs_of([extract_units(c, self.pattern) for c in batch.completions], vocabulary)
        return rows, units, vocabulary

    def _helpfulness(self, batch: GRPOBatch, rewards: torch.Tensor, rows, units, vocabulary) -> torch.Tensor:
        c, n = self.config, batch.num_completions
        if c.helpfulness == "reward":
            return rewards.detach().cpu().double().clamp(0.0, 1.0)
        if c.helpfulness == "unit_count":
            return unit_count(rows, n, c.target_units)
        if c.units == "tokens":
            raise ValueError("info_consistent: helpfulness='coverage' compares text units; use units='text'")
        relevant = [extract_units(row[c.relevant_column], self.pattern) for row in batch.rows]
        relevant_rows, relevant_units = pairs_of(relevant, vocabulary)
        return coverage(rows, units, relevant_rows, relevant_units, n)

    def _incoming(self, rewards: torch.Tensor) -> torch.Tensor:
        """``(N,)`` what R adds of the incoming reward under ``trainer_reward`` (helpfulness not 'reward')."""
        policy, c = self.config.trainer_reward, self.config
        if policy == "add":
            return rewards.detach().cpu()
        if policy == "error" and bool((rewards != 0).any()):
            raise ValueError(
                f"info_consistent with helpfulness='{c.helpfulness}' builds R = lambda_h r_help + lambda_s r_stab and "
                f"does not read the incoming reward (the trainer's reward functions, after earlier shape_rewards), "
                f"which is not 0 here (e.g. {float(rewards[rewards != 0][0]):.4g}): set trainer_reward='add' to add it "
                "to R, 'ignore' to drop it (the card's R), or helpfulness='reward' to use it as r_help"
            )
        return torch.zeros(rewards.shape, dtype=torch.float64)

    @hookimpl
    def shape_rewards(self, batch: GRPOBatch, rewards: torch.Tensor) -> torch.Tensor:
        """``(N,)`` ``R = lambda_h r_help + lambda_s r_stab`` within each request's group."""
        c = self.config
        if batch.rows is not None or c.helpfulness == "coverage":
            self.check_rows(batch.rows, "shape_rewards")
        rows, units, vocabulary = self._unit_pairs(batch)
        index = batch.group_index.cpu()
        rule = stability_rewards if c.stability == "entropy" else agreement_rewards
        stability = rule(rows, units, index, batch.num_groups)
        helpfulness = self._helpfulness(batch, rewards, rows, units, vocabulary)
        shaped = c.helpfulness_weight * helpfulness + c.stability_weight * stability
        if c.helpfulness != "reward":
            shaped = shaped + self._incoming(rewards).double()
        self.log_metric("stability_reward_mean", stability.mean())
        self.log_metric("helpfulness_mean", helpfulness.mean())
        self.log_metric("group_instability_mean", group_instability(rows, units, index, batch.num_groups).mean())
        self.log_metric("units_per_completion", segment_count(rows, batch.num_completions).double().mean())
        return shaped.to(device=rewards.device, dtype=rewards.dtype)
