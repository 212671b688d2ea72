"""The start-up checks of a TRL run, shared by everything that starts one.

:class:`~grpo_plugins_trl.PluginGRPOTrainer` (through :func:`checked_composition`), the training
command ``python -m grpo_plugins_trl.grpo`` (through :func:`prepare_run`) and ``grpo-plugins check``
(through :func:`check_config`) run the same functions, so a config the check accepts is a config
the trainer starts with, and the check reports every problem the trainer would refuse, at once,
with the same messages:

1. the run config's keys: every key is a field of TRL's ``trl grpo`` arguments (``GRPOScriptArguments``,
   :class:`~grpo_plugins_trl.PluginGRPOConfig`, ``ModelConfig``, ``DatasetMixtureConfig``) or ``env``;
   a misspelt key gets the closest field, verl's ``algorithm.grpo_plugins`` is pointed to the top level;
2. the values: the dataclasses are built as ``TrlParser`` builds them (their own checks run);
3. the reward functions resolve (a name of ``trl grpo``'s registry or an import path), a model is named;
4. the dataset loads (the check loads local datasets only; it never downloads);
5. the method list composes (every method that cannot be loaded or configured is reported), and
   the enabled methods can run with these TRL settings and dataset columns (the core's capability
   check against :func:`~grpo_plugins_trl.trainer.trl_capabilities`).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

import torch

from grpo_plugins import Composition
from grpo_plugins.cli import composition_problems
from grpo_plugins.errors import CompositionError
from grpo_plugins.needs import PROMPT_ID_COLUMN, prompt_id_problems

TRAINER = "TRL GRPOTrainer"
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
                      ".arrow": "arrow", ".txt": "text"}
"""A local data file's extension -> the ``datasets`` builder that reads it."""


# ----------------------------------------------------------------------------- the trainer's check
def composition_defaults(args: Any) -> dict[str, dict[str, Any]]:
    """The built-in ``grpo`` method's defaults from TRL's settings: TRL's epsilon 1e-4, ``scale_rewards``,
    ``multi_objective_aggregation`` and arithmetic (``grpo`` alone gives TRL's advantages bit for bit)."""
    from grpo_plugins_trl.trainer import _scale_name

    return {"grpo": {"epsilon": 1e-4, "scale": _scale_name(args.scale_rewards), "arithmetic": "trl",
                     "aggregation": getattr(args, "multi_objective_aggregation", "sum_then_normalize")}}


def trainer_problems(args: Any, methods: Any, dataset: Any = None) -> tuple[Composition | None, list[str]]:
    """``(composition, problems)`` of running ``methods`` with the TRL settings ``args`` (a
    ``GRPOConfig``) on ``dataset``: every method that cannot be built, then every need of the enabled
    methods these settings and dataset columns do not meet. No problem: ``composition`` is the run's."""
    from grpo_plugins_trl.loss import surrogate_problems
    from grpo_plugins_trl.objectives import objective_problems
    from grpo_plugins_trl.refill import refill_problems
    from grpo_plugins_trl.prefix import shared_prefix_problems
    from grpo_plugins_trl.trainer import trl_capabilities

    composition, problems = composition_problems(methods, composition_defaults(args))
    if getattr(args, "shared_prefix", False):
        problems = problems + shared_prefix_problems(args)
    if composition is not None:
        problems = problems + composition.capability_problems(trl_capabilities(args, dataset))
        problems = problems + surrogate_problems(args, composition) + objective_problems(args, composition)
        problems = problems + refill_problems(args, composition, dataset)
        problems = problems + prompt_id_problems(composition, prompt_id_column(dataset))
        from grpo_plugins_trl.injection import injection_problems

        problems = problems + injection_problems(args, composition, dataset)
    return composition, problems


def prompt_id_column(dataset: Any) -> Any:
    """The map-style dataset's ``prompt_id`` column (None: no such column, or a streamed dataset)."""
    if dataset is None or PROMPT_ID_COLUMN not in (getattr(dataset, "column_names", None) or ()):
        return None
    return None if isinstance(dataset, torch.utils.data.IterableDataset) else dataset[PROMPT_ID_COLUMN]


def raise_problems(problems: Sequence[str]) -> None:
    """Raise one :class:`CompositionError` holding every problem (a single one as it is)."""
    if len(problems) == 1:
        raise CompositionError(problems[0])
    if problems:
        raise CompositionError(f"the run cannot start on {TRAINER} ({len(problems)} problems):\n- " + "\n- ".join(problems))


def checked_composition(args: Any, methods: Any, dataset: Any = None) -> Composition:
    """The run's composition after every start-up check of :func:`trainer_problems`.

    Raises:
        CompositionError: listing every problem at once.
    """
    composition, problems = trainer_problems(args, methods, dataset)
    raise_problems(problems)
    assert composition is not None
    return composition


