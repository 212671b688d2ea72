"""The ``grpo-plugins`` command: ``list [--json]``, ``show NAME``, ``check CONFIG``, ``train --config RUN.yaml``."""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import os
import sys
from typing import Any, Mapping, Sequence

import yaml

from grpo_plugins.api import method_range
from grpo_plugins.build import instantiate
from grpo_plugins.composition import Composition, hooks_of, methods_from_config, parse_specs
from grpo_plugins.config import describe_config
from grpo_plugins.errors import CompositionError, GRPOPluginsError
from grpo_plugins.method import Method
from grpo_plugins.needs import class_needs
from grpo_plugins.registry import discover, resolve


def method_records() -> list[dict[str, Any]]:
    """One record per installed method: name, version, distribution, hooks, summary, paper."""
    methods, conflicts = discover()
    records = []
    for name, info in sorted(methods.items()):
        record = {"name": name, "version": info.version, "distribution": info.distribution}
        try:
            cls = info.load()
            record.update(hooks=hooks_of(cls), summary=cls.summary(), paper=cls.paper, plugin_api=method_range(cls))
            needs = class_needs(cls)
            record["needs"] = needs.as_dict() if needs is not None else None
        except GRPOPluginsError as error:
            record.update(hooks=[], summary="", paper="", error=str(error))
        records.append(record)
    for name, infos in sorted(conflicts.items()):
        dists = " and ".join(i.distribution for i in infos)
        records.append({"name": name, "version": "", "distribution": dists, "hooks": [], "summary": "",
                        "paper": "", "error": f"registered by two distributions: {dists}"})
    return records


