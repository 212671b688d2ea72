"""The old-policy probe and the update preview for :class:`~grpo_plugins_trl.PluginGRPOTrainer`: the batch
fields ``probes`` and ``update_preview`` (features ``old_policy_probe``, ``update_preview``;
``docs/design.md``, section 8; the contract is :mod:`grpo_plugins.probe`).

Nothing runs unless a method declares a probe (``Needs(probes=...)``). Then, at the advantage stage:

- **Probe.** ``batch.probes[name]`` streams over the GLOBAL batch in chunks of rows
  (``ProbeRequest.max_rows``, else ``per_device_train_batch_size``; whole groups when asked). A chunk's
  forward is one no-grad pass of the model's decoder (``model.get_decoder()``: no LM head, so no
  ``(n, P + T, V)`` logits) on the chunk's prompt + completion ids, with TRL's attention mask and
  autocast, keeping the final hidden states at the ``T`` positions that predict the completion tokens;
  the head (``model.get_output_embeddings()``) and the temperature (``ProbeRequest.temperature`` or
  ``args.temperature``, as TRL divides the logits) turn any block of positions into logits on demand.
  The log-softmax of those logits at the sampled tokens is TRL's old log-prob
  (``tests/integration/test_tw_grpo_trl.py`` checks it). On several ranks the prompt and completion
  ids are gathered (prompts left-padded, as TRL pads them) and each rank runs every ``R``-th chunk; the
  results are summed over the ranks (:class:`grpo_plugins.probe.OldPolicyProbe`).
  Hidden states are kept between two passes of a method while they fit in ``CACHE_ELEMENTS``.
- **Update preview.** ``batch.update_preview`` holds the head's weight, its AdamW / Adam / SGD state in
  TRL's optimiser and the learning rate of the coming step (the scheduler has already set it). It
  leaves out gradient clipping (``max_grad_norm``), a ``scale_update`` factor of the same step, and,
  for a head tied to the input embedding, the embedding's share of the gradient.

Refused at start-up: DeepSpeed / FSDP (sharded weights and optimiser state); an ``optim`` other than
torch's AdamW / Adam / SGD for the update preview; models whose logits are not ``head(decoder(x))``
(final logit soft-capping, a logit scale) or that take image inputs.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from grpo_plugins import CompositionError, TrainerCapabilities
from grpo_plugins.probe import (OldPolicyProbe, ProbeChunk, ProbeRequest, UpdatePreview, head_decoder_problem,
                                local_groups, plan_chunks)

if TYPE_CHECKING:
    from grpo_plugins import Composition
    from grpo_plugins_trl.trainer import PluginGRPOTrainer

FIELDS = ("probes", "update_preview")
CACHE_ELEMENTS = 2**27
"""Hidden-state elements a probe keeps between passes (512 MiB in float32)."""
PREVIEW_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_hf", "sgd")
"""``args.optim`` values whose optimiser the update preview reproduces."""


def with_probe(caps: TrainerCapabilities, args: Any) -> TrainerCapabilities:
    """``caps`` plus the probe and the update preview, less what the run's settings rule out."""
    from grpo_plugins_trl.update_control import sharded_setting

    caps = dataclasses.replace(caps.with_features("old_policy_probe", "update_preview"),
                               batch_fields=caps.batch_fields | set(FIELDS))
    setting = sharded_setting(args)
    if setting:
        return caps.without("old_policy_probe", "update_preview", *FIELDS, because=f"{setting}; the TRL adapter's probe "
                            "runs the decoder and reads the LM head and its optimiser state on unsharded training")
    optim = str(getattr(getattr(args, "optim", ""), "value", getattr(args, "optim", "")))
    if optim not in PREVIEW_OPTIMIZERS:
        caps = caps.without("update_preview", because=f"optim='{optim}' (the update preview reproduces "
                            f"{', '.join(PREVIEW_OPTIMIZERS)})")
    return caps


def requests(composition: "Composition") -> dict[str, ProbeRequest]:
    """``{name: ProbeRequest}`` of every enabled method."""
    return {name: request for needs in composition.needs().values() for name, request in needs.probes.items()}


def check_model(trainer: "PluginGRPOTrainer") -> None:
    """Refuse, when the trainer is built, a model whose logits the probe cannot rebuild from its decoder
    and head."""
    wanted = requests(trainer.composition)
    if not wanted:
        return
    methods = trainer.composition.needers("features", "old_policy_probe")
    why = head_decoder_problem(trainer.accelerator.unwrap_model(trainer.model))
    if why:
        raise CompositionError(f"method(s) {methods} read the old-policy probe, which rebuilds logits as "
                               f"head(decoder(x)); this model's logits are not that ({why})")


def _global_inputs(trainer: "PluginGRPOTrainer", out: dict) -> dict[str, torch.Tensor]:
    """Prompt and completion ids and masks of the global batch (prompts left-padded, completions right)."""
    acc, pad = trainer.accelerator, trainer._tokenizer.pad_token_id
    return {
        "prompt_ids": acc.gather(acc.pad_across_processes(out["prompt_ids"], dim=1, pad_index=pad, pad_first=True)),
        "prompt_mask": acc.gather(acc.pad_across_processes(out["prompt_mask"], dim=1, pad_index=0, pad_first=True)),
        "completion_ids": trainer._gather_rows(out["completion_ids"], pad),
        "completion_mask": trainer._gather_rows(out["completion_mask"], 0),
    }