# ----------------------------------------------------------------------------- a run config file
def parser_dataclasses() -> tuple[type, ...]:
    """The dataclasses of the training command: ``trl grpo``'s, with :class:`PluginGRPOConfig` for ``GRPOConfig``."""
    from trl import DatasetMixtureConfig, ModelConfig
    from trl.scripts.grpo import GRPOScriptArguments

    from grpo_plugins_trl.trainer import PluginGRPOConfig

    return GRPOScriptArguments, PluginGRPOConfig, ModelConfig, DatasetMixtureConfig


def known_keys() -> set[str]:
    """Every top-level key a run config may hold."""
    return {f.name for cls in parser_dataclasses() for f in dataclasses.fields(cls) if f.init} | {"env"}


def key_problems(config: Mapping[str, Any]) -> list[str]:
    """Every top-level key of ``config`` the training command does not know, with the closest known one."""
    known = known_keys()
    problems = []
    for key in config:
        if key in known:
            continue
        if key == "algorithm" and isinstance(config[key], Mapping) and "grpo_plugins" in config[key]:
            problems.append(
                "'algorithm.grpo_plugins' is where a verl config names its methods; in a TRL run config "
                "'grpo_plugins' belongs at the top level"
            )
            continue
        close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.75)
        hint = f"did you mean '{close[0]}'?" if close else (
            "not a field of GRPOConfig, ModelConfig or the script arguments of `trl grpo`")
        problems.append(f"unknown key '{key}' in the run config ({hint})")
    if "env" in config and not isinstance(config["env"], Mapping):
        problems.append("`env` field should be a dict in the YAML file.")
    return problems


@dataclass
class Run:
    """Everything the training command needs to build the trainer (see :func:`prepare_run`)."""

    script_args: Any = None
    training_args: Any = None
    model_args: Any = None
    dataset_args: Any = None
    reward_funcs: list = dataclasses.field(default_factory=list)
    dataset: Any = None  # a DatasetDict (or IterableDatasetDict); None when not loaded
    composition: Composition | None = None

    @property
    def train_dataset(self) -> Any:
        return None if self.dataset is None else self.dataset[self.script_args.dataset_train_split]


def parse_settings(config: Mapping[str, Any], argv: Sequence[str] = ()) -> tuple[Any, ...]:
    """The four dataclasses built from ``config`` (YAML values) overridden by the flags ``argv``, as
    ``TrlParser.parse_args_and_config`` builds them.

    Raises:
        ValueError: a flag is unknown, or a dataclass refuses a value.
    """
    from trl import TrlParser

    parser = TrlParser(parser_dataclasses())
    parser.set_defaults_with_config(**{k: v for k, v in config.items() if k != "env"})
    *parsed, remaining = parser.parse_args_into_dataclasses(args=list(argv), return_remaining_strings=True)
    if remaining:
        raise ValueError(f"unknown command-line argument(s) {remaining}")
    return tuple(parsed)


def load_reward_funcs(script_args: Any) -> tuple[list, list[str]]:
    """``(reward functions, problems)`` as ``trl grpo`` loads them: the reward model path, then each of
    ``reward_funcs``, a name of TRL's registry or a dotted import path (the working directory first)."""
    from trl.rewards import accuracy_reward, get_soft_overlong_punishment, reasoning_accuracy_reward, think_format_reward

    registry = {
        "accuracy_reward": lambda: accuracy_reward,
        "reasoning_accuracy_reward": lambda: reasoning_accuracy_reward,
        "think_format_reward": lambda: think_format_reward,
        "get_soft_overlong_punishment": lambda: get_soft_overlong_punishment(max_completion_len=1280, soft_punish_cache=256),
    }
    funcs: list = [script_args.reward_model_name_or_path] if script_args.reward_model_name_or_path else []
    problems = []
    for name in script_args.reward_funcs or []:
        if name in registry:
            funcs.append(registry[name]())
        elif "." in name:
            module_path, attribute = name.rsplit(".", 1)
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            try:
                func = getattr(importlib.import_module(module_path), attribute)
            except (ImportError, AttributeError) as error:
                problems.append(f"reward_funcs: cannot load '{name}': {type(error).__name__}: {error}")
                continue
            if not callable(func):
                problems.append(f"reward_funcs: '{name}' is not callable")
                continue
            funcs.append(func)
        else:
            problems.append(f"reward_funcs: could not load reward function '{name}'. Expected one of "
                            f"{list(registry)} or a valid import path.")
    if not funcs:
        problems.append("no reward: set reward_funcs (registry names or import paths) or reward_model_name_or_path")
    return funcs, problems


def is_local(path: str | None) -> bool:
    return bool(path) and os.path.exists(os.path.expanduser(str(path)))


