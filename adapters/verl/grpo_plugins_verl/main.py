"""``python -m grpo_plugins_verl.main``: verl's ``main_ppo`` with one switch for grpo-plugins.

Takes every ``verl.trainer.main_ppo`` override plus ``+grpo_plugins='[spo, {gtpo: {beta: 0.1}}]'``
and, before verl starts Ray:

- checks the method list on the driver (a method that fails to import or configure stops here);
- sets ``algorithm.adv_estimator=grpo_plugins`` and ``algorithm.grpo_plugins=<list>``;
- sets ``actor_rollout_ref.actor.policy_loss.loss_mode=grpo_plugins`` (unless the run keeps another
  verl loss and no method has loss hooks);
- sets ``trainer.v1.trainer_mode=grpo_plugins`` (the sync trainer with round planning, ``observe``
  and plugin state in checkpoints);
- exports ``GRPO_PLUGINS_VERL`` in this process and in Ray's ``runtime_env`` so every worker
  (on every node) builds the same methods.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from grpo_plugins import CompositionError

from grpo_plugins_verl.runtime import build_composition
from grpo_plugins_verl.settings import (
    CONFIG_KEY,
    ENV_VAR,
    NAME,
    REFERENCE_HINT,
    TRAINER_HOOKS,
    encode_methods,
    grpo_defaults,
    methods_from,
    parse_methods,
)

logger = logging.getLogger("grpo_plugins_verl")
LOSS_HOOKS = ("policy_surrogate", "gate_loss", "loss_terms")


def prepare_config(config: DictConfig) -> DictConfig:
    """Apply the grpo_plugins switches to a composed verl PPO config (in place) and return it.

    The method list comes from the top-level ``grpo_plugins`` key, else ``algorithm.grpo_plugins``,
    else ``GRPO_PLUGINS_VERL``.

    Raises:
        CompositionError: a method cannot be loaded or configured, or the config asks for a verl
            setting the enabled methods cannot run with (legacy trainer, another estimator, a loss
            mode other than ``vanilla`` together with loss hooks, an async trainer with round hooks).
    """
    raw = config.get(CONFIG_KEY, None)
    methods = parse_methods(raw) if raw is not None else methods_from(config.algorithm)
    composition = build_composition(methods, grpo_defaults(config.algorithm))
    if not config.trainer.get("use_v1", True):
        raise CompositionError("grpo_plugins runs on verl's V1 trainer; remove trainer.use_v1=False")
    estimator = str(config.algorithm.adv_estimator)
    if estimator == "gae":  # verl's default; a GRPO run has no critic
        logger.warning("algorithm.adv_estimator=gae (verl's default) is replaced by grpo_plugins (GRPO, no critic)")
    elif estimator not in ("grpo", NAME):
        raise CompositionError(
            f"algorithm.adv_estimator={estimator}: grpo_plugins computes the advantages itself (default: GRPO); "
            "leave it at grpo (or verl's default) or drop +grpo_plugins"
        )
    actor = config.actor_rollout_ref.actor
    loss_mode = str(actor.policy_loss.get("loss_mode", "vanilla"))
    if loss_mode not in ("vanilla", NAME) and composition.has_loss_hooks:
        changers = sorted({m for hook in LOSS_HOOKS for m in composition.providers(hook)})
        raise CompositionError(
            f"actor.policy_loss.loss_mode={loss_mode}: methods {changers} change the loss on top of verl's "
            "vanilla PPO loss; use loss_mode=vanilla (or grpo_plugins)"
        )
    mode = str(config.trainer.v1.get("trainer_mode", "sync"))
    round_hooks = [hook for hook in TRAINER_HOOKS if composition.implements(hook)]
    if mode not in ("sync", NAME) and (round_hooks or composition.state_dict()):
        raise CompositionError(
            f"trainer.v1.trainer_mode={mode}: methods implementing {round_hooks} (or keeping state) need the "
            f"grpo_plugins sync trainer; use trainer.v1.trainer_mode=sync"
        )
    needs_reference = composition.requirers("ref_log_probs")
    if needs_reference:
        from verl.trainer.ppo.utils import need_reference_policy

        if not need_reference_policy(config):
            raise CompositionError(f"methods {needs_reference} require ref_log_probs: {REFERENCE_HINT}")
    encoded = encode_methods(methods)
    with open_dict(config):
        config.algorithm.adv_estimator = NAME
        config.algorithm[CONFIG_KEY] = methods
        if loss_mode == "vanilla":
            actor.policy_loss.loss_mode = NAME
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
