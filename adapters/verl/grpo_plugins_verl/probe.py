"""The old-policy probe on verl: ``GRPOBatch.probes`` (feature ``old_policy_probe``; ``docs/design.md``,
section 8; the contract is :mod:`grpo_plugins.probe`).

Nothing runs unless a method declares a probe (``Needs(probes=...)``). Then:

- **Driver** (advantage stage of the ``grpo_plugins`` trainer): ``batch.probes[name]`` is a
  :class:`VerlProbe`. Its ``map(fn)`` / ``sum(fn)`` plan the chunks over the advantage stage's rows
  (:func:`~grpo_plugins.probe.plan_chunks` on the batch's groups; ``ProbeRequest.max_rows``, else
  ``rollout.log_prob_micro_batch_size_per_gpu``, else ``rollout.n``) and send one :class:`ProbeJob` (the
  rows' TransferQueue keys, the chunk plan, the request, the temperature, ``fn`` as cloudpickle bytes) to
  every actor worker (``probe_old_policy``, :mod:`grpo_plugins_verl.workers`, dispatched ONE_TO_ALL).
- **Actor workers** (:func:`run_job`): each rank runs a core :class:`~grpo_plugins.probe.OldPolicyProbe` over
  the global chunk plan (rank ``r`` runs chunks ``r, r + R, ...``, every rank the same number of forwards,
  results summed over the ranks). A chunk's forward fetches only its rows from TransferQueue
  (``input_ids``, ``position_ids``, ``responses``, ``response_mask``), right-pads them and runs the actor's
  module once without gradient (inside the engine's ``eval_mode``, with its autocast dtype, so FSDP unshards
  and reshards as in verl's own forward), with ``logits_to_keep=1`` where the model takes it; a hook on the
  decoder keeps its final hidden states at the ``T`` positions that predict the response tokens, and a hook
  on the LM head copies its full weight while it runs (FSDP has gathered it then). Rank 0 returns the result.

Shapes: ``B`` rows of verl's batch, ``N`` rows of the advantage stage, ``T`` response tokens, ``d`` hidden size.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Literal

import torch
import torch.distributed as dist

from grpo_plugins import CompositionError, GRPOBatch, ParallelContext
from grpo_plugins.probe import (OldPolicyProbe, ProbeChunk, ProbeRequest, head_decoder_problem, local_groups,
                                plan_chunks, scaled_logits)

from grpo_plugins_verl.extras import fit_width

PENDING = "probe_jobs"
"""Key of the trainer's extras holding the step's :class:`PendingProbes` (not a ``GRPOBatch`` field)."""
INPUT_FIELDS = ("input_ids", "position_ids", "responses", "response_mask")
"""TransferQueue fields a chunk's forward reads (verl's agent loop writes them for every row)."""
STRATEGIES = ("fsdp", "fsdp2")


def requests(composition: Any) -> dict[str, ProbeRequest]:
    """``{name: ProbeRequest}`` of every enabled method."""
    return {name: request for needs in composition.needs().values() for name, request in needs.probes.items()}


def probe_blockers(config: Any) -> list[str]:
    """verl settings under which the workers cannot run the probe, as reasons."""
    arr = config.actor_rollout_ref
    actor, reasons = arr.actor, []
    strategy = str(actor.get("strategy", "fsdp"))
    if strategy not in STRATEGIES:
        reasons.append(f"actor_rollout_ref.actor.strategy={strategy} (the probe runs the actor's Hugging Face module "
                       f"under {' / '.join(STRATEGIES)})")
    sp = max(int(actor.get("ulysses_sequence_parallel_size", 1) or 1),
             int((actor.get("fsdp_config", None) or {}).get("ulysses_sequence_parallel_size", 1) or 1))
    if sp > 1:
        reasons.append(f"actor_rollout_ref.actor.ulysses_sequence_parallel_size={sp} (the probe's forward keeps whole "
                       "sequences on each rank; use 1)")
    if strategy == "fsdp" and bool(arr.model.get("use_fused_kernels", False)):
        reasons.append("actor_rollout_ref.model.use_fused_kernels=True with actor.strategy=fsdp (the fused forward "
                       "skips the LM head module, whose FSDP1 weight the probe then cannot gather; use fsdp2 or "
                       "use_fused_kernels=False)")
    scaled = scaled_logits(_hf_config(arr.model))
    if scaled:
        reasons.append(f"the model's config sets {scaled} (the probe rebuilds logits as head(decoder(x)))")
    return reasons


def _hf_config(model: Any) -> Any:
    """The model's Hugging Face config when ``model.path`` is a local folder, else None (nothing is downloaded
    here; the workers check the loaded model)."""
    import os

    path = os.path.expanduser(str(model.get("path", "")))
    if not os.path.isfile(os.path.join(path, "config.json")):
        return None
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, trust_remote_code=bool(model.get("trust_remote_code", False)))


# ---------------------------------------------------------------------------------------------- driver
@dataclass(frozen=True)
class ProbeJob:
    """One ``map`` or ``sum`` of a probe, as the actor workers receive it.

    Attributes:
        keys: ``N`` TransferQueue keys of the advantage stage's rows, in its order; ``partition_id``: theirs.
        chunks: row indices (into ``keys``) of each chunk, the same plan on every rank.
        group_index: ``(N,)`` int64 group of each row.
        function: ``fn`` as cloudpickle bytes; ``mode``: ``map`` or ``sum``.
        width: ``T`` of the advantage stage's completions.
    """

    name: str
    mode: Literal["map", "sum"]
    function: bytes
    keys: list[str]
    partition_id: str
    chunks: list[torch.Tensor]
    group_index: torch.Tensor
    request: ProbeRequest
    temperature: float
    width: int


class VerlProbe:
    """``batch.probes[name]`` on verl: :class:`~grpo_plugins.probe.OldPolicyProbe`'s ``map`` / ``sum``, run
    by the actor workers. ``call(job)`` is the actor worker group's ``probe_old_policy`` (a list of the
    ranks' results, rank 0's first); ``job`` is every field of :class:`ProbeJob` but the function and mode."""

    def __init__(self, call: Callable[[ProbeJob], list], **job: Any):
        self.call, self.job = call, job
        self.name, self.chunks, self.num_rows = job["name"], job["chunks"], len(job["keys"])
        self.calls = 0

    def map(self, fn: Callable) -> dict[str, torch.Tensor]:
        """``{key: (N, ...)}`` in the advantage stage's row order (see ``OldPolicyProbe.map``)."""
        return self._run("map", fn)

    def sum(self, fn: Callable) -> dict[str, torch.Tensor]:
        """``{key: tensor}`` summed over every chunk (see ``OldPolicyProbe.sum``)."""
        return self._run("sum", fn)

    def _run(self, mode: str, fn: Callable) -> dict[str, torch.Tensor]:
        from ray import cloudpickle

        try:
            function = cloudpickle.dumps(fn)
        except Exception as error:  # noqa: BLE001 - whatever cloudpickle refuses
            raise CompositionError(f"probe '{self.name}': the function given to {mode} cannot be sent to verl's actor "
                                   f"workers ({type(error).__name__}: {error})") from error
        results = self.call(ProbeJob(mode=mode, function=function, **self.job))
        self.calls += 1
        return next(result for result in results if result is not None)