def load_datasets(script_args: Any, dataset_args: Any) -> Any:
    """The run's datasets as ``trl grpo`` loads them (a ``DatasetDict``), and also a local data file
    (``.jsonl``, ``.json``, ``.csv``, ``.parquet``, ``.arrow``, ``.txt``: its rows form the ``train``
    split) or a folder written by ``Dataset.save_to_disk``.

    Raises:
        ValueError: neither ``datasets`` nor ``dataset_name`` is given, or the file type is unknown.
    """
    from datasets import DatasetDict, load_dataset, load_from_disk

    if dataset_args.datasets:
        from trl import get_dataset

        return get_dataset(dataset_args)
    name = script_args.dataset_name
    if not name:
        raise ValueError("Either `datasets` or `dataset_name` must be provided.")
    streaming = script_args.dataset_streaming
    path = os.path.expanduser(str(name))
    if os.path.isfile(path):
        extension = os.path.splitext(path)[1].lower()
        if extension not in DATA_FILE_BUILDERS:
            raise ValueError(f"dataset_name '{name}': cannot read a '{extension}' file (use one of "
                             f"{', '.join(sorted(DATA_FILE_BUILDERS))})")
        return load_dataset(DATA_FILE_BUILDERS[extension], data_files=path, streaming=streaming)
    if os.path.isdir(path) and (os.path.exists(os.path.join(path, "dataset_dict.json"))
                                or os.path.exists(os.path.join(path, "state.json"))):
        loaded = load_from_disk(path)
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
    return load_dataset(name, name=script_args.dataset_config, streaming=streaming)


def prepare_run(config: Mapping[str, Any], argv: Sequence[str] = (), *, remote: bool = True) -> tuple[Run, list[str]]:
    """Check a run config and gather what the training command needs, reporting every problem.

    Args:
        config: the YAML run config (flat ``GRPOConfig`` fields, ``trl grpo``'s arguments, ``grpo_plugins``).
        argv: command-line flags overriding it (``--learning_rate 1e-5``).
        remote: whether a dataset that is not a local path may be loaded (``False``: it is not loaded,
            and the dataset's columns are not checked; nothing is downloaded).

    Returns:
        ``(run, problems)``: the run may be trained only when ``problems`` is empty.
    """
    run = Run()
    if not isinstance(config, Mapping):
        return run, ["the run config must be a YAML mapping of settings"]
    problems = key_problems(config)
    known = known_keys()
    settings = {k: v for k, v in config.items() if k in known}
    try:
        run.script_args, run.training_args, run.model_args, run.dataset_args = parse_settings(settings, argv)
    except (ValueError, TypeError, ImportError) as error:
        problems.append(f"the TRL settings are refused: {error}")
        # Still check the method list (the trainer settings cannot be read: no capability check).
        args = SimpleNamespace(scale_rewards=config.get("scale_rewards", "group"))
        _, found = composition_problems(config.get("grpo_plugins") or [], composition_defaults(args))
        return run, problems + found
    run.reward_funcs, found = load_reward_funcs(run.script_args)
    problems += found
    if not run.model_args.model_name_or_path:
        problems.append("no model: set model_name_or_path (a local folder or a model id)")
    script_args, dataset_args = run.script_args, run.dataset_args
    sources = [getattr(d, "path", None) for d in dataset_args.datasets] or [script_args.dataset_name]
    if not dataset_args.datasets and not script_args.dataset_name:
        problems.append("Either `datasets` or `dataset_name` must be provided.")
    elif remote or all(is_local(source) for source in sources):
        try:
            run.dataset = load_datasets(script_args, dataset_args)
        except Exception as error:  # noqa: BLE001 - any loading failure is reported with the others
            problems.append(f"cannot load the dataset '{script_args.dataset_name}': {type(error).__name__}: {error}")
        if run.dataset is not None and script_args.dataset_train_split not in run.dataset:
            problems.append(f"dataset_train_split '{script_args.dataset_train_split}' is not a split of the dataset "
                            f"(splits: {', '.join(run.dataset)})")
            run.dataset = None
        strategy = getattr(run.training_args.eval_strategy, "value", run.training_args.eval_strategy)
        if run.dataset is not None and strategy != "no" and script_args.dataset_test_split not in run.dataset:
            problems.append(f"eval_strategy='{strategy}' needs dataset_test_split '{script_args.dataset_test_split}', "
                            f"which is not a split of the dataset (splits: {', '.join(run.dataset)})")
    run.composition, found = trainer_problems(run.training_args, run.training_args.grpo_plugins or [], run.train_dataset)
    problems += found
    return run, problems


def check_config(config: Mapping[str, Any]) -> tuple[Composition | None, list[str]]:
    """``grpo-plugins check`` on a TRL run config: ``(composition, every problem)``; loads local
    datasets only, never downloads, trains nothing."""
    run, problems = prepare_run(config, remote=False)
    return run.composition, problems


def validate_config(config: Mapping[str, Any]) -> list[str]:
    """Every problem that would stop the training command from starting with ``config`` (empty: it starts)."""
    return check_config(config)[1]
