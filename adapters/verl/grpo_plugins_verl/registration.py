"""Registration of the adapter's estimator, policy loss and trainer in verl's registries."""

from __future__ import annotations

import importlib.util

from grpo_plugins_verl.settings import NAME


def register_estimator_and_loss() -> None:
    """Register ``grpo_plugins`` in verl's advantage-estimator and policy-loss registries (idempotent)."""
    from verl.trainer.ppo import core_algos

    from grpo_plugins_verl.advantage import compute_grpo_plugins_advantage
    from grpo_plugins_verl.loss import compute_grpo_plugins_policy_loss

    if core_algos.ADV_ESTIMATOR_REGISTRY.get(NAME) is not compute_grpo_plugins_advantage:
        core_algos.ADV_ESTIMATOR_REGISTRY.pop(NAME, None)  # a re-import of this module replaces its own entry
        core_algos.register_adv_est(NAME)(compute_grpo_plugins_advantage)
    core_algos.register_policy_loss(NAME)(compute_grpo_plugins_policy_loss)


def trainer_available() -> bool:
    """Whether verl's V1 trainer can be imported here (it needs the ``TransferQueue`` package)."""
    return importlib.util.find_spec("transfer_queue") is not None


def register_trainer() -> bool:
    """Register the ``grpo_plugins`` V1 trainer (``trainer.v1.trainer_mode=grpo_plugins``) if verl's V1
    trainer is importable; returns whether it was registered."""
    if not trainer_available():
        return False
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY

    from grpo_plugins_verl.trainer import GRPOPluginsTrainer

    if TRAINER_REGISTRY.get(NAME) is not GRPOPluginsTrainer:
        TRAINER_REGISTRY.pop(NAME, None)
        from verl.trainer.ppo.v1.trainer_base import register_trainer as verl_register_trainer

        verl_register_trainer(NAME)(GRPOPluginsTrainer)
    return True
