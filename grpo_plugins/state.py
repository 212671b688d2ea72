"""Method state and checkpoints: collect every method's state, restore it, write and read the file.

State holds tensors and plain Python values only, so a checkpoint file loads with
``torch.load(..., weights_only=True)`` and no pickled object is ever executed.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

import torch

from grpo_plugins.errors import CompositionError, GRPOPluginsError, PluginError
from grpo_plugins.validation import check_plain_state

logger = logging.getLogger("grpo_plugins")


def state_dict(enabled: Sequence[Any]) -> dict[str, Any]:
    """``{method name: state}`` of every method with state.

    Raises:
        PluginError: a method's state holds something other than tensors and plain values.
    """
    state = {}
    for entry in enabled:
        method_state = entry.method.state_dict()
        if method_state:
            problem = check_plain_state(method_state)
            if problem:
                raise PluginError(entry.name, "state_dict", entry.distribution, problem)
            state[entry.name] = method_state
    return state


def load_state_dict(enabled: Sequence[Any], state: Mapping[str, Any]) -> None:
    """Restore :func:`state_dict`'s output.

    State of a method the run does not enable is an error; a method the checkpoint holds no state for
    keeps its fresh state (with a warning when it has state to lose).
    """
    unknown = sorted(set(state) - {entry.name for entry in enabled})
    if unknown:
        raise CompositionError(f"checkpoint holds state of method(s) {unknown} that this run does not enable")
    for entry in enabled:
        if entry.name not in state:
            if entry.method.state_dict():
                logger.warning("checkpoint holds no state of method '%s': it starts fresh", entry.name)
            continue
        try:
            entry.method.load_state_dict(dict(state[entry.name]))
        except GRPOPluginsError:
            raise
        except Exception as error:
            raise PluginError(entry.name, "load_state_dict", entry.distribution, f"{type(error).__name__}: {error}") from error


def save(enabled: Sequence[Any], path: str | os.PathLike) -> None:
    """Write :func:`state_dict` to ``path`` (a torch file loadable with ``weights_only=True``)."""
    torch.save(state_dict(enabled), path)


def load(enabled: Sequence[Any], path: str | os.PathLike) -> None:
    """Restore the state written by :func:`save` (no pickled objects are loaded).

    Raises:
        CompositionError: the file cannot be read (missing, truncated, corrupt, or holding objects
            other than tensors and plain values), naming the file.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "weights only" in reason.lower():  # torch's advice to load arbitrary pickles is never right here
            reason = "it holds pickled objects"
        raise CompositionError(
            f"cannot read the plugin state file {os.fspath(path)}: it is missing, truncated or corrupt, or holds "
            f"objects other than tensors and plain values ({type(error).__name__}: {reason[:200]})"
        ) from error
    if not isinstance(state, Mapping):
        raise CompositionError(f"the plugin state file {os.fspath(path)} holds a {type(state).__name__}, not a state dict")
    load_state_dict(enabled, state)