def chunk_forward(trainer: "PluginGRPOTrainer", inputs: dict, group_index: torch.Tensor, request: ProbeRequest,
                  rows: torch.Tensor) -> ProbeChunk:
    """The :class:`ProbeChunk` of ``rows`` of the global batch: one no-grad decoder pass."""
    from trl.models.utils import disable_gradient_checkpointing

    model = trainer.accelerator.unwrap_model(trainer.model)
    device = inputs["prompt_ids"].device
    index = rows.to(device)
    prompt_width = inputs["prompt_ids"].shape[1]
    completion = inputs["completion_ids"][index]
    ids = torch.cat([inputs["prompt_ids"][index], completion], dim=1)
    attention = torch.cat([inputs["prompt_mask"][index], inputs["completion_mask"][index]], dim=1)
    head = model.get_output_embeddings()
    with torch.no_grad(), disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs):
        with trainer.accelerator.autocast():
            hidden = model.get_decoder()(input_ids=ids, attention_mask=attention, use_cache=False).last_hidden_state
    width = completion.shape[1]
    local, groups = local_groups(group_index[rows])
    return ProbeChunk(
        rows=rows, completion_ids=completion, completion_mask=inputs["completion_mask"][index].float(),
        group_index=local.to(device), num_groups=groups,
        hidden_states=hidden[:, prompt_width - 1: prompt_width - 1 + width].detach(),
        head_weight=head.weight.detach(), head_bias=None if head.bias is None else head.bias.detach(),
        temperature=request.temperature or trainer.args.temperature, logits_budget=request.logits_budget,
    )


def update_preview(trainer: "PluginGRPOTrainer") -> UpdatePreview:
    """The head's weight, its optimiser state and the coming step's learning rate."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    weight = model.get_output_embeddings().weight
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    methods = trainer.composition.needers("features", "update_preview")
    group = next((g for g in optimizer.param_groups if any(p is weight for p in g["params"])), None)
    if group is None:
        raise CompositionError(f"method(s) {methods} preview the LM head's update, but the optimiser does not train "
                               "the LM head's weight")
    state = optimizer.state.get(weight, {})
    kind = type(optimizer).__name__
    step = int(state["step"]) if "step" in state else 0
    common = dict(weight=weight.detach(), learning_rate=float(group["lr"]), step=step,
                  weight_decay=float(group.get("weight_decay", 0.0)), temperature=trainer.args.temperature,
                  tied_embeddings=model.get_input_embeddings().weight is weight)
    if kind in ("AdamW", "Adam") and not group.get("amsgrad", False):
        return UpdatePreview(**common, optimizer="adam", exp_avg=state.get("exp_avg"), exp_avg_sq=state.get("exp_avg_sq"),
                             betas=tuple(group["betas"]), eps=float(group["eps"]),
                             decoupled_weight_decay=kind == "AdamW" or bool(group.get("decoupled_weight_decay", False)))
    if kind == "SGD" and not group.get("nesterov", False):
        return UpdatePreview(**common, optimizer="sgd", momentum=float(group.get("momentum", 0.0)),
                             momentum_buffer=state.get("momentum_buffer"))
    raise CompositionError(f"method(s) {methods} preview the LM head's update, which the TRL adapter reproduces for "
                           f"torch's AdamW, Adam and SGD (without amsgrad / nesterov); this run's optimiser is {kind}")


def batch_fields(trainer: "PluginGRPOTrainer", out: dict, prompt_ids: torch.Tensor) -> dict[str, Any]:
    """``probes`` (and ``update_preview``) for the ``GRPOBatch`` of the advantage stage; an empty dict when no
    method reads them. ``prompt_ids``: ``(N,)`` the global batch's group keys."""
    wanted = requests(trainer.composition)
    if not wanted:
        return {}
    if any(out.get(key) is not None for key in ("pixel_values", "image_grid_thw", "pixel_attention_mask")):
        raise CompositionError(f"method(s) {sorted(wanted)} read the old-policy probe, which the TRL adapter runs on "
                               "text-only models; this batch carries image inputs")
    inputs = _global_inputs(trainer, out)
    group_index = torch.unique(prompt_ids.cpu(), return_inverse=True)[1]
    acc = trainer.accelerator
    from grpo_plugins import ParallelContext

    parallel = ParallelContext(rank=acc.process_index, world_size=acc.num_processes, gathered=True)
    probes = {}
    for name, request in wanted.items():
        chunks = plan_chunks(group_index, request, trainer.args.per_device_train_batch_size)
        probes[name] = OldPolicyProbe(
            name, int(group_index.numel()), chunks,
            lambda rows, request=request: chunk_forward(trainer, inputs, group_index, request, rows),
            parallel, cache_elements=CACHE_ELEMENTS,
        )
    fields: dict[str, Any] = {"probes": probes}
    if any(request.update_preview for request in wanted.values()):
        fields["update_preview"] = update_preview(trainer)
    return fields