def cmd_list(args: argparse.Namespace) -> int:
    records = method_records()
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    for r in records:
        status = f"  ERROR: {r['error']}" if "error" in r else ""
        api = f"API {r['plugin_api']}" if r.get("plugin_api") else ""
        print(f"{r['name']:<16} {r['version']:<8} {r['distribution']:<28} {api:<14} {', '.join(r['hooks'])}{status}")
        if r["summary"]:
            print(f"{'':<16} {r['summary']}")
        if r["paper"]:
            print(f"{'':<16} {r['paper']}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    info = resolve(args.name)
    cls = info.load()
    print(f"{info.name} {info.version} ({info.distribution})")
    print(cls.summary())
    if cls.paper:
        print(f"paper: {cls.paper}")
    print(f"hooks: {', '.join(hooks_of(cls))}")
    needs = class_needs(cls)
    for line in needs.lines() if needs is not None else ["(cannot be built with its default config)"]:
        print(f"needs {line}")
    fields = describe_config(cls.Config)
    print("config:" if fields else "config: (no options)")
    for f in fields:
        print(f"  {f['name']}: {f['type']} = {f['default']!r}  (domain: {f['domain']}; paper: {f['paper']!r})")
        print(f"      {f['help']}")
    return 0


VERL_SECTIONS = frozenset(
    ("actor_rollout_ref", "data", "trainer", "critic", "reward_model", "reward", "custom_reward_function",
     "ray_kwargs", "model_engine", "distillation", "transfer_queue", "global_profiler", "sandbox_fusion")
)
"""Top-level sections of a verl (Hydra) run config; ``algorithm`` alone is verl's too."""
TRAINERS = ("auto", "trl", "verl", "none")


def composition_problems(
    methods: Any, defaults: Mapping[str, Mapping] | None = None
) -> tuple[Composition | None, list[str]]:
    """Build the run's composition as the trainers do; on failure, find **every** problem.

    Returns ``(composition, problems)``. With no problem, ``composition`` is the run's. Otherwise the
    problems are the messages :class:`Composition` raises, one per method that cannot be loaded or
    configured (each method is tried alone), then the composition's own first error; ``composition``
    is then the composition of the methods that could be built (None when that fails too), so that
    an adapter can still report what the trainer settings do to them.
    """
    try:
        return Composition(methods, defaults), []
    except CompositionError as error:
        first = str(error)
    try:
        parsed = parse_specs(methods)
    except CompositionError as error:
        return None, [str(error)]
    problems, failed, good = [], set(), []
    for name, spec in parsed:
        try:
            instantiate(name, spec, defaults or {})
        except CompositionError as error:
            problems.append(str(error))
            failed.add(name)
        else:
            good.append(spec if isinstance(spec, Method) else {name: spec})
    if not problems:
        return None, [first]
    try:
        return Composition(good, defaults), problems
    except CompositionError as error:  # reported unless it is about a method that already failed
        if not any(f"'{name}'" in str(error) for name in failed):
            problems.append(str(error))
        return None, problems


def config_kind(config: Mapping[str, Any]) -> str:
    """``"verl"`` for a nested verl config, ``"trl"`` for flat ``GRPOConfig`` fields, ``"none"`` for a
    file holding only ``grpo_plugins:`` (checked without a trainer)."""
    keys = set(config) - {"grpo_plugins"}
    if keys & VERL_SECTIONS or keys == {"algorithm"}:
        return "verl"
    return "trl" if keys else "none"


def check_problems(config: Any, trainer: str = "auto") -> tuple[str, Composition | None, list[str]]:
    """Every reason the trainer would refuse the run config ``config``: ``(trainer, composition, problems)``.

    A TRL config (flat ``GRPOConfig`` fields, as ``python -m grpo_plugins_trl.grpo`` reads it) is
    checked by ``grpo_plugins_trl.checks.validate_config``, a verl config (nested sections) by
    ``grpo_plugins_verl.checks.validate_config``: the functions the trainers run at start-up. A file
    with only ``grpo_plugins:`` is checked as a composition.
    """
    if not isinstance(config, Mapping):
        return "none", None, ["the config must hold a mapping with a 'grpo_plugins:' list"]
    kind = config_kind(config) if trainer == "auto" else trainer
    if kind == "none":
        unknown = sorted(set(config) - {"grpo_plugins"}, key=str)
        problems = [f"unknown key '{key}'{_suggest(str(key), ['grpo_plugins'])}" for key in unknown]
        try:
            methods = methods_from_config(config)
        except CompositionError as error:
            return kind, None, problems + [str(error)]
        composition, found = composition_problems(methods)
        return kind, composition, problems + found
    module = f"grpo_plugins_{kind}.checks"
    try:
        checks = importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name not in (f"grpo_plugins_{kind}", module, kind):
            raise
        adapter = {"trl": "grpo-plugins-trl", "verl": "grpo-plugins-verl"}[kind]
        return kind, None, [f"this looks like a {kind} run config; checking it needs the {kind} adapter: pip install {adapter} "
                            "(or pass --trainer none to check the method list alone)"]
    composition, problems = checks.check_config(config)
    return kind, composition, problems


def _suggest(word: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def cmd_check(args: argparse.Namespace) -> int:
    try:
        with open(args.config) as handle:
            config = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError) as error:
        print(f"error: cannot read {args.config}: {error}", file=sys.stderr)
        return 1
    if not isinstance(config, dict):
        print(f"error: {args.config} must hold a mapping with a 'grpo_plugins:' list", file=sys.stderr)
        return 1
    kind, composition, problems = check_problems(config, args.trainer)
    if problems:
        print(f"error: {args.config}: {len(problems)} problem{'s' if len(problems) > 1 else ''}:", file=sys.stderr)
        for problem in problems:
            print("- " + problem.replace("\n", "\n  "), file=sys.stderr)
        return 1
    trainer = {"trl": " for TRL GRPOTrainer", "verl": " for verl"}.get(kind, "")
    print(f"{args.config}: OK{trainer}, {len(composition.user_methods)} method(s) composed in this order:")
    print(composition.describe())
    return 0


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    try:
        from grpo_plugins_trl import grpo
    except ModuleNotFoundError as error:
        if error.name not in ("grpo_plugins_trl", "grpo_plugins_trl.grpo", "trl"):
            raise
        print("error: `grpo-plugins train` runs TRL's GRPOTrainer through the TRL adapter, which is not installed: "
              "pip install grpo-plugins-trl (verl users: python -m grpo_plugins_verl.main +grpo_plugins=[...])",
              file=sys.stderr)
        return 1
    return grpo.main(extra)


def cmd_test(args: argparse.Namespace) -> int:
    import pytest

    resolve(args.name)  # an unknown method is an error before pytest starts
    return int(pytest.main(["-p", "no:cacheprovider", f"--grpo-plugins-conformance={args.name}", *args.pytest_args]))


def cmd_new(args: argparse.Namespace) -> int:
    from grpo_plugins.scaffold import write_distribution

    hooks = [h.strip() for h in args.hooks.split(",") if h.strip()]
    folder = write_distribution(args.name, args.directory, hooks)
    print(f"wrote {folder}: pip install -e {folder} && pytest {folder}/tests && grpo-plugins list")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="grpo-plugins", description="GRPO method plugins: list, inspect, validate.")
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="every installed method, its version, hooks and paper link")
    listing.add_argument("--json", action="store_true", help="a JSON list with one object per method")
    listing.set_defaults(run=cmd_list)
    show = sub.add_parser("show", help="a method's config fields with defaults and help")
    show.add_argument("name")
    show.set_defaults(run=cmd_show)
    check = sub.add_parser(
        "check", help="run the trainer's start-up validation of a run config (TRL or verl) and report every problem"
    )
    check.add_argument("config", help="a TRL run config (flat GRPOConfig fields + grpo_plugins:), a verl config "
                       "(nested sections, grpo_plugins at the top level) or a file with only a grpo_plugins: list")
    check.add_argument("--trainer", choices=TRAINERS, default="auto",
                       help="the trainer the config is for (default: recognised from its keys)")
    check.set_defaults(run=cmd_check)
    test = sub.add_parser("test", help="run the conformance suite against an installed method (pytest)")
    test.add_argument("name")
    test.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --), e.g. -- -x -k state")
    test.set_defaults(run=cmd_test)
    new = sub.add_parser("new", help="write a ready-to-install method distribution from the template")
    new.add_argument("name", help="the method's name (a Python identifier, e.g. my_method)")
    new.add_argument("--hooks", default="shape_rewards",
                     help="comma-separated hooks to implement (default: shape_rewards); see docs/hooks.md")
    new.add_argument("--directory", default=".", help="where to write grpo-plugin-<name>/ (default: here)")
    new.set_defaults(run=cmd_new)
    train = sub.add_parser(
        "train", add_help=False, help="train with TRL from a run config: the same as python -m grpo_plugins_trl.grpo "
        "(--config run.yaml, every `trl grpo` argument, grpo_plugins:)"
    )
    train.set_defaults(run=cmd_train)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return cmd_train(args, extra) if args.command == "train" else args.run(args)
    except GRPOPluginsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader went away (`grpo-plugins list --json | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