@dataclass
class PendingProbes:
    """The step's probes before the advantage stage knows its rows: ``keys`` are all ``B`` verl keys."""

    call: Callable[[ProbeJob], list]
    keys: list[str]
    partition_id: str
    requests: dict[str, ProbeRequest]
    temperature: float
    default_rows: int

    def for_batch(self, batch: GRPOBatch, rows: torch.Tensor) -> dict[str, VerlProbe]:
        """``{name: VerlProbe}`` over ``batch``, whose row ``n`` is verl's row ``rows[n]`` ``(N,)``."""
        keys = [self.keys[i] for i in rows.tolist()]
        group_index = batch.group_index.cpu()
        return {name: VerlProbe(self.call, name=name, keys=keys, partition_id=self.partition_id,
                                chunks=plan_chunks(group_index, request, self.default_rows), group_index=group_index,
                                request=request, temperature=float(request.temperature or self.temperature),
                                width=int(batch.completion_mask.shape[1]))
                for name, request in self.requests.items()}


def add_field(trainer: Any, batch: Any) -> None:
    """At the advantage stage of ``trainer`` (the ``grpo_plugins`` trainer), when a method reads a probe: the
    step's :class:`PendingProbes` into the fetched extras, for verl's rows ``batch.keys``."""
    wanted = requests(trainer.grpo_plugins.composition)
    if not wanted:
        return
    rollout = trainer.config.actor_rollout_ref.rollout
    trainer.grpo_plugins.extras[PENDING] = PendingProbes(
        call=trainer.actor_rollout_wg.probe_old_policy, keys=[str(key) for key in batch.keys],
        partition_id=batch.partition_id, requests=wanted, temperature=float(rollout.temperature),
        default_rows=int(rollout.get("log_prob_micro_batch_size_per_gpu", None) or rollout.n),
    )


