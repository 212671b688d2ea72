"""The run's composition in one verl process, shared by the estimator, the loss and the trainer.

verl calls the registered estimator and policy loss as plain functions, so the composition lives
here, built once per process from the run's method list (see :mod:`grpo_plugins_verl.settings`).
In the driver process the trainer and the estimator share the same instance (same method list,
same defaults), so state updated by ``observe`` is the state the next advantage stage sees.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from grpo_plugins import Composition, GRPOBatch, Method
from grpo_plugins_verl.settings import grpo_defaults, methods_from

logger = logging.getLogger("grpo_plugins_verl")


def build_composition(methods: Sequence[Any], defaults: Mapping[str, Mapping] | None = None) -> Composition:
    """``Composition(methods, defaults)``; ``defaults`` (:func:`~grpo_plugins_verl.settings.grpo_defaults`)
    give the built-in ``grpo`` verl's arithmetic, so a run with no method reproduces verl's ``grpo``."""
    return Composition(methods, defaults=defaults)


@dataclass
class Runtime:
    """One process's composition and the bookkeeping the adapter keeps around it.

    Attributes:
        composition: the enabled methods.
        step: optimiser steps taken so far (set by the trainer before each advantage stage).
        prompt_ids: ``uid -> prompt id`` of the prompts the trainer submitted (uids are verl's
            per-round prompt-group ids): the row's ``prompt_id`` column when the dataset has one, else
            its dataset index.
        dataset_index: ``uid -> dataset index`` of the same prompts (to read their dataset rows).
        last_batch: the ``GRPOBatch`` of the latest advantage stage, for ``observe``.
        extras: per-row data the trainer fetched for the coming advantage stage, in verl's row
            order (see :func:`grpo_plugins_verl.extras.batch_extras`); None outside it.
        trainer_attached: whether the ``grpo_plugins`` trainer drives this process (it runs the
            round-planning and ``observe`` hooks; without it those hooks would never run).
        total_steps: the run's optimiser steps (verl's ``total_training_steps``), set by the trainer.
        rows_for: ``prompt ids -> dataset rows``, set by the trainer (fills ``GRPOBatch.rows`` for
            methods that require them).
        loss_installed: whether the trainer installed :func:`~grpo_plugins_verl.loss.grpo_plugins_ppo_loss`
            on the actor workers (it carries ``row_data`` and the token weights to the loss itself).
        last_rows: ``(N,)`` verl row of each ``last_batch`` completion (verl's padding rows left out).
        checked: whether the estimator has run the capability check of a run without the trainer.
        skipped: batches skipped since the trainer last logged them (every completion masked).
        set_up: whether ``setup`` has run in this process (driver: once the dataset is loaded; actor
            worker: at its first loss call).
        row_groups: ``{verl key: (group, group size)}`` of the latest advantage stage's rows, for the
            whole-group ordering of the actor batch (:mod:`grpo_plugins_verl.objectives`).
        tokenizer: the run's tokenizer, set by the trainer (decodes completions for the batch editing hooks).
    """

    composition: Composition
    step: int = 0
    prompt_ids: dict[str, int] = field(default_factory=dict)
    last_batch: GRPOBatch | None = None
    extras: dict[str, Any] | None = None
    trainer_attached: bool = False
    total_steps: int | None = None
    rows_for: Callable[[list[int]], list[dict]] | None = None
    loss_installed: bool = False
    last_rows: torch.Tensor | None = None
    dataset_index: dict[str, int] = field(default_factory=dict)
    checked: bool = False
    skipped: int = 0
    set_up: bool = False
    row_groups: dict[str, tuple[int, int]] | None = None
    tokenizer: Any = None

    def dataset_indices(self, uids: np.ndarray) -> list[int]:
        """Dataset index of each row whose verl ``uid`` is ``uids`` ``(N,)``."""
        return [self.dataset_index[uid] for uid in np.asarray(uids).astype(str).tolist()]

    def ids_for(self, uids: np.ndarray) -> torch.Tensor:
        """``(N,)`` int64 prompt ids of the rows whose verl ``uid`` is ``uids`` ``(N,)``.

        Uids the trainer registered map to their prompt id (so two uids of one prompt form one
        group, as everywhere in grpo-plugins); otherwise (verl's own trainer) each distinct
        uid gets a dense id in order of first appearance. Python work is per group, not per row.
        """
        unique, first, inverse = np.unique(np.asarray(uids).astype(str), return_index=True, return_inverse=True)
        inverse = torch.as_tensor(inverse.reshape(-1), dtype=torch.long)
        known = [self.prompt_ids.get(uid) for uid in unique.tolist()]
        if known and all(i is not None for i in known):
            return torch.tensor(known, dtype=torch.long)[inverse]
        rank = torch.as_tensor(np.argsort(np.argsort(first)), dtype=torch.long)  # dense ids by first appearance
        return rank[inverse]


_LOCK = threading.Lock()
_RUNTIMES: dict[str, Runtime] = {}
_OVERRIDE: list[Any] | None = None


def configure(methods: Sequence[Any] | None) -> None:
    """Set this process's method list directly (names, ``{name: config}`` or ``Method`` instances).

    For in-process use and tests; it takes precedence over ``GRPO_PLUGINS_VERL`` and
    ``algorithm.grpo_plugins``. ``None`` goes back to those channels. Drops cached runtimes.
    """
    global _OVERRIDE
    with _LOCK:
        _OVERRIDE = None if methods is None else list(methods)
        _RUNTIMES.clear()


def clear_cache() -> None:
    """Drop this process's cached runtimes: the next run here starts its methods from fresh state."""
    with _LOCK:
        _RUNTIMES.clear()


def _key(methods: Sequence[Any], defaults: Mapping[str, Any]) -> str:
    def plain(item: Any) -> Any:
        return f"<instance {id(item)}>" if isinstance(item, Method) else item

    return json.dumps([[plain(m) for m in methods], defaults], sort_keys=True, default=str)


def get_runtime(algorithm_config: Any = None) -> Runtime:
    """The runtime of this process for the run's method list.

    Args:
        algorithm_config: verl's ``config.algorithm`` where the caller has it (estimator, trainer):
            the method list may come from its ``grpo_plugins`` key, and the built-in ``grpo``
            defaults follow ``norm_adv_by_std_in_grpo``. ``None`` in the workers (loss).
    """
    methods = _OVERRIDE if _OVERRIDE is not None else methods_from(algorithm_config)
    defaults = grpo_defaults(algorithm_config)
    key = _key(methods, defaults)
    with _LOCK:
        runtime = _RUNTIMES.get(key)
        if runtime is None:
            runtime = Runtime(build_composition(methods, defaults))
            _RUNTIMES[key] = runtime
            logger.info("grpo_plugins enabled in verl:\n%s", runtime.composition.describe())
        return runtime
