"""The ``grpo-plugins`` command: ``list [--json]``, ``show NAME``, ``check CONFIG``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import yaml

from grpo_plugins.composition import Composition, hooks_of, methods_from_config
from grpo_plugins.config import describe_config
from grpo_plugins.errors import GRPOPluginsError
from grpo_plugins.registry import discover, resolve


def method_records() -> list[dict[str, Any]]:
    """One record per installed method: name, version, distribution, hooks, summary, paper."""
    methods, conflicts = discover()
    records = []
    for name, info in sorted(methods.items()):
        record = {"name": name, "version": info.version, "distribution": info.distribution}
        try:
            cls = info.load()
            record.update(hooks=hooks_of(cls), summary=cls.summary(), paper=cls.paper)
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
        print(f"{r['name']:<16} {r['version']:<8} {r['distribution']:<28} {', '.join(r['hooks'])}{status}")
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
    fields = describe_config(cls.Config)
    print("config:" if fields else "config: (no options)")
    for f in fields:
        print(f"  {f['name']}: {f['type']} = {f['default']!r}  (domain: {f['domain']}; paper: {f['paper']!r})")
        print(f"      {f['help']}")
    return 0


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
    composition = Composition(methods_from_config(config))
    print(f"{args.config}: OK, {len(composition.user_methods)} method(s) composed in this order:")
    print(composition.describe())
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
    check = sub.add_parser("check", help="validate the grpo_plugins list of a run config without training")
    check.add_argument("config", help="a YAML file with a 'grpo_plugins:' list")
    check.set_defaults(run=cmd_check)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except GRPOPluginsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader went away (`grpo-plugins list --json | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
