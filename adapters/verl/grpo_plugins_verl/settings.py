"""Where a verl run names its methods, and the names the adapter registers in verl.

verl's config dataclasses (``ActorConfig``, ``PolicyLossConfig``, ``AlgoConfig``) reject unknown
keys, and a policy loss only receives the ``ActorConfig``. The method list therefore travels on
two channels that every process can read:

- ``algorithm.grpo_plugins`` (a list in the Hydra config): the advantage estimator receives
  ``config.algorithm`` as a ``DictConfig``, so it reads the list there (driver side);
- the environment variable ``GRPO_PLUGINS_VERL`` (JSON or YAML list, or ``name1,name2``): read by
  the policy loss in the Ray workers, where no run config reaches a policy loss.

``python -m grpo_plugins_verl.main +grpo_plugins=[...]`` sets both from one switch. When both are
set they must agree, so the driver and the workers can never run different methods.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import yaml

from grpo_plugins import CompositionError

ENV_VAR = "GRPO_PLUGINS_VERL"
"""Environment variable holding the run's method list (JSON/YAML list or comma-separated names)."""
CONFIG_KEY = "grpo_plugins"
"""Key of the method list under ``algorithm`` (and at the top of the config for the entry point)."""
NAME = "grpo_plugins"
"""Name of the advantage estimator, the policy loss and the trainer this adapter registers in verl."""
TRAINER_HOOKS = ("sample_prompts", "augment_prompts", "allocate_rollouts", "observe")
"""Hooks only the ``grpo_plugins`` trainer (``trainer.v1.trainer_mode=grpo_plugins``) runs."""
REFERENCE_HINT = (
    "enable verl's reference model: actor_rollout_ref.actor.use_kl_loss=True with "
    "actor_rollout_ref.actor.kl_loss_coef=0 leaves the loss unchanged"
)
"""How a verl run gets ``ref_log_probs`` (verl computes them only with a reference policy)."""
DEFAULT_EPSILON = 1e-6
"""verl's GRPO epsilon (``compute_grpo_outcome_advantage`` default; ``compute_advantage`` never overrides it)."""


def to_plain(value: Any) -> Any:
    """An OmegaConf container (or anything else) as plain Python lists/dicts/scalars."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with verl
        pass
    return value


def parse_methods(value: Any) -> list[Any]:
    """A method list from a config value or the environment variable's text.

    Accepts a list (``["spo", {"gtpo": {...}}]``, OmegaConf lists included), a JSON/YAML list string
    (``'[spo, {gtpo: {beta: 0.1}}]'``) or comma-separated names (``"spo,gtpo"``). ``None``/empty -> ``[]``.
    """
    value = to_plain(value)
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise CompositionError(f"cannot read the method list {text!r}: {error}") from error
        if isinstance(loaded, str):
            loaded = [name.strip() for name in loaded.split(",") if name.strip()]
        value = loaded
    if isinstance(value, Mapping):
        value = [{name: config} for name, config in value.items()]
    if not isinstance(value, (list, tuple)):
        raise CompositionError(f"the method list must be a list of names or {{name: config}}, got {value!r}")
    return [to_plain(item) for item in value]


def encode_methods(methods: Any) -> str:
    """The method list as the JSON text ``GRPO_PLUGINS_VERL`` carries."""
    return json.dumps(parse_methods(methods), sort_keys=True)


def methods_from(algorithm_config: Any = None, environ: Mapping[str, str] | None = None) -> list[Any]:
    """The run's method list from ``algorithm.grpo_plugins`` and/or ``GRPO_PLUGINS_VERL``.

    Raises:
        CompositionError: both are set and name different methods.
    """
    environ = os.environ if environ is None else environ
    from_env = parse_methods(environ.get(ENV_VAR)) if environ.get(ENV_VAR, "").strip() else None
    from_config = None
    if algorithm_config is not None:
        raw = algorithm_config.get(CONFIG_KEY, None) if hasattr(algorithm_config, "get") else None
        from_config = None if raw is None else parse_methods(raw)
    if from_env is not None and from_config is not None and encode_methods(from_env) != encode_methods(from_config):
        raise CompositionError(
            f"algorithm.{CONFIG_KEY} = {from_config} but {ENV_VAR} = {from_env}: the driver and the workers would "
            f"run different methods; set one of them (python -m grpo_plugins_verl.main sets both)"
        )
    if from_config is not None:
        return from_config
    return from_env or []


def grpo_defaults(algorithm_config: Any = None) -> dict[str, dict[str, Any]]:
    """Defaults of the built-in ``grpo`` method taken from verl's own GRPO settings.

    ``algorithm.norm_adv_by_std_in_grpo`` True -> ``scale="group"``, False -> ``scale="none"``
    (Dr. GRPO); ``epsilon`` is verl's fixed 1e-6; verl's arithmetic (``grpo`` alone gives verl's ``grpo``
    advantages bit for bit, groups of one included).
    """
    norm = True
    if algorithm_config is not None and hasattr(algorithm_config, "get"):
        norm = bool(algorithm_config.get("norm_adv_by_std_in_grpo", True))
    return {"grpo": {"scale": "group" if norm else "none", "epsilon": DEFAULT_EPSILON, "arithmetic": "verl"}}


COLOCATED_REWARD_MODEL = "a colocated reward model (reward.reward_model.enable=True without enable_resource_pool)"
"""The verl setting :func:`colocated_reward_model` detects, as error messages name it."""


def colocated_reward_model(config: Any) -> bool:
    """Whether the run scores with a reward model that shares the actor's resource pool
    (``reward.reward_model.enable`` without ``enable_resource_pool``): verl scores such rows only
    after the whole rollout, outside the reward loop workers the adapter calls."""
    reward_model = config.reward.get("reward_model", None) or {}
    return bool(reward_model.get("enable", False)) and not reward_model.get("enable_resource_pool", False)


REWARD_KEYS = "grpo_plugins_reward_keys"
"""``algorithm`` key naming the ``reward_extra_info`` entries that form ``GRPOBatch.reward_components``."""
REWARD_WEIGHTS = "grpo_plugins_reward_weights"
"""``algorithm`` key with the weights of those components (``GRPOBatch.reward_weights``), same order."""


def reward_settings(algorithm_config: Any) -> tuple[list[str] | None, list[float] | None]:
    """``(reward keys, reward weights)`` of the run (:data:`REWARD_KEYS`, :data:`REWARD_WEIGHTS`; None where unset)."""
    keys, weights = (algorithm_config.get(name, None) for name in (REWARD_KEYS, REWARD_WEIGHTS))
    return None if keys is None else list(keys), None if weights is None else [float(w) for w in weights]
