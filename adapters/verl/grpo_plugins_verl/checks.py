"""The start-up checks of a verl run, reporting every problem at once.

``grpo-plugins check run.yaml`` calls :func:`check_config` on a verl run config: the nested sections
of verl's ``ppo_trainer`` config (``algorithm:``, ``actor_rollout_ref:``, ``data:``, ``trainer:``, ...)
with the method list at the top level (``grpo_plugins:``, what ``+grpo_plugins=[...]`` sets). It runs
what ``python -m grpo_plugins_verl.main`` runs before Ray starts:

1. the file's keys against verl's own config tree (a misspelt key gets the closest one);
2. the method list, read as :func:`grpo_plugins_verl.main.prepare_config` reads it (top level, else
   ``algorithm.grpo_plugins``, else ``GRPO_PLUGINS_VERL``), composed with verl's GRPO defaults:
   every method that cannot be loaded or configured is reported;
3. :func:`run_problems`: the verl settings grpo_plugins cannot run under, then the capability check
   (every need of the enabled methods that this verl run does not provide, naming the setting that
   takes it away): the checks of ``prepare_config``, all of them, with its messages;
4. verl's own ``validate_config`` on the prepared config (optional: ``verl_validation``).
"""

from __future__ import annotations

import copy
import difflib
import os
from typing import Any, Mapping, Sequence

from grpo_plugins import Composition, CompositionError
from grpo_plugins.cli import composition_problems

from grpo_plugins_verl.settings import CONFIG_KEY, ENV_VAR, NAME, grpo_defaults, methods_from, parse_methods

TRAINER = "verl"


def verl_defaults() -> Any:
    """verl's ``ppo_trainer`` config with every default (as ``python -m grpo_plugins_verl.main`` composes it)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer")


def key_problems(config: Mapping[str, Any], defaults: Any, prefix: str = "") -> list[str]:
    """Every key of ``config`` that verl's config tree (``defaults``) lacks, with the closest one.

    Free-form sections (an empty mapping or None by default) take any key; ``grpo_plugins`` at the
    top level and ``algorithm.grpo_plugins`` are the adapter's."""
    from omegaconf import DictConfig

    problems = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        if path in (CONFIG_KEY, f"algorithm.{CONFIG_KEY}"):
            continue
        if key not in defaults:
            close = difflib.get_close_matches(str(key), [str(k) for k in defaults.keys()], n=1, cutoff=0.75)
            where = f"'{prefix[:-1]}'" if prefix else "the top level of verl's config"
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"not a key of {where}"
            problems.append(f"unknown key '{path}' in the verl config ({hint})")
            continue
        node = defaults[key]
        if isinstance(value, Mapping) and isinstance(node, DictConfig) and len(node) > 0:
            problems += key_problems(value, node, f"{path}.")
    return problems


def settings_problems(config: Any, composition: Composition) -> list[str]:
    """The verl settings of ``config`` (a composed ``DictConfig``) grpo_plugins cannot run under at all: the
    legacy trainer, another advantage estimator. What a setting takes away from particular methods (a
    non-vanilla loss mode, an async trainer, no reference model) is the capability check's
    (:func:`~grpo_plugins_verl.capabilities.verl_capabilities`)."""
    problems = []
    if not config.trainer.get("use_v1", True):
        problems.append("grpo_plugins runs on verl's V1 trainer; remove trainer.use_v1=False")
    estimator = str(config.algorithm.adv_estimator)
    if estimator not in ("gae", "grpo", NAME):
        problems.append(
            f"algorithm.adv_estimator={estimator}: grpo_plugins computes the advantages itself (default: GRPO); "
            "leave it at grpo (or verl's default) or drop +grpo_plugins"
        )
    return problems


def raise_problems(problems: Sequence[str]) -> None:
    """Raise one :class:`CompositionError` holding every problem (a single one as it is)."""
    if len(problems) == 1:
        raise CompositionError(problems[0])
    if problems:
        raise CompositionError(f"the run cannot start on {TRAINER} ({len(problems)} problems):\n- " + "\n- ".join(problems))


