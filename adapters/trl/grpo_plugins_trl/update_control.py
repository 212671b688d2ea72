"""Optimiser-step control for :class:`~grpo_plugins_trl.PluginGRPOTrainer`: the hook ``scale_update``
(feature ``update_control``) and the batch field ``gradient_statistics`` (``docs/design.md``, section 7).

**The factor is a learning-rate multiplier.** After the last backward pass of an optimiser step (the
micro-step whose gradients are synchronised), the adapter runs ``scale_update`` on the step's global
batch; the product ``s`` multiplies the learning rate of every parameter group for that one optimiser
step, and the learning rate is restored right after it (before the scheduler steps). The update is
then exactly ``s`` times the optimiser's update (AdamW's decoupled weight decay included), whatever the
optimiser: scaling the gradients instead would be undone by Adam's normalisation and by gradient
clipping. ``s = 0`` leaves the weights unchanged (the optimiser's moments still see the gradient).

**Gradient statistics.** When a method reads ``gradient_statistics``, a hook on every trainable
parameter adds up the squared norm of the gradient each micro-batch's backward pass brings (this rank's
own gradient, before data-parallel averaging); at the step's last micro-batch the adapter gathers them
over the ranks and takes the squared norm of the synchronised, not yet clipped gradient. Micro-batch
``k`` of rank ``r`` contributes ``u = K * g_{k,r}`` (``K`` micro-batches per step), so that the step's
gradient is the mean of the ``M = K R`` units (:class:`grpo_plugins.GradientStatistics`). Cost: one
squared norm per parameter per backward pass, no copy of the gradients.

Without a method implementing ``scale_update`` or reading the statistics nothing is registered and
the optimiser step is TRL's.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from grpo_plugins import GradientStatistics, TrainerCapabilities

if TYPE_CHECKING:
    from grpo_plugins_trl.trainer import PluginGRPOTrainer

SCALE_METRIC = "plugins/update_scale"


def sharded_setting(args: Any) -> str | None:
    """The trainer setting under which the optimiser step is not a plain ``optimizer.step()`` on full
    gradients (DeepSpeed or FSDP), or None."""
    if getattr(args, "deepspeed", None) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        return "DeepSpeed (the engine owns the gradients and the optimiser step)"
    if getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return "FSDP (gradients are sharded across ranks)"
    return None


def with_update_control(caps: TrainerCapabilities, args: Any) -> TrainerCapabilities:
    """``caps`` plus ``update_control`` and ``gradient_statistics``, unless the optimiser step is sharded."""
    import dataclasses

    caps = dataclasses.replace(caps.with_features("update_control"),
                               batch_fields=caps.batch_fields | {"gradient_statistics"})
    setting = sharded_setting(args)
    if setting:
        caps = caps.without("update_control", "gradient_statistics", because=f"{setting}; the TRL adapter scales "
                            "the update and reads per-micro-batch gradients on plain (DDP or single-process) training")
    return caps


class UpdateControl(TrainerCallback):
    """Runs ``scale_update`` once per optimiser step and applies its factor to the learning rate."""

    def __init__(self, trainer: "PluginGRPOTrainer"):
        self.trainer = trainer
        composition = trainer.composition
        self.scales = composition.implements("scale_update")
        self.measures = bool(composition.requirers("gradient_statistics"))
        self.parameters = [p for p in trainer.model.parameters() if p.requires_grad]
        self.micro_sq_norms: list[torch.Tensor] = []
        self.current: torch.Tensor | None = None
        self.saved_lrs: list[float] | None = None
        self.factor: float | None = None
        self.handles = [p.register_hook(self._record) for p in self.parameters] if self.measures else []

    @classmethod
    def install(cls, trainer: "PluginGRPOTrainer") -> "UpdateControl | None":
        """The controller of ``trainer`` (added as a callback), or None when no method needs it."""
        composition = trainer.composition
        if not composition.implements("scale_update") and not composition.requirers("gradient_statistics"):
            return None
        control = cls(trainer)
        trainer.add_callback(control)
        return control

    def _record(self, grad: torch.Tensor) -> None:
        square = grad.detach().float().pow(2).sum()
        self.current = square if self.current is None else self.current + square

    # ------------------------------------------------------------------ micro-steps
    def after_micro_step(self) -> None:
        """Called after every ``training_step``: closes the micro-batch's norm, and at the step's last
        micro-batch (gradients synchronised) runs ``scale_update``."""
        trainer = self.trainer
        if self.measures:
            device = trainer.accelerator.device
            self.micro_sq_norms.append(torch.zeros((), device=device) if self.current is None else self.current.to(device))
            self.current = None
        if not trainer.accelerator.sync_gradients:
            return
        batch = trainer.last_plugin_batch
        if batch is None or trainer._plugin_skipped:
            self.micro_sq_norms = []
            return
        if self.measures:
            batch.gradient_statistics = self.statistics()
        if self.scales:
            factor = trainer.composition.run_scale_update(batch, trainer.state.global_step)
            self.factor = None if factor is None else float(factor)
            trainer._metrics["train"][SCALE_METRIC].append(1.0 if factor is None else float(factor))
        trainer._pop_plugin_metrics("train")

    def statistics(self) -> GradientStatistics:
        """The step's :class:`GradientStatistics` (every rank calls it at the same micro-step)."""
        acc = self.trainer.accelerator
        micro = torch.stack(self.micro_sq_norms)
        self.micro_sq_norms = []
        units = acc.gather(micro * float(micro.numel()) ** 2)  # (K R,): u = K g
        total = torch.zeros((), device=acc.device)
        for p in self.parameters:
            if p.grad is not None:
                total = total + p.grad.detach().float().pow(2).sum()
        return GradientStatistics(unit_sq_norms=units.cpu(), mean_sq_norm=total.cpu())

    # ------------------------------------------------------------------ the optimiser step
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.factor is None:
            return
        groups = self.trainer.optimizer.param_groups
        self.saved_lrs = [group["lr"] for group in groups]
        for group in groups:
            group["lr"] = group["lr"] * self.factor

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.saved_lrs is not None:
            for group, lr in zip(self.trainer.optimizer.param_groups, self.saved_lrs):
                group["lr"] = lr
        self.saved_lrs, self.factor = None, None
