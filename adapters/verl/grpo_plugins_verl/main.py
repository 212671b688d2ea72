"""``python -m grpo_plugins_verl.main``: verl's ``main_ppo`` with one switch for grpo-plugins.

Takes every ``verl.trainer.main_ppo`` override plus ``+grpo_plugins='[knapsack_rl, {sapo: {tau_neg: 1.05}}]'``
and, before verl starts Ray:

- checks the method list on the driver (a method that fails to import or configure stops here);
- sets ``algorithm.adv_estimator=grpo_plugins`` and ``algorithm.grpo_plugins=<list>``;
- sets ``actor_rollout_ref.actor.policy_loss.loss_mode=grpo_plugins`` (unless the run keeps another
  verl loss and no method has loss hooks);
- sets ``trainer.v1.trainer_mode=grpo_plugins`` (the sync trainer with round planning, ``observe``
  and plugin state in checkpoints);
- exports ``GRPO_PLUGINS_VERL`` in this process and in Ray's ``runtime_env`` so every worker
  (on every node) builds the same methods.

The ``grpo_plugins`` trainer then builds the actor worker group from
:class:`~grpo_plugins_verl.workers.ProbeActorRolloutRefWorker` when a method reads the old-policy probe.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from grpo_plugins_verl.settings import CONFIG_KEY, ENV_VAR, NAME, encode_methods, methods_from, parse_methods

logger = logging.getLogger("grpo_plugins_verl")


def prepare_config(config: DictConfig) -> DictConfig:
    """Apply the grpo_plugins switches to a composed verl PPO config (in place) and return it.

    The method list comes from the top-level ``grpo_plugins`` key, else ``algorithm.grpo_plugins``,
    else ``GRPO_PLUGINS_VERL``.

    Raises:
        CompositionError: what :func:`grpo_plugins_verl.checks.checked_composition` refuses (a method
            that cannot be loaded or configured, a verl setting the methods cannot run with: every
            problem at once), then every need the run's verl settings do not provide
            (:mod:`grpo_plugins_verl.capabilities`).
    """
    from grpo_plugins_verl.checks import checked_composition

    raw = config.get(CONFIG_KEY, None)
    methods = parse_methods(raw) if raw is not None else methods_from(config.algorithm)
    composition = checked_composition(config, methods)  # what ``grpo-plugins check`` reports, capabilities included
    if str(config.algorithm.adv_estimator) == "gae":  # verl's default; a GRPO run has no critic
        logger.warning("algorithm.adv_estimator=gae (verl's default) is replaced by grpo_plugins (GRPO, no critic)")
    actor = config.actor_rollout_ref.actor
    loss_mode = str(actor.policy_loss.get("loss_mode", "vanilla"))
    mode = str(config.trainer.v1.get("trainer_mode", "sync"))
    encoded = encode_methods(methods)
    with open_dict(config):
        config.algorithm.adv_estimator = NAME
        config.algorithm[CONFIG_KEY] = methods
        if loss_mode == "vanilla":
            actor.policy_loss.loss_mode = NAME
        if composition.has_loss_hooks:
            actor.calculate_entropy = True  # LossInputs.entropies, as on TRL
        if mode == "sync":
            config.trainer.v1.trainer_mode = NAME
        OmegaConf.update(config, f"ray_kwargs.ray_init.runtime_env.env_vars.{ENV_VAR}", encoded, force_add=True)
    os.environ[ENV_VAR] = encoded
    return config


def run(config: DictConfig) -> None:
    """Prepare ``config`` and run verl's V1 PPO training (``verl.trainer.main_ppo``'s body)."""
    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    prepare_config(config)
    auto_set_device(config)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    run_ppo(config, task_runner_class=TaskRunnerV1)


@hydra.main(config_path="pkg://verl.trainer.config", config_name="ppo_trainer", version_base=None)
def main(config: DictConfig) -> Any:
    """Hydra entry point (same config tree and overrides as ``python -m verl.trainer.main_ppo``)."""
    run(config)


if __name__ == "__main__":
    main()