# ---------------------------------------------------------------------------------------------- workers
class _Capture:
    """Forward hooks keeping the decoder's final hidden states ``(n, L, d)`` and a copy of the LM head's
    weight ``(V, d)`` (and bias) as the head runs (the first time; under FSDP it is then unsharded)."""

    def __init__(self, model: torch.nn.Module):
        self.decoder, self.head = model.get_decoder(), model.get_output_embeddings()
        self.hidden: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def _keep_hidden(self, module, args, output):
        self.hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state

    def _keep_head(self, module, args):
        if self.weight is None:
            self.weight = module.weight.detach().clone()
            self.bias = None if getattr(module, "bias", None) is None else module.bias.detach().clone()

    def __enter__(self) -> "_Capture":
        self.handles = [self.decoder.register_forward_hook(self._keep_hidden),
                        self.head.register_forward_pre_hook(self._keep_head)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def head_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head's weight and bias; when the head did not run (a fused forward reading ``lm_head.weight``):
        the FSDP2 ``DTensor`` gathered, or the plain weight."""
        if self.weight is None:
            weight, bias = self.head.weight, getattr(self.head, "bias", None)
            full = (lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t)
            self.weight, self.bias = full(weight).detach(), None if bias is None else full(bias).detach()
        return self.weight, self.bias


def _padded(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A nested ``(n, j)`` (or dense ``(n, L)``) tensor right-padded with 0, and each row's length ``(n,)``."""
    if value.is_nested:
        return value.to_padded_tensor(0), value.offsets().diff()
    return value, torch.full((value.shape[0],), value.shape[1], dtype=torch.long)


def fetch_rows(keys: list[str], partition_id: str) -> Any:
    """The :data:`INPUT_FIELDS` of the rows ``keys`` from TransferQueue (a TensorDict of nested tensors)."""
    import transfer_queue as tq

    return tq.kv_batch_get(keys=keys, partition_id=partition_id, select_fields=list(INPUT_FIELDS))


def chunk_forward(engine: Any, capture: _Capture, job: ProbeJob, fetch: Callable, rows: torch.Tensor) -> ProbeChunk:
    """The :class:`ProbeChunk` of ``rows`` (indices into ``job.keys``): their inputs from ``fetch``
    (:func:`fetch_rows`), one no-grad forward of the actor's module."""
    data = fetch([job.keys[i] for i in rows.tolist()], job.partition_id)
    if data["position_ids"].dim() != 2:
        raise CompositionError(f"probe '{job.name}': the rows' position_ids are not one per token (a multi-modal "
                               "model's position ids); the verl adapter's probe runs text-only models")
    ids, lengths = _padded(data["input_ids"])
    positions, _ = _padded(data["position_ids"])
    _, response_lengths = _padded(data["responses"])
    module = engine.module
    device = next(module.parameters()).device
    attention = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
    dtype = getattr(engine, "_autocast_dtype", torch.float32)
    autocast = nullcontext() if dtype == torch.float32 else torch.autocast(device_type=device.type, dtype=dtype)
    with autocast:
        module(input_ids=ids.to(device), attention_mask=attention.to(device), position_ids=positions.to(device),
               use_cache=False, **_keep_one_logit(module))
    hidden, capture.hidden = capture.hidden, None  # (n, L, d); only the T positions below are kept
    width = job.width
    # position P_i - 1 + t predicts response token t of row i (P_i: its prompt length)
    start = (lengths - response_lengths - 1).to(device)
    index = (start[:, None] + torch.arange(width, device=device)).clamp(0, hidden.shape[1] - 1)
    hidden = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    weight, bias = capture.head_weight()
    local, groups = local_groups(job.group_index[rows])
    return ProbeChunk(
        rows=rows, completion_ids=fit_width(data["responses"], width).long().to(device),
        completion_mask=fit_width(data["response_mask"], width).float().to(device), group_index=local.to(device),
        num_groups=groups, hidden_states=hidden.detach(), head_weight=weight, head_bias=bias,
        temperature=job.temperature, logits_budget=job.request.logits_budget,
    )


def _keep_one_logit(module: torch.nn.Module) -> dict[str, int]:
    """``logits_to_keep=1`` when the model's forward takes it (no ``(n, L, V)`` logits are built)."""
    model = getattr(module, "_fsdp_wrapped_module", module)
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def run_job(engine: Any, job: ProbeJob, fetch: Callable | None = None) -> dict[str, torch.Tensor] | None:
    """Run ``job`` on this actor rank's ``engine`` (every rank of the actor group runs it), reading the rows
    with ``fetch`` (default :func:`fetch_rows`); rank 0 returns the result (on the CPU), the other ranks None."""
    from ray import cloudpickle

    if fetch is None:
        import transfer_queue as tq
        from verl.utils import transferqueue_utils

        if not transferqueue_utils.TQ_INITIALIZED:  # as verl's tqbridge does on a worker's first batch
            tq.init()
            transferqueue_utils.TQ_INITIALIZED = True
        fetch = fetch_rows
    module = engine.module
    model = getattr(module, "_fsdp_wrapped_module", module)  # FSDP1 wraps the model; FSDP2 is the model
    why = head_decoder_problem(model)
    if why:
        raise CompositionError(f"probe '{job.name}' rebuilds logits as head(decoder(x)); the actor's model is not "
                               f"that ({why})")
    function = cloudpickle.loads(job.function)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    parallel = ParallelContext(rank=rank, world_size=world, gathered=True)
    with engine.eval_mode(), torch.no_grad(), _Capture(model) as capture:
        probe = OldPolicyProbe(job.name, len(job.keys), job.chunks, partial(chunk_forward, engine, capture, job, fetch),
                               parallel, equal_forwards=True)
        result = getattr(probe, job.mode)(function)
    return {key: value.cpu() for key, value in result.items()} if rank == 0 else None
