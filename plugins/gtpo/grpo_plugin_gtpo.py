"""GTPO: Group-relative Trajectory-based Policy Optimization (Simoni et al., 2025, arXiv:2508.03772).

1. Conflict tokens: a token that a positive-advantage and a negative-advantage completion of the same
   group share at the same position, within the completions' common prefix run (forward alignment)
   or common suffix run (backward alignment, positions counted from each completion's last token).
   Negative completions skip the update on them (weight 0); positive completions amplify it
   (weight ``w_conf``). The two alignments' weights multiply. The weights scale each token's loss
   term; the completion keeps its length ``|o|`` as normaliser (the released code's
   ``sum_t(loss_t * delta_t) / |o|``), which is how the adapters apply ``mask_tokens`` weights.
2. Entropy rule: completions whose mean token entropy ``H`` exceeds a threshold get advantage 0;
   the others get ``A - scale * H``.
3. An unclipped, KL-free policy gradient: loss ``-A * log pi`` per token (value ``-A``).

Shapes: ``N`` completions, ``G`` groups, ``T`` tokens, ``B`` rows of a loss micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from grpo_plugins import NON_NEGATIVE, GRPOBatch, LossInputs, Method, Needs, hookimpl, option
from grpo_plugins import Example
from grpo_plugins.ops import group_normalize, group_ranks, masked_mean, segment_count, segment_sum

_CHUNK_ELEMENTS = 1 << 27  # elements of one comparison temporary (bytes of a bool tensor)
_BLOCK = 8  # token columns compared in the first pass of the run search


def _dense_slots(index: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, int]:
    """``(N,)`` slot of each member within its group (0 .. size-1) and the largest group size."""
    return group_ranks(index, num_groups), int(segment_count(index, num_groups).max())


@dataclass(frozen=True)
class _Layout:
    """Where each participating completion sits in a dense ``(groups, S)`` grid of its group."""

    rows: torch.Tensor  # (M,) participating completions: A != 0 in a group holding both signs
    flat: torch.Tensor  # (M,) their cell in the flattened (groups * S) grid
    sign: torch.Tensor  # (M,) their advantage sign
    groups: int
    size: int
    dense: bool  # every cell of the grid is filled (all groups have the same size)
    identity: bool  # dense, and row ``k`` of ``rows`` sits in cell ``k`` (groups stored contiguously, in order)


def _layout(sign: torch.Tensor, index: torch.Tensor, num_groups: int) -> _Layout | None:
    """The grid of the groups holding both a positive and a negative completion (None if there are none)."""
    positive = segment_sum((sign > 0).to(torch.int64), index, num_groups) > 0
    negative = segment_sum((sign < 0).to(torch.int64), index, num_groups) > 0
    active = positive & negative
    if not bool(active.any()):
        return None
    rows = (active[index] & (sign != 0)).nonzero().flatten()
    sub_index = (torch.cumsum(active.to(torch.int64), 0) - 1)[index[rows]]
    groups = int(active.sum())
    slot, size = _dense_slots(sub_index, groups)
    flat = sub_index * size + slot
    dense = rows.numel() == groups * size
    identity = dense and bool((flat[1:] > flat[:-1]).all())  # increasing and filling every cell: the identity
    return _Layout(rows, flat, sign[rows], groups, size, dense, identity)


def _shared(layout: _Layout, ids: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(M, W)`` bool: a completion of the opposite sign in the group has the same token in the column.

    ``ids``/``valid``: ``(M, W)`` aligned columns of the participating completions; ``dtype``: the key
    dtype (int32 when ``2 * id + 1`` fits). Every pair of a group is compared at every column: the
    ``(groups, S, W)`` grid against each member slot in turn (``S`` whole-batch compares, in chunks of
    groups bounded in memory). The sign is folded into the key (``2 * id + [positive]``) and each
    token looks for the key of its own id with the opposite sign. When the rows already sit in grid order (equal, contiguous
    groups) the grid is a view of the columns and no scatter/gather is needed.
    """
    width = ids.shape[1]
    cells = layout.groups * layout.size
    twice = ids.to(dtype) * 2
    invalid = ~valid
    key = (twice + (layout.sign > 0).to(dtype)[:, None]).masked_fill_(invalid, -1)
    query = twice.add_((layout.sign < 0).to(dtype)[:, None]).masked_fill_(invalid, -2)
    if layout.identity:
        keys, queries = key, query
    else:
        if layout.dense:
            keys = torch.empty((cells, width), dtype=dtype, device=ids.device)
            queries = torch.empty((cells, width), dtype=dtype, device=ids.device)
        else:
            keys = torch.full((cells, width), -1, dtype=dtype, device=ids.device)
            queries = torch.full((cells, width), -2, dtype=dtype, device=ids.device)
        keys.index_copy_(0, layout.flat, key)
        queries.index_copy_(0, layout.flat, query)
    keys = keys.view(layout.groups, layout.size, width)
    queries = queries.view(layout.groups, layout.size, width)
    hit = torch.empty((layout.groups, layout.size, width), dtype=torch.bool, device=ids.device)
    chunk = max(1, _CHUNK_ELEMENTS // (layout.size * max(width, 1)))
    for start in range(0, layout.groups, chunk):  # one pass unless the batch is huge
        stop = start + chunk
        q, out = queries[start:stop], hit[start:stop]
        # Against each member slot in turn (S compares of the whole chunk, no (groups, S, S, W) temporary).
        torch.eq(q, keys[start:stop, :1], out=out)
        for slot in range(1, layout.size):
            out |= q == keys[start:stop, slot : slot + 1]
    hit = hit.view(cells, width)
    return hit if layout.identity else hit.index_select(0, layout.flat)


def _sub_layout(layout: _Layout, keep: torch.Tensor) -> tuple[_Layout, torch.Tensor]:
    """The layout of the groups where ``keep`` ``(groups,)`` holds, and the positions ``(M',)`` of their
    rows among ``layout.rows`` (members keep their slots)."""
    group = torch.div(layout.flat, layout.size, rounding_mode="floor")
    members = keep[group].nonzero().flatten()
    renumber = torch.cumsum(keep.to(torch.int64), 0) - 1
    flat = renumber[group[members]] * layout.size + layout.flat[members] % layout.size
    sub = _Layout(layout.rows[members], flat, layout.sign[members], int(keep.sum()), layout.size, layout.dense, False)
    return sub, members


def _run_lengths(
    layout: _Layout,
    ids: torch.Tensor,
    valid: torch.Tensor,
    last: torch.Tensor,
    backward: bool,
    block: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``(M,)`` aligned steps before each participating completion's first non-shared real token.

    ``ids``/``valid``: the participating rows' ``(M, T)`` token ids and real-token mask.
    ``last`` ``(M,)``: each row's last real column. Forward alignment: step = column; backward: step
    ``s`` = column ``last - s``. Columns are compared in blocks of ``block`` (doubling after each pass),
    stopping as soon as every run has ended or run out of tokens. Runs are usually a few tokens of
    shared format, so after the first pass only the few groups with a run still going are searched on.
    """
    m, t = layout.rows.numel(), ids.shape[1]
    length = torch.full((m,), t, dtype=torch.int64, device=ids.device)
    alive = torch.ones(m, dtype=torch.bool, device=ids.device)
    positions = None  # the searched rows' positions among the M (None: all of them)
    result = length  # the M lengths; ``length`` is rebound (never written in place), so no copy is needed
    start = 0
    while start < t:
        stop = min(t, start + block)
        if not backward:
            cols_ids, cols_valid = ids[:, start:stop], valid[:, start:stop]
        else:
            source = last[:, None] - torch.arange(start, stop, device=ids.device)
            inside = source >= 0
            source = source.clamp_(min=0)
            cols_ids = ids.gather(1, source)
            cols_valid = valid.gather(1, source) & inside
        breaks = cols_valid & ~_shared(layout, cols_ids, cols_valid, dtype)
        ended = alive & breaks.any(dim=1)
        length = torch.where(ended, breaks.to(torch.int8).argmax(dim=1) + start, length)
        alive &= ~ended & (last >= stop)  # a row without real tokens left cannot break any more
        if positions is None:
            result = length
        else:
            result.index_copy_(0, positions, length)
        still = int(alive.sum())
        if still == 0:
            break
        start, block = stop, 2 * block  # long runs: fewer, wider passes
        if 2 * still < alive.numel() and start < t:  # search on in the groups of the live rows only
            group = torch.div(layout.flat, layout.size, rounding_mode="floor")
            keep = torch.zeros(layout.groups, dtype=torch.int64, device=ids.device).scatter_add_(0, group, alive.long()) > 0
            layout, members = _sub_layout(layout, keep)
            ids, valid = ids.index_select(0, members), valid.index_select(0, members)
            last, length, alive = last[members], length[members], alive[members]
            positions = members if positions is None else positions[members]
    return result


def conflict_masks(
    ids: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    index: torch.Tensor,
    num_groups: int,
    block: int = _BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conflict tokens of the forward (prefix) and backward (suffix) alignments.

    A real token of completion ``i`` is a forward conflict if, at every real position of ``i`` up
    to and including it, some completion of the same group with an advantage of the opposite sign
    has the same token at the same position; backward conflicts are the same with positions counted
    from each completion's last real token. Completions with advantage 0 take no part.

    Args:
        ids: ``(N, T)`` completion token ids.
        mask: ``(N, T)`` completion mask (> 0 on real tokens).
        advantages: ``(N,)`` per-completion advantages; only their signs matter.
        index: ``(N,)`` int64 group ids; num_groups: ``G``.
        block: token columns compared in the first pass (a speed knob; the result does not depend on it).

    Returns:
        ``(forward, backward)``, two ``(N, T)`` bool tensors in original token positions.
    """
    valid = mask > 0
    n, t = ids.shape
    layout = _layout(torch.sign(advantages), index, num_groups)
    if layout is None:
        empty = torch.zeros((n, t), dtype=torch.bool, device=ids.device)
        return empty, empty.clone()
    columns = torch.arange(t, device=ids.device, dtype=torch.int32)
    every = layout.identity and layout.rows.numel() == n  # all rows take part, in order
    row_ids = ids if every else ids.index_select(0, layout.rows)
    row_valid = valid if every else valid.index_select(0, layout.rows)
    last = torch.where(row_valid, columns, -1).amax(dim=1).to(torch.int64)
    low, high = torch.aminmax(row_ids) if row_ids.numel() else (0, 0)
    dtype = torch.int32 if int(high) < (1 << 30) and int(low) >= 0 else torch.int64  # keys 2 * id + 1 must fit
    ahead = torch.zeros(n, dtype=torch.int64, device=ids.device)
    ahead[layout.rows] = _run_lengths(layout, row_ids, row_valid, last, False, block, dtype)
    first_behind = torch.full((n,), t, dtype=torch.int64, device=ids.device)
    first_behind[layout.rows] = last + 1 - _run_lengths(layout, row_ids, row_valid, last, True, block, dtype)
    forward = valid & (columns < ahead[:, None])
    backward = valid & (columns >= first_behind[:, None])
    return forward, backward


def conflict_weights(
    forward: torch.Tensor, backward: torch.Tensor, advantages: torch.Tensor, conflict_weight: float = 2.0
) -> torch.Tensor:
    """``(N, T)`` token weights ``delta_fwd * delta_bwd``.

    In each alignment a flagged token weighs ``conflict_weight`` in a positive completion and 0 in a
    negative one; every other token weighs 1.
    """
    flagged_weight = torch.where(advantages > 0, conflict_weight, 0.0).to(torch.float32)[:, None]
    one = torch.ones((), dtype=torch.float32, device=forward.device)
    return torch.where(forward, flagged_weight, one) * torch.where(backward, flagged_weight, one)


def completion_entropy(old_log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(N,)`` mean token entropy estimated by the sampled tokens' surprisal ``-log pi_old(o_t)``.

    ``E[-log pi(o_t)] = H_t`` when tokens are sampled from ``pi`` (temperature 1, no truncation).
    Rows without tokens give 0.
    """
    return masked_mean(-old_log_probs, mask, dim=-1)


def entropy_rule(
    advantages: torch.Tensor, entropy: torch.Tensor, threshold: float = 0.7, scale: float = 0.1
) -> torch.Tensor:
    """``A' = A - scale * H`` where ``H <= threshold``, else 0.

    Args:
        advantages: ``(N,)`` or ``(N, T)``.
        entropy: ``(N,)`` mean entropy of each completion.
    """
    if advantages.dim() == 2:
        entropy = entropy[:, None]
    return torch.where(entropy <= threshold, advantages - scale * entropy, torch.zeros_like(advantages))


def entropy_rule_on_tokens(
    advantages: torch.Tensor,
    completion_advantages: torch.Tensor,
    entropy: torch.Tensor,
    threshold: float = 0.7,
    scale: float = 0.1,
) -> torch.Tensor:
    """The entropy rule applied to token advantages that may already carry token weights.

    Args:
        advantages: ``(B, T)`` token advantages ``A_i * w_t`` (or ``A_i`` when weights travel in the mask).
        completion_advantages: ``(B,)`` ``A_i`` before the rule.
        entropy: ``(B,)`` mean token entropy ``H_i``.

    Returns:
        ``(B, T)`` ``(A_i - scale * H_i) * w_t`` where ``H_i <= threshold`` (``-scale * H_i`` for ``A_i = 0``,
        whose tokens all weigh 1), else 0.
    """
    a, h = completion_advantages[:, None], entropy[:, None]
    safe = torch.where(a != 0, a, torch.ones_like(a))
    shifted = torch.where(a != 0, advantages * (1 - scale * h / safe), (-scale * h).expand_as(advantages))
    return torch.where(h <= threshold, shifted, torch.zeros_like(advantages))


def reinforce_loss(log_probs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` unclipped policy-gradient loss: value ``-A``, gradient ``-A * grad log pi``."""
    return -advantages * torch.exp(log_probs - log_probs.detach())


@dataclass(frozen=True)
class GTPOConfig:
    """GTPO: Group-relative Trajectory-based Policy Optimization (https://arxiv.org/abs/2508.03772)."""

    conflict_weight: float = option(
        2.0, "w_conf: weight of a conflict token in a positive completion.", paper=2.0, domain=NON_NEGATIVE
    )
    entropy_threshold: float = option(
        0.7, "Completions with mean token entropy above this (nats) get advantage 0.", paper=0.7, domain=NON_NEGATIVE
    )
    entropy_scale: float = option(
        0.1, "Low-entropy completions get A - entropy_scale * H.", paper=0.1, domain=NON_NEGATIVE
    )
    entropy_filter: bool = option(True, "Apply the entropy rule.", paper=True)
    entropy_source: Literal["auto", "sampled", "policy"] = option(
        "auto",
        "Where H comes from. 'sampled': at the advantage stage, the mean surprisal -log pi_old of the "
        "sampled tokens (needs the batch's old log-probs). 'policy': at the loss stage, the exact entropy "
        "of the policy being trained (LossInputs.entropies; needs this method's unclipped loss). 'auto': "
        "'sampled' when the batch has old log-probs, else 'policy' (a fully on-policy trainer).",
        paper="policy",
    )
    own_advantages: bool = option(
        True,
        "Provide the paper's advantage A = r - group mean (no std). Set False to keep the run's estimator "
        "(grpo, ngrpo, ...) and apply only the entropy rule and the conflict weights on top.",
        paper=True,
    )
    unclipped_loss: bool = option(
        True,
        "Provide the paper's unclipped policy gradient (policy_surrogate). Set False to keep the trainer's "
        "clipped loss or another method's surrogate.",
        paper=True,
    )
    normalize_by_conflicts: bool = option(
        False,
        "Divide each completion's loss by max(1, its number of conflict tokens), as the released code does.",
        paper=False,
    )

    def __post_init__(self):
        if self.entropy_filter and self.entropy_source == "policy" and not self.unclipped_loss:
            raise ValueError("entropy_source='policy' applies the rule in this method's unclipped loss: "
                             "keep unclipped_loss=True or use entropy_source='sampled'")


class GTPO(Method):
    """GTPO: conflict-token weights, an entropy rule on completions and an unclipped policy gradient."""

    name = "gtpo"
    Config = GTPOConfig
    paper = "https://arxiv.org/abs/2508.03772"

    @classmethod
    def example(cls) -> Example:
        """The conformance suite's example run (see grpo_plugins.example)."""
        return Example(
            # the suite's random behaviour log-probs have a mean surprisal near 1.5 nats: a threshold of 1.5
            # (not the paper's 0.7) keeps both sides of the entropy rule in every batch
            config={"entropy_threshold": 1.5},
            min_group_size=1,
            nonzero_constant_groups="the entropy rule gives every low-entropy completion A - entropy_scale * H "
            "(the paper's rule), so a group with equal rewards keeps that term",
        )

    def requires(self) -> set[str]:
        """The completion tokens (conflict detection), and the behaviour log-probs when the entropy rule reads
        them (``entropy_source='sampled'``)."""
        cfg = self.config
        return {"completion_ids"} | ({"old_log_probs"} if cfg.entropy_filter and cfg.entropy_source == "sampled" else set())

    def needs(self) -> Needs:
        """The loss-stage fields it reads: the policy's ``entropies`` and the ``row_data`` carrying
        ``gtpo_advantage`` when the entropy rule may be deferred to the loss (``entropy_source`` 'policy',
        or 'auto' on a trainer without old log-probs), ``row_data`` carrying ``gtpo_conflicts`` with
        ``normalize_by_conflicts``."""
        cfg, fields, why = self.config, set(), {}
        if cfg.entropy_filter and cfg.entropy_source != "sampled":
            fields |= {"entropies", "row_data"}
            why["entropies"] = "the entropy rule with the policy's entropy (entropy_source='policy' or 'auto')"
            why["row_data"] = "each completion's advantage before the entropy rule, carried to the loss"
        if cfg.normalize_by_conflicts:
            fields.add("row_data")
            why["row_data"] = "; ".join(filter(None, (why.get("row_data"), "each completion's conflict-token count "
                                                                            "(normalize_by_conflicts)")))
        return Needs(loss_fields=fields, why=why)

    def disabled_hooks(self) -> set[str]:
        cfg, off = self.config, set()
        if not cfg.own_advantages:
            off.add("compute_advantages")
        if not cfg.entropy_filter:
            off.add("adjust_advantages")
        if not cfg.unclipped_loss:
            off.add("policy_surrogate")
        if not cfg.normalize_by_conflicts:
            off.add("gate_loss")
        return off

    @hookimpl
    def compute_advantages(self, batch: GRPOBatch) -> torch.Tensor:
        """``(N,)`` ``r - mean of the group`` (a group of one gets 0)."""
        return group_normalize(batch.rewards, batch.group_index, batch.num_groups, scale_by_std=False)

    @hookimpl
    def adjust_advantages(self, batch: GRPOBatch, advantages: torch.Tensor) -> torch.Tensor:
        """The entropy rule (or, with the policy's entropy, its deferral to the loss stage).

        The advantages' signs before the rule are kept for the conflict detection.
        """
        cfg = self.config
        mask = batch.token_mask
        completion = _per_completion(advantages, mask)
        batch.row_data["gtpo_sign"] = torch.sign(completion)
        source = cfg.entropy_source
        if source == "auto":
            source = "sampled" if batch.old_log_probs is not None else "policy"
        if source == "policy":
            if not cfg.unclipped_loss:
                raise ValueError(
                    "gtpo's entropy rule needs the batch's old log-probs (GRPOBatch.old_log_probs), which the "
                    "adapter did not give, or gtpo's own unclipped loss (unclipped_loss=True) to apply it with "
                    "the policy's entropy; or set entropy_filter=False"
                )
            batch.row_data["gtpo_advantage"] = completion.float()
            batch.row_data["gtpo_entropy_mask"] = mask
            return advantages
        if batch.old_log_probs is None:
            raise ValueError(
                "gtpo's entropy_source='sampled' needs the batch's old log-probs (GRPOBatch.old_log_probs); "
                "the adapter gave none. Use entropy_source='policy' or entropy_filter=False"
            )
        entropy = completion_entropy(batch.old_log_probs.float(), mask)
        self._log_entropy(entropy)
        return entropy_rule(advantages, entropy.to(advantages.dtype), cfg.entropy_threshold, cfg.entropy_scale)

    def _log_entropy(self, entropy: torch.Tensor) -> None:
        self.log_metric("mean_entropy", entropy.mean())
        self.log_metric("frac_high_entropy", (entropy > self.config.entropy_threshold).float().mean())

    @hookimpl
    def mask_tokens(self, batch: GRPOBatch) -> torch.Tensor:
        """``(N, T)`` conflict weights (0 / ``w_conf`` / ``w_conf**2`` on conflict tokens, 1 elsewhere)."""
        if batch.completion_ids is None:
            raise ValueError("gtpo needs the completion token ids (GRPOBatch.completion_ids); the adapter gave none")
        mask = batch.token_mask
        sign = batch.row_data.get("gtpo_sign")
        if sign is None:
            sign = torch.sign(_per_completion(batch.advantages, mask))
        forward, backward = conflict_masks(batch.completion_ids, mask, sign, batch.group_index, batch.num_groups)
        per_completion = torch.count_nonzero(forward | backward, dim=1)  # both are real tokens only
        batch.row_data["gtpo_conflicts"] = per_completion.to(torch.float32)
        self.log_metric("frac_conflict_tokens", per_completion.sum() / torch.count_nonzero(mask).clamp(min=1))
        return conflict_weights(forward, backward, sign, self.config.conflict_weight).to(mask.dtype)

    @hookimpl
    def policy_surrogate(self, inputs: LossInputs) -> torch.Tensor:
        """``(B, T)`` unclipped policy gradient (see :func:`reinforce_loss`).

        When the entropy rule was deferred to the loss stage (``entropy_source`` 'policy'), it is
        applied here with the policy's token entropies (read without gradient).
        """
        advantages = inputs.advantages
        deferred = inputs.row_data.get("gtpo_advantage")
        if deferred is None and self.config.entropy_filter and self.config.entropy_source == "policy":
            raise ValueError("gtpo's entropy_source='policy' applies the entropy rule in the loss from "
                             "row_data['gtpo_advantage'], which is missing: the adapter must carry row_data from the "
                             "advantage stage to the loss (or set entropy_source='sampled')")
        if deferred is not None:
            if inputs.entropies is None:
                raise ValueError("gtpo's entropy_source='policy' needs LossInputs.entropies; the adapter gave none")
            mask = inputs.row_data["gtpo_entropy_mask"].to(inputs.log_probs.dtype)
            entropy = masked_mean(inputs.entropies.detach().to(mask.dtype), mask, dim=-1)
            self._log_entropy(entropy)
            advantages = entropy_rule_on_tokens(advantages, deferred.to(advantages.dtype), entropy.to(advantages.dtype),
                                                self.config.entropy_threshold, self.config.entropy_scale)
        return reinforce_loss(inputs.log_probs, advantages)

    @hookimpl
    def gate_loss(self, inputs: LossInputs) -> torch.Tensor:
        """``(B, 1)`` ``1 / max(1, conflict tokens of the completion)``."""
        conflicts = inputs.row_data.get("gtpo_conflicts")
        if conflicts is None:
            raise ValueError("gtpo: row_data['gtpo_conflicts'] is missing; the adapter must carry row_data to the loss")
        return 1.0 / conflicts.to(inputs.log_probs.dtype).clamp(min=1.0)[:, None]


def _per_completion(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(N,)`` advantages of ``(N,)`` or the token mean of ``(N, T)`` advantages."""
    return advantages if advantages.dim() == 1 else masked_mean(advantages, mask, dim=-1)