def checked_composition(config: Any, methods: Any) -> Composition:
    """The run's composition (:func:`~grpo_plugins_verl.runtime.build_composition`) after every check
    of the method list and of the verl settings of ``config`` (a composed ``DictConfig``).

    Raises:
        CompositionError: listing every problem at once.
    """
    from grpo_plugins_verl.runtime import build_composition

    defaults = grpo_defaults(config.algorithm)
    composition, problems = composition_problems(methods, defaults)
    if composition is not None:
        problems += run_problems(config, composition)
    raise_problems(problems)
    return build_composition(methods, defaults)


def run_problems(config: Any, composition: Composition) -> list[str]:
    """The verl settings the enabled methods cannot run with, then every need the run does not get
    (:func:`~grpo_plugins_verl.capabilities.verl_capabilities`), each said once."""
    from grpo_plugins_verl.capabilities import verl_capabilities

    problems = settings_problems(config, composition) + composition.capability_problems(verl_capabilities(config))
    return list(dict.fromkeys(problems))


def verl_problems(config: Any) -> list[str]:
    """verl's own start-up validation of a config ``prepare_config`` accepts (the first problem it finds)."""
    from omegaconf import OmegaConf
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    from grpo_plugins_verl.main import prepare_config

    prepared = copy.deepcopy(config)
    OmegaConf.set_struct(prepared, True)
    saved = os.environ.get(ENV_VAR)
    try:
        prepare_config(prepared)
        auto_set_device(prepared)
        validate_config(config=prepared, use_reference_policy=need_reference_policy(prepared),
                        use_critic=need_critic(prepared))
    except CompositionError as error:
        return [str(error)]
    except Exception as error:  # noqa: BLE001 - verl raises AssertionError, ValueError, Hydra errors
        return [f"verl refuses the config: {type(error).__name__}: {error}".strip()]
    finally:
        if saved is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = saved
    return []


def check_config(config: Mapping[str, Any], *, verl_validation: bool = True) -> tuple[Composition | None, list[str]]:
    """``grpo-plugins check`` on a verl run config: ``(composition, every problem)``; trains nothing.

    Args:
        config: a nested verl config (what a Hydra YAML or overrides set), ``grpo_plugins`` at the top.
        verl_validation: also run verl's own config validation (batch sizes, devices, ...) on the
            config completed with verl's defaults; off for a fragment of a command line.
    """
    from omegaconf import OmegaConf

    if not isinstance(config, Mapping):
        return None, ["the verl config must be a YAML mapping of sections"]
    defaults = verl_defaults()
    problems = key_problems(config, defaults)
    known = {k: v for k, v in config.items() if k in defaults or k == CONFIG_KEY}
    merged = copy.deepcopy(defaults)
    OmegaConf.set_struct(merged, False)
    try:
        merged = OmegaConf.merge(merged, OmegaConf.create(dict(known)))
    except Exception as error:  # noqa: BLE001 - a value of the wrong type for verl's schema
        return None, problems + [f"verl refuses the config: {type(error).__name__}: {error}"]
    try:
        raw = merged.get(CONFIG_KEY, None)
        methods = parse_methods(raw) if raw is not None else methods_from(merged.algorithm)
    except CompositionError as error:
        return None, problems + [str(error)]
    composition, found = composition_problems(methods, grpo_defaults(merged.algorithm))
    problems += found
    if composition is None:
        return None, problems
    problems += run_problems(merged, composition)
    if not problems and verl_validation:
        problems += verl_problems(merged)
    return composition, problems


def validate_config(config: Mapping[str, Any]) -> list[str]:
    """Every problem that would stop ``python -m grpo_plugins_verl.main`` from starting with ``config``."""
    return check_config(config)[1]
