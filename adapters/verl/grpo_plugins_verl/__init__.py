"""verl adapter of grpo-plugins.

verl imports this package in every process (driver, TaskRunner, Ray workers) through its
``verl.plugins`` entry-point group. On import it registers, under the name ``grpo_plugins``:

- the advantage estimator (``algorithm.adv_estimator=grpo_plugins``),
- the policy loss (``actor_rollout_ref.actor.policy_loss.loss_mode=grpo_plugins``),
- the trainer (``trainer.v1.trainer_mode=grpo_plugins``) where verl's V1 trainer is importable,

and, when the run names its methods in ``GRPO_PLUGINS_VERL``, builds them once so that a method
that fails to import or configure stops the process with a clear error. verl itself swallows plugin
import errors with a DEBUG log, so this module logs at ERROR and raises :class:`PluginStartupError`
(a ``BaseException``, which verl's ``except Exception`` does not catch) when the run asked for methods.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

from grpo_plugins_verl.settings import CONFIG_KEY, ENV_VAR, NAME

__version__ = "0.1.0"
__all__ = ["CONFIG_KEY", "ENV_VAR", "NAME", "PluginStartupError", "configure", "get_runtime"]

logger = logging.getLogger("grpo_plugins_verl")


class PluginStartupError(BaseException):
    """The run named grpo_plugins methods, but they (or this adapter) could not be loaded."""


def _start() -> None:
    from grpo_plugins_verl.registration import register_estimator_and_loss, register_trainer
    from grpo_plugins_verl.runtime import get_runtime

    register_estimator_and_loss()
    register_trainer()
    if os.environ.get(ENV_VAR, "").strip():
        get_runtime()  # imports and configures every named method now, in this process


def _fail(error: Exception) -> None:
    message = (
        f"grpo_plugins_verl failed to start in process {os.getpid()} "
        f"({ENV_VAR}={os.environ.get(ENV_VAR, '')!r}): {type(error).__name__}: {error}"
    )
    logger.error("%s\n%s", message, traceback.format_exc())
    print(f"[grpo_plugins_verl] ERROR: {message}", file=sys.stderr, flush=True)
    if os.environ.get(ENV_VAR, "").strip():
        raise PluginStartupError(message) from error
    raise error


try:
    _start()
except Exception as _error:  # noqa: BLE001 - reported loudly, then re-raised
    _fail(_error)

from grpo_plugins_verl.runtime import configure, get_runtime  # noqa: E402
