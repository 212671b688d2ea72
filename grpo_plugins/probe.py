"""The old-policy probe and the update preview: forward-pass statistics beyond a token's log-prob
(``docs/design.md``, section 8).

**Old-policy probe.** A method that needs more of the old policy than the log-probs of the sampled
tokens (the full next-token distribution, the final hidden states) declares a :class:`ProbeRequest`
under a name in ``Needs(probes={name: request})``. At the advantage stage the adapter puts an
:class:`OldPolicyProbe` in ``batch.probes[name]``; nothing is computed until the method asks. The
method streams over the batch in chunks of rows (whole groups when the request says so) with a
function it supplies:

- ``probe.map(fn)``: ``fn(chunk) -> {key: (n, ...)}`` per-row values, returned as ``{key: (N, ...)}``
  in the batch's row order;
- ``probe.sum(fn)``: ``fn(chunk) -> {key: tensor}``, summed over every chunk (and rank).

A :class:`ProbeChunk` holds the chunk's rows and their final hidden states ``(n, T, d)`` (the input of
the LM head, at the positions that predict each completion token, no gradient) and computes the
logits, log-probs or top-k of any block of positions on demand through the head. Only one chunk and
one block of logits exist at a time, so the probe's memory is bounded whatever the vocabulary::

    peak ≈ forward activations of one chunk (no grad)  +  n·T·d hidden states
           + n·L·V·4 bytes of one logits block (L positions, n·L·V <= ProbeRequest.logits_budget)
           + what ``fn`` keeps (its per-row outputs, or its running sum)

instead of ``N·T·V`` floats for the whole batch (a 150k vocabulary at ``T = 512`` and ``G = 16`` is
4.9 GB for one group in float32; ``benchmarks/statistics_cost.py`` measures the probe on it).

**Update preview.** A method that needs the update the optimiser is about to take (CAPO) sets
``ProbeRequest(update_preview=True)``; ``batch.update_preview`` is then an :class:`UpdatePreview`: the LM
head's weight ``(V, d)``, its optimiser state and the coming step's learning rate, with
:meth:`UpdatePreview.step_for` giving the change ``ΔW`` the optimiser would make for a gradient.

:class:`LinearProbe` is the reference implementation on a tiny causal linear model (an embedding of
the previous token and a linear head): the core's tests, the conformance suite and the benchmarks run
methods on it without a trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping

import torch
import torch.distributed as dist

from grpo_plugins.parallel import ParallelContext

DEFAULT_LOGITS_BUDGET = 2**24
"""Elements of one block of logits (64 MiB in float32) unless a request sets its own."""

ChunkFunction = Callable[["ProbeChunk"], Mapping[str, torch.Tensor]]


@dataclass(frozen=True)
class ProbeRequest:
    """What a method asks of the old policy's forward pass at the advantage stage.

    Attributes:
        whole_groups: every chunk holds whole groups (every completion of a prompt), e.g. for a
            statistic across a group's distributions at each position.
        max_rows: rows per chunk at most (a group larger than it forms a chunk of its own); None: the
            adapter's micro-batch size (TRL: ``per_device_train_batch_size``).
        temperature: the logits are divided by it; None: the trainer's sampling temperature.
        logits_budget: elements ``n·L·V`` of one block of logits (:meth:`ProbeChunk.position_blocks`).
        update_preview: the method also reads ``batch.update_preview`` (:class:`UpdatePreview`).
    """

    whole_groups: bool = False
    max_rows: int | None = None
    temperature: float | None = None
    logits_budget: int = DEFAULT_LOGITS_BUDGET
    update_preview: bool = False

    def problems(self) -> list[str]:
        """What is wrong with the request, as messages (empty when it is well formed)."""
        out = []
        if self.max_rows is not None and (not isinstance(self.max_rows, int) or self.max_rows < 1):
            out.append(f"max_rows must be a positive int or None, got {self.max_rows!r}")
        if self.temperature is not None and not (self.temperature > 0 and math.isfinite(self.temperature)):
            out.append(f"temperature must be a positive finite number or None, got {self.temperature!r}")
        if not isinstance(self.logits_budget, int) or self.logits_budget < 1:
            out.append(f"logits_budget must be a positive int, got {self.logits_budget!r}")
        return out

    def text(self) -> str:
        """The request in one line (``grpo-plugins show``)."""
        parts = ["whole groups" if self.whole_groups else "rows"]
        if self.max_rows is not None:
            parts.append(f"<= {self.max_rows} rows a chunk")
        if self.temperature is not None:
            parts.append(f"temperature {self.temperature}")
        if self.update_preview:
            parts.append("update preview")
        return ", ".join(parts)


@dataclass
class ProbeChunk:
    """Rows of the global batch and the old policy's final hidden states on them (no gradient).

    Attributes:
        rows: ``(n,)`` int64 indices of the rows in the global batch.
        completion_ids: ``(n, T)`` int64 completion tokens (padding past each completion's end).
        completion_mask: ``(n, T)`` float, 1 on real completion tokens.
        group_index: ``(n,)`` int64 group of each row within the chunk, ``0 .. num_groups - 1``.
        num_groups: groups in the chunk (whole groups when the request asks for them).
        hidden_states: ``(n, T, d)`` final hidden states: position ``t`` is the LM head's input that
            predicts completion token ``t``.
        head_weight: ``(V, d)`` the LM head's weight; ``head_bias``: ``(V,)`` or None.
        temperature: the logits are divided by it.
        logits_budget: elements of one block of logits (:meth:`position_blocks`).
    """

    rows: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    group_index: torch.Tensor
    num_groups: int
    hidden_states: torch.Tensor
    head_weight: torch.Tensor
    head_bias: torch.Tensor | None = None
    temperature: float = 1.0
    logits_budget: int = DEFAULT_LOGITS_BUDGET

    @property
    def num_rows(self) -> int:
        """``n``."""
        return int(self.rows.shape[0])

    @property
    def vocab_size(self) -> int:
        """``V``."""
        return int(self.head_weight.shape[0])

    def position_blocks(self) -> list[slice]:
        """Slices of the ``T`` positions such that one block of logits holds at most ``logits_budget``
        elements (``n·L·V``; at least one position a block)."""
        width = int(self.completion_ids.shape[1])
        size = max(1, self.logits_budget // max(1, self.num_rows * self.vocab_size))
        return [slice(start, min(start + size, width)) for start in range(0, width, size)]

    def logits(self, positions: slice = slice(None)) -> torch.Tensor:
        """``(n, L, V)`` float32 logits ``(h W^T + b) / temperature`` at ``positions``."""
        hidden = self.hidden_states[:, positions].to(self.head_weight.dtype)
        bias = None if self.head_bias is None else self.head_bias.to(self.head_weight.dtype)
        return torch.nn.functional.linear(hidden, self.head_weight, bias).float() / self.temperature

    def log_probs(self, positions: slice = slice(None)) -> torch.Tensor:
        """``(n, L, V)`` float32 log-softmax of :meth:`logits`."""
        return torch.log_softmax(self.logits(positions), dim=-1)

    def top_k(self, k: int, positions: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` most likely tokens at ``positions``: ``(n, L, k)`` float32 log-probs (normalised over
        the full vocabulary) and ``(n, L, k)`` int64 token ids, most likely first."""
        values, ids = torch.topk(self.log_probs(positions), k=min(k, self.vocab_size), dim=-1)
        return values, ids


class OldPolicyProbe:
    """``batch.probes[name]``: the old policy's forward over the global batch, streamed in chunks.

    Args:
        name: the request's name (for messages).
        num_rows: ``N``, rows of the global batch.
        chunks: the row indices of each chunk (:func:`plan_chunks`).
        forward: ``rows -> ProbeChunk`` for one chunk (the adapter's no-grad forward).
        parallel: the batch's data-parallel context. On a gathered batch over several ranks each rank
            runs the chunks ``rank, rank + R, ...`` and the results are summed over the ranks (every rank
            ends with the whole result); on a per-rank batch (``gathered=False``) every rank runs its own
            rows and :meth:`sum` adds the ranks' sums.
        cache_elements: hidden-state elements the probe may keep between passes (a method making two
            passes, e.g. :meth:`sum` then :meth:`map`, runs the forward once while the chunks' hidden
            states fit; 0: every pass runs the forward again).
        equal_forwards: every rank runs the same number of forwards in each pass, for a ``forward`` that
            takes part in collectives (FSDP gathers each layer's parameters from every rank): when the
            chunks are split over the ranks, a rank owning fewer of them (``ceil(C / R)`` at most) runs
            the forward of its first chunk again and discards it. The cache is then not used (a rank
            could otherwise skip a forward the others run).
    """

    def __init__(self, name: str, num_rows: int, chunks: list[torch.Tensor],
                 forward: Callable[[torch.Tensor], ProbeChunk], parallel: ParallelContext | None = None,
                 cache_elements: int = 0, equal_forwards: bool = False):
        self.name = name
        self.num_rows = num_rows
        self.chunks = chunks
        self.forward = forward
        self.parallel = parallel or ParallelContext()
        self.cache_elements = 0 if equal_forwards else cache_elements
        self.equal_forwards = equal_forwards
        self.forward_calls = 0
        self._cache: dict[int, ProbeChunk] = {}
        self._cached_elements = 0

    def _split_over_ranks(self) -> bool:
        p = self.parallel
        return (p.gathered and p.world_size > 1 and len(self.chunks) >= p.world_size
                and dist.is_available() and dist.is_initialized())

    def _own_chunks(self) -> list[tuple[int, torch.Tensor]]:
        numbered = list(enumerate(self.chunks))
        if self._split_over_ranks():
            return numbered[self.parallel.rank::self.parallel.world_size]
        return numbered

    def _even_out(self, own: list[tuple[int, torch.Tensor]]) -> None:
        """``equal_forwards``: discarded forwards of this rank's first chunk, up to the most any rank runs."""
        if not (self.equal_forwards and self._split_over_ranks()):
            return
        most = -(-len(self.chunks) // self.parallel.world_size)
        for _ in range(most - len(own)):
            self.forward_calls += 1
            with torch.no_grad():
                self.forward(own[0][1])

    def _run(self, index: int, rows: torch.Tensor) -> ProbeChunk:
        if index in self._cache:
            return self._cache[index]
        self.forward_calls += 1
        with torch.no_grad():
            chunk = self.forward(rows)
        size = chunk.hidden_states.numel()
        if self._cached_elements + size <= self.cache_elements:
            self._cache[index] = chunk
            self._cached_elements += size
        return chunk

    def map(self, fn: ChunkFunction) -> dict[str, torch.Tensor]:
        """``{key: (N, ...)}``: ``fn(chunk)`` returns ``{key: (n, ...)}`` per-row values for the chunk's
        rows; they are placed at the rows' positions in the batch (every row belongs to one chunk)."""
        out: dict[str, torch.Tensor] = {}
        own = self._own_chunks()
        for index, rows in own:
            chunk = self._run(index, rows)
            values = fn(chunk)
            for key, value in values.items():
                if value.shape[:1] != (chunk.num_rows,):
                    raise ValueError(f"probe '{self.name}': map's function returned '{key}' of shape "
                                     f"{tuple(value.shape)}; its first dimension must be the chunk's {chunk.num_rows} rows")
                if key not in out:
                    out[key] = value.new_zeros((self.num_rows, *value.shape[1:]))
                out[key][rows.to(value.device)] = value.detach()
        self._even_out(own)
        if self._split_over_ranks():
            for value in out.values():
                dist.all_reduce(value, op=dist.ReduceOp.SUM)  # each row is filled on exactly one rank
        return out

    def sum(self, fn: ChunkFunction) -> dict[str, torch.Tensor]:
        """``{key: tensor}``: the sum of ``fn(chunk)`` over every chunk of the batch (and every rank)."""
        total: dict[str, torch.Tensor] = {}
        own = self._own_chunks()
        for index, rows in own:
            for key, value in fn(self._run(index, rows)).items():
                total[key] = value.detach() if key not in total else total[key] + value.detach()
        self._even_out(own)
        if self._split_over_ranks():
            for value in total.values():
                dist.all_reduce(value, op=dist.ReduceOp.SUM)
        elif not self.parallel.gathered:
            total = {key: self.parallel.all_reduce_sum(value) for key, value in total.items()}
        return total


SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")
"""Model config keys that change the logits after the LM head (a probe rebuilds them as ``head(decoder(x))``)."""


def scaled_logits(config: object) -> list[str]:
    """The :data:`SCALED_LOGITS` keys a model ``config`` sets (to a value other than None or 1)."""
    return [key for key in SCALED_LOGITS if getattr(config, key, None) not in (None, 1, 1.0)]


def head_decoder_problem(model: torch.nn.Module) -> str | None:
    """Why an adapter's probe cannot rebuild ``model``'s logits as ``head(decoder(x))`` (its decoder's
    final hidden states through ``get_output_embeddings()``); None when it can."""
    scaled = scaled_logits(getattr(model, "config", None))
    if scaled:
        return f"its config sets {scaled}"
    if not hasattr(model, "get_decoder") or model.get_output_embeddings() is None:
        return "it has no separate decoder and LM head"
    return None


def plan_chunks(group_index: torch.Tensor, request: ProbeRequest, default_rows: int) -> list[torch.Tensor]:
    """The row indices of each chunk: consecutive rows, at most ``request.max_rows`` (else
    ``default_rows``) a chunk; with ``whole_groups``, whole groups (in order of first appearance)
    packed greedily, a group larger than the bound forming a chunk of its own.

    ``group_index``: ``(N,)`` int64 group of each row of the global batch.
    """
    limit = max(1, request.max_rows or default_rows)
    n = int(group_index.shape[0])
    if not request.whole_groups:
        return [torch.arange(start, min(start + limit, n)) for start in range(0, n, limit)]
    order = torch.argsort(group_index, stable=True)
    _, counts = torch.unique_consecutive(group_index[order], return_counts=True)
    first = torch.full((int(group_index.max()) + 1,), n, dtype=torch.long)
    first.scatter_reduce_(0, group_index, torch.arange(n), reduce="amin")
    groups = [order[start:start + size] for start, size in zip((torch.cumsum(counts, 0) - counts).tolist(), counts.tolist())]
    groups.sort(key=lambda rows: int(first[group_index[rows[0]]]))
    chunks: list[list[torch.Tensor]] = []
    size = 0
    for rows in groups:
        if chunks and size + rows.numel() <= limit:
            chunks[-1].append(rows)
            size += rows.numel()
        else:
            chunks.append([rows])
            size = rows.numel()
    return [torch.cat(parts) for parts in chunks]


def local_groups(group_index: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(n,)`` group ids renumbered ``0 .. g - 1`` within a chunk, and ``g``."""
    ids, inverse = torch.unique(group_index, return_inverse=True)
    return inverse, int(ids.numel())


# ----------------------------------------------------------------------------- update preview
@dataclass
class UpdatePreview:
    """The optimiser's coming update of the LM head (``batch.update_preview``), read-only.

    Attributes:
        weight: ``(V, d)`` the LM head's weight now.
        learning_rate: the learning rate of the coming optimiser step.
        optimizer: ``adam`` (Adam or AdamW) or ``sgd``.
        step: optimiser steps already taken on the weight (Adam's bias correction uses ``step + 1``).
        exp_avg, exp_avg_sq: ``(V, d)`` Adam's moments (None before the first step: zeros).
        momentum_buffer: ``(V, d)`` SGD's momentum buffer (None: none yet).
        betas, eps: Adam's constants; ``momentum``: SGD's.
        weight_decay: the weight decay of the head's parameter group.
        decoupled_weight_decay: AdamW's decay (``W <- W - lr·wd·W``) rather than Adam's (``g + wd·W``).
        temperature: the sampling temperature: the logits are ``W h / temperature``.
        tied_embeddings: the head shares its weight with the input embedding, whose gradient the preview
            of a head-only gradient leaves out.
    """

    weight: torch.Tensor
    learning_rate: float
    optimizer: Literal["adam", "sgd"] = "adam"
    step: int = 0
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None
    momentum_buffer: torch.Tensor | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = True
    temperature: float = 1.0
    tied_embeddings: bool = False

    def step_for(self, grad: torch.Tensor) -> torch.Tensor:
        """``(V, d)`` float32 change ``ΔW`` the optimiser would make to the head for the gradient ``grad``
        ``(V, d)`` (of the loss being minimised), gradient clipping left out.

        Adam(W): ``m = b1 m0 + (1 - b1) g``, ``v = b2 v0 + (1 - b2) g²``, ``k = step + 1``,
        ``ΔW = -lr (m / (1 - b1^k)) / (sqrt(v / (1 - b2^k)) + eps) - lr wd W`` (AdamW; Adam adds
        ``wd W`` to ``g`` instead). SGD: ``b = momentum b0 + g`` (``g`` without a buffer), ``ΔW = -lr b``.
        """
        w = self.weight.detach().float()
        g = grad.float()
        lr, wd = float(self.learning_rate), float(self.weight_decay)
        if self.optimizer == "sgd":
            g = g + wd * w if wd else g
            buffer = g if self.momentum_buffer is None or not self.momentum else self.momentum * self.momentum_buffer.float() + g
            return -lr * buffer
        if not self.decoupled_weight_decay and wd:
            g = g + wd * w
        b1, b2 = self.betas
        k = self.step + 1
        m = (1 - b1) * g if self.exp_avg is None else b1 * self.exp_avg.float() + (1 - b1) * g
        v = (1 - b2) * g * g if self.exp_avg_sq is None else b2 * self.exp_avg_sq.float() + (1 - b2) * g * g
        delta = -lr * (m / (1 - b1**k)) / (torch.sqrt(v / (1 - b2**k)) + self.eps)
        if self.decoupled_weight_decay and wd:
            delta = delta - lr * wd * w
        return delta


# ----------------------------------------------------------------------------- the reference probe
@dataclass
class LinearProbe:
    """A tiny causal linear model as the old policy, to run probe methods without a trainer.

    The hidden state predicting completion token ``t`` is ``E[prompt] + P[0]`` at ``t = 0`` and
    ``E[y_{t-1}] + P[t]`` after (``E`` token embeddings, ``P`` position embeddings, both ``(·, d)``);
    the logits are ``W h / temperature`` with ``W`` ``(V, d)``. Causal like a language model: the
    hidden state at ``t`` never depends on tokens at ``t`` or later (padding past a completion's end
    changes nothing before it). Token ids and prompt ids are taken modulo ``V``.

    Attributes:
        vocab_size, hidden_size, max_positions: ``V``, ``d`` and the longest completion.
        seed: the weights' seed (``N(0, 1/d)`` embeddings, ``N(0, scale²/d)`` head).
        scale: the head's scale (larger: sharper distributions).
        temperature: the logits are divided by it.
    """

    vocab_size: int = 64
    hidden_size: int = 16
    max_positions: int = 64
    seed: int = 0
    scale: float = 3.0
    temperature: float = 1.0
    dtype: torch.dtype = torch.float32
    embeddings: torch.Tensor = field(init=False, repr=False)
    positions: torch.Tensor = field(init=False, repr=False)
    head: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        gen = torch.Generator().manual_seed(self.seed)
        d = self.hidden_size
        self.embeddings = (torch.randn(self.vocab_size, d, generator=gen) / math.sqrt(d)).to(self.dtype)
        self.positions = (torch.randn(self.max_positions, d, generator=gen) / math.sqrt(d)).to(self.dtype)
        self.head = (torch.randn(self.vocab_size, d, generator=gen) * self.scale / math.sqrt(d)).to(self.dtype)

    def hidden_states(self, prompt_ids: torch.Tensor, completion_ids: torch.Tensor) -> torch.Tensor:
        """``(n, T, d)`` hidden states for prompts ``(n,)`` and completions ``(n, T)``."""
        width = int(completion_ids.shape[1])
        if width > self.max_positions:
            raise ValueError(f"LinearProbe: completions of {width} tokens exceed max_positions={self.max_positions}")
        previous = torch.cat([prompt_ids[:, None], completion_ids[:, :-1]], dim=1).long() % self.vocab_size
        return self.embeddings[previous] + self.positions[:width]

    def chunk(self, batch, rows: torch.Tensor, request: ProbeRequest) -> ProbeChunk:
        """The :class:`ProbeChunk` of ``rows`` of ``batch`` (a ``GRPOBatch``)."""
        group_index, num_groups = local_groups(batch.group_index[rows])
        ids = batch.completion_ids[rows]
        return ProbeChunk(
            rows=rows, completion_ids=ids, completion_mask=batch.completion_mask[rows].float(),
            group_index=group_index, num_groups=num_groups,
            hidden_states=self.hidden_states(batch.prompt_ids[rows], ids), head_weight=self.head,
            temperature=request.temperature or self.temperature, logits_budget=request.logits_budget,
        )

    def probe(self, batch, name: str, request: ProbeRequest, default_rows: int = 8) -> OldPolicyProbe:
        """The :class:`OldPolicyProbe` of ``batch`` for ``request`` on this model."""
        chunks = plan_chunks(batch.group_index, request, default_rows)
        return OldPolicyProbe(name, batch.num_completions, chunks, lambda rows: self.chunk(batch, rows, request),
                              batch.parallel)

    def preview(self, learning_rate: float = 1e-3, step: int = 0, state_seed: int | None = None,
                weight_decay: float = 0.0) -> UpdatePreview:
        """An AdamW :class:`UpdatePreview` of the head (moments drawn from ``state_seed``; None: no state yet)."""
        exp_avg = exp_avg_sq = None
        if state_seed is not None:
            gen = torch.Generator().manual_seed(state_seed)
            exp_avg = torch.randn(self.head.shape, generator=gen) * 1e-3
            exp_avg_sq = torch.rand(self.head.shape, generator=gen) * 1e-6
        return UpdatePreview(weight=self.head, learning_rate=learning_rate, step=step, exp_avg=exp_avg,
                             exp_avg_sq=exp_avg_sq, weight_decay=weight_decay, temperature=self.temperature)

    def attach(self, batch, requests: Mapping[str, ProbeRequest], default_rows: int = 8, **preview: float) -> None:
        """Put a probe for every request in ``batch.probes`` (and ``batch.update_preview`` when one asks)."""
        for name, request in requests.items():
            batch.probes[name] = self.probe(batch, name, request, default_rows)
            if request.update_preview and batch.update_preview is None:
                batch.update_preview = self.preview(**preview)
