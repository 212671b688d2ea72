"""Learning benchmark: does a method (or a composed stack) reach vanilla GRPO's accuracy with fewer rollouts?

    python benchmarks/learning.py --quick          # vanilla, the oracle, knapsack_rl, ngrpo; 2 seeds, 24 steps
    python benchmarks/learning.py                  # every installed method and four stacks (resumable)
    python benchmarks/learning.py --only my_method # one method's rows, against the stored vanilla runs
    python benchmarks/learning.py --report-only    # rebuild the table from the stored runs, train nothing

Task (``benchmarks/learning_task.py``): addition at four levels (operand digits ``1+1``, ``2+1``, ``2+2``,
``3+2``) on a ~0.1M-parameter Qwen2 model built locally, warm-started once, single-threaded and seeded, to a
mid-range accuracy (the checkpoint's SHA-256 is recorded); 600 held-out problems, greedy exact match per
level; one 0/1 exact-answer reward. Every configuration trains from the same checkpoint with the same
rollouts per step and steps, on two prompt pools:

- ``revisited``: a pool each prompt of which is drawn about ten times over the run (about 2.4 times by the
  target; multi-epoch training: methods that learn from history can act);
- ``fresh``: a pool three times larger than the run consumes (each prompt is seen at most once).

Full mode: 100 steps x 16 prompts x 8 completions (12,800 rollouts per run), Adam at lr 1e-4, evaluation every
2 steps (curves: trailing means of 4 evaluations). The curve has three phases: within ~5 steps every
configuration fixes the warm start's off-by-one answers (0.52 -> ~0.65; the progress per step is bounded by
the optimiser's step, so no prompt choice can speed it up), then accuracy climbs slowly, and there the
information in each batch decides the pace; from about step 70 vanilla's curve is flat (``noise.flat``: its
gain over the last 30 % of the budget is within the seed noise). The target -- vanilla's mean accuracy at
24 % of the budget (step 24, 3,072 rollouts) -- lies in the climb; the area under the curve and the final
accuracy cover the whole budget, the plateau included.

Reported per configuration and regime, over seeds: rollouts (completions generated, refill rounds
included, counted by a probe) to reach the target, per seed and median, and the per-seed ratio to
vanilla's; the area under the accuracy curve over the budget; final accuracy per level; the fraction of
groups with zero advantage signal; CPU seconds per step relative to vanilla; and a verdict (better / worse
/ tie) in which differences within the measured seed noise are ties. ``noise.sd_at_target`` is the seed
sd of vanilla's accuracy at the target; ``sensitivity.oracle_rollouts_ratio`` is what an oracle that
drops the prompts the model already solves saves (``learning_configs.Oracle``); ``goals`` checks the
best stack's ratio and the zero-signal fraction against the targets the benchmark was built for.

Every run is stored as JSON under ``<out>/learning.runs/<mode>/<regime>/<configuration>/seed<k>.json`` with a
key of everything that determines it (the checkpoint hash included), so an interrupted benchmark continues
where it stopped, and a method added later runs only its own rows while the table keeps every stored row.
Runs go to ``--jobs`` processes of one thread each. Writes ``<out>/learning.{json,md,png}`` (the picture: one
panel per regime) and prints the headline as one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import learning_stats as stats  # noqa: E402
from learning_configs import (  # noqa: E402
    BASELINE, ORACLE, Configuration, choose_stacks, discover_configurations, stack_configuration,
)
from learning_task import RunSettings, TaskSettings  # noqa: E402

REGIMES = ("revisited", "fresh")
RESULTS = os.path.join(HERE, "results")


@dataclass(frozen=True)
class Mode:
    """The sizes of one benchmark mode."""

    name: str
    run: RunSettings
    seeds: int  # every configuration
    seeds_confirmed: int  # vanilla, the oracle, the stacks and every configuration called better than vanilla
    target_fraction: float  # the target is vanilla's accuracy at this fraction of the budget
    revisits: int  # times each prompt of the revisited pool is drawn over the run
    stacks: int
    window: int  # the curve at a grid point is the mean of the last `window` evaluations
    configurations: tuple[str, ...] | None  # exact configuration names; None: every installed method


FULL = Mode("full", RunSettings(steps=100, prompts_per_step=16, num_generations=8, lr=1e-4, eval_every=2),
            seeds=3, seeds_confirmed=5, target_fraction=0.24, revisits=10, stacks=4, window=4, configurations=None)
QUICK = Mode("quick", RunSettings(steps=24, prompts_per_step=16, num_generations=8, lr=1e-4, eval_every=4),
             seeds=2, seeds_confirmed=2, target_fraction=0.5, revisits=4, stacks=0, window=2,
             configurations=(ORACLE, "knapsack_rl", "ngrpo"))


# ----------------------------------------------------------------------------- one run (in a worker process)
_WORKER: dict[str, Any] = {}


def task_settings(mode: Mode) -> TaskSettings:
    draws = mode.run.steps * mode.run.prompts_per_step
    return TaskSettings(revisited_pool=max(mode.run.prompts_per_step, draws // mode.revisits), fresh_pool=3 * draws)


def _load_task(task: TaskSettings) -> dict[str, Any]:
    """Problem sets, the warm-start checkpoint and the evaluator, once per process."""
    if _WORKER.get("task") != task:
        import torch
        from transformers.utils import logging as hf_logging

        from learning_task import GreedyEvaluator, load_warm_start, problem_sets

        hf_logging.set_verbosity_error()
        torch.set_num_threads(1)
        sets = problem_sets(task)
        model, tokenizer, digest = load_warm_start(task, sets["warm"])
        _WORKER.update(task=task, sets=sets, model=model, tokenizer=tokenizer, hash=digest,
                       evaluator=GreedyEvaluator(tokenizer, sets["eval"]))
    return _WORKER


def warm_start_info(task: TaskSettings) -> dict[str, Any]:
    """The checkpoint hash and its accuracy per level (computes and caches the warm start once)."""
    from learning_task import mean_over_levels

    state = _load_task(task)
    by_level = state["evaluator"].accuracy_by_level(state["model"])
    return {"checkpoint_sha256": state["hash"], "accuracy_by_level": by_level, "accuracy": mean_over_levels(by_level)}


def run_one(config: Configuration, regime: str, seed: int, task: TaskSettings, run: RunSettings) -> dict[str, Any]:
    """Train one configuration on one pool with one seed; a configuration that cannot run returns ``skipped``."""
    import traceback

    from learning_configs import Oracle, SignalProbe, extra_reward_funcs
    from learning_task import grpo_run

    state = _load_task(task)
    pool = state["sets"][regime]
    last_error = ""
    for extras in (False, True):
        probe = SignalProbe()
        plugins: list[Any] = config.spec()
        oracle = None
        if config.kind == "oracle":
            oracle = Oracle(pool, state["tokenizer"])
            plugins = [oracle]

        def attach(trainer, oracle=oracle, probe=probe):
            probe.trainer = trainer  # completions of refill rounds (filter_groups, keep_rows) are rollouts too
            if oracle is not None:
                oracle.model = trainer.model

        try:
            result = grpo_run(
                state["model"], state["tokenizer"], pool, state["evaluator"], [*plugins, probe], run, seed,
                reward_funcs=extra_reward_funcs() if extras else None, on_trainer=attach,
            )
        except Exception as error:  # noqa: BLE001 - the reason goes into the results
            last_error = f"{type(error).__name__}: {error}".strip()
            tail = traceback.format_exc(limit=-2)
            if extras:
                return {"skipped": f"fails on the addition task (also with a second reward component): {last_error}",
                        "traceback": tail}
            continue
        result.pop("trainer")
        cumulative, rollouts_at = 0, {"0": 0}
        for step, count in enumerate(probe.completions, start=1):
            cumulative += count
            rollouts_at[str(step)] = cumulative
        result.update(
            rollouts_at={str(step): rollouts_at[str(step)] for step, _ in result["curve"]},
            rollouts=cumulative, steps=len(probe.completions),
            zero_signal=statistics.mean(probe.zero_signal) if probe.zero_signal else math.nan,
            seconds_train_cpu=result["seconds_cpu"] - result.pop("seconds_eval_cpu"),
            extras=["accuracy + format rewards"] if extras else [], first_error=last_error if extras else "",
        )
        return result
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- the store of runs
TRAINED = {"runs": 0}  # runs trained by this invocation


def run_key(config: Configuration, regime: str, seed: int, task: TaskSettings, run: RunSettings, checkpoint: str) -> str:
    from learning_configs import Oracle

    parts = [config.spec(), config.kind, regime, seed, asdict(task), asdict(run), checkpoint]
    if config.kind == "oracle":
        parts.append(Oracle.version)
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_path(out: str, mode: str, config: Configuration, regime: str, seed: int) -> str:
    safe = "".join(c if c.isalnum() or c in "+_-[]." else "_" for c in config.name)
    return os.path.join(out, "learning.runs", mode, regime, safe, f"seed{seed}.json")


def stored_stacks(out: str, mode: str) -> list[str]:
    """Names of the stacks (``a+b``) with stored runs of this mode."""
    root = os.path.join(out, "learning.runs", mode)
    names = {name for regime in REGIMES if os.path.isdir(os.path.join(root, regime))
             for name in os.listdir(os.path.join(root, regime)) if "+" in name}
    return sorted(names)


def load_run(path: str, key: str) -> dict[str, Any] | None:
    """A stored run if it was made with exactly these settings (``key``), else None."""
    try:
        with open(path) as handle:
            stored = json.load(handle)
    except (OSError, ValueError):
        return None
    return stored if stored.get("key") == key else None


def save_run(path: str, record: dict[str, Any]) -> None:
    save_json(path, record)


def restore_floats(value: Any) -> Any:
    if value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, dict):
        return {k: restore_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [restore_floats(v) for v in value]
    return value


def budget_of(run: RunSettings) -> int:
    """Rollouts every configuration is given: the steps times the completions of a plain step."""
    return run.steps * run.prompts_per_step * run.num_generations


def loaded(record: dict[str, Any], mode: Mode) -> dict[str, Any]:
    """A stored run as the statistics read it: the mode's smoothing window, the curve cut at the budget."""
    record = dict(record, window=mode.window)
    return record if "skipped" in record else stats.within_budget(record, budget_of(mode.run))


def execute(jobs: list[tuple[Configuration, str, int]], mode: Mode, task: TaskSettings, checkpoint: str, out: str,
            workers: int, rerun: set[str], train: bool = True) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Every job's run: from the store when its key matches (unless its configuration is in ``rerun``), else
    (``train``) trained in ``workers`` processes of one thread each and stored as soon as it finishes."""
    import multiprocessing

    results, todo = {}, []
    for config, regime, seed in jobs:
        key = run_key(config, regime, seed, task, mode.run, checkpoint)
        path = run_path(out, mode.name, config, regime, seed)
        stored = None if config.name in rerun else load_run(path, key)
        if stored is not None:
            results[(config.name, regime, seed)] = loaded(restore_floats(stored), mode)
        else:
            todo.append((config, regime, seed, key, path))
    if not todo or not train:
        return results
    print(f"{len(todo)} runs to do ({len(jobs) - len(todo)} stored), {workers} processes", flush=True)
    TRAINED["runs"] += len(todo)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(run_one, config, regime, seed, task, mode.run): (config, regime, seed, key, path)
                   for config, regime, seed, key, path in todo}
        for future in as_completed(futures):
            config, regime, seed, key, path = futures[future]
            record = future.result()
            record.update(key=key, configuration=config.name, plugins=config.spec(), regime=regime, seed=seed,
                          checkpoint_sha256=checkpoint)
            save_run(path, record)
            results[(config.name, regime, seed)] = loaded(record, mode)
            if "skipped" in record:
                print(f"{regime:<9} {config.name:<32} seed {seed}: skipped ({record['skipped'][:120]})", flush=True)
            else:
                from learning_task import mean_over_levels

                print(f"{regime:<9} {config.name:<32} seed {seed}: final acc "
                      f"{mean_over_levels(record['curve'][-1][1]):.3f}, zero-signal {record['zero_signal']:.2f}, "
                      f"{record['seconds_train_cpu']:.0f} s CPU", flush=True)
    return results


# ----------------------------------------------------------------------------- summaries
def target_rollouts(vanilla: list[dict[str, Any]], fraction: float) -> float:
    """The first grid point (after step 0) at or beyond ``fraction`` of the budget."""
    grid = [x for x, _ in stats.mean_curve(vanilla[0])[1:]]
    return next((x for x in grid if x >= fraction * grid[-1]), grid[-1])


def identical(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["curve"] == b["curve"] and a["reward"] == b["reward"]


def summarise_regime(configs: list[Configuration], results: dict, regime: str, mode: Mode) -> dict[str, Any]:
    """Noise, sensitivity and one record per configuration in one regime."""

    def runs_of(name: str) -> list[dict[str, Any]]:
        found = [results[k] for k in sorted(results) if k[0] == name and k[1] == regime]
        return [r for r in found if "skipped" not in r]

    vanilla = runs_of(BASELINE)
    target = stats.noise(vanilla, target_rollouts(vanilla, mode.target_fraction))
    records = {}
    for config in configs:
        if config.skip:
            records[config.name] = {"configuration": config.name, "regime": regime, "kind": config.kind,
                                    "skipped": config.skip}
            continue
        runs = runs_of(config.name)
        skipped = [results[k]["skipped"] for k in sorted(results) if k[:2] == (config.name, regime)
                   and "skipped" in results[k]]
        if not runs:
            if skipped:
                records[config.name] = {"configuration": config.name, "regime": regime, "kind": config.kind,
                                        "skipped": skipped[0]}
            continue
        vanilla_by_seed = {r["seed"]: r for r in vanilla}
        paired = [vanilla_by_seed[r["seed"]] for r in runs if r["seed"] in vanilla_by_seed]
        record = stats.summarise(runs, paired, target)
        record.update(
            configuration=config.name, regime=regime, kind=config.kind, category=config.category,
            plugins=config.spec(),
            identical_to_vanilla_seeds=sum(identical(r, vanilla_by_seed[r["seed"]]) for r in runs
                                           if r["seed"] in vanilla_by_seed),
            extras=sorted({e for r in runs for e in r.get("extras", [])}),
        )
        if config.name == BASELINE:
            record["verdict"] = "reference"
        records[config.name] = record
    out = {"noise": target, "records": records}
    if ORACLE in records and "skipped" not in records[ORACLE]:
        ratio = records[ORACLE]["rollouts_ratio"]
        out["sensitivity"] = {"oracle_rollouts_ratio": ratio["median"], "oracle_rollouts_ratio_min": ratio["min"],
                              "oracle_rollouts_ratio_max": ratio["max"], "per_seed": ratio["per_seed"],
                              "oracle_auc": records[ORACLE]["auc"], "vanilla_auc": records[BASELINE]["auc"]}
    return out


def goals(regimes_report: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals checked against the table: the best stack's median rollouts ratio in the revisited
    regime (goal: <= 0.5), the lowest zero-signal group fraction of a method or stack that does not learn
    worse than vanilla, against vanilla's (goal: <= 0.1), and the configurations whose defaults learn worse
    than vanilla beyond the noise."""
    out: dict[str, Any] = {}
    part = regimes_report.get("revisited")
    if part is not None:
        records = [r for r in part["records"].values() if "skipped" not in r]
        stacks = [r for r in records if r["kind"] == "stack"]

        def ratio(record: dict[str, Any]) -> float:
            median = record["rollouts_ratio"]["median"]
            return median if median == median else math.inf  # NaN (no seed reached the target): last

        if stacks:
            best = min(stacks, key=lambda r: (ratio(r), -r["auc"]["mean"]))
            out["best_stack"] = {"configuration": best["configuration"], "rollouts_ratio": best["rollouts_ratio"],
                                 "verdict": best["verdict"], "seeds": best["seeds"], "goal": 0.5,
                                 "holds": ratio(best) <= 0.5}
        methods = [r for r in records if r["kind"] in ("single", "paper", "stack") and r["verdict"] != "worse"]
        if methods and BASELINE in part["records"]:
            lowest = min(methods, key=lambda r: r["zero_signal_group_fraction"])
            out["zero_signal"] = {"vanilla": part["records"][BASELINE]["zero_signal_group_fraction"],
                                  "lowest": lowest["zero_signal_group_fraction"], "configuration": lowest["configuration"],
                                  "goal": 0.1, "holds": lowest["zero_signal_group_fraction"] <= 0.1}
    out["worse_than_vanilla"] = {regime: sorted(name for name, r in part["records"].items()
                                                if r.get("verdict") == "worse" and r["kind"] == "single")
                                 for regime, part in regimes_report.items()}
    return out



def invocations_path(out: str, mode: str) -> str:
    return os.path.join(out, "learning.runs", mode, "invocations.json")


def record_invocation(out: str, mode: str, entry: dict[str, Any]) -> None:
    """Appends one training invocation (start, end, wall seconds, runs trained, processes) to the mode's log."""
    path = invocations_path(out, mode)
    try:
        with open(path) as handle:
            log = json.load(handle)
    except (OSError, ValueError):
        log = []
    log.append(entry)
    save_json(path, log)


def save_json(path: str, value: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as handle:
        json.dump(stats.json_safe(value), handle, indent=1)
    os.replace(tmp, path)


def cost_of(out: str, mode: str, results: dict, run: dict[str, Any]) -> dict[str, Any]:
    """The measured cost: every training invocation of this mode with these run settings ``run`` (from its
    log; invocations under other settings trained runs the table no longer holds) and the stored runs' own
    wall and CPU seconds."""
    try:
        with open(invocations_path(out, mode)) as handle:
            log = [entry for entry in json.load(handle) if entry.get("run") == run]
    except (OSError, ValueError):
        log = []
    runs = [r for r in results.values() if "skipped" not in r]
    return {
        "invocations": log,
        "runs_trained": sum(e["runs_trained"] for e in log),
        "wall_minutes": sum(e["seconds_wall"] for e in log) / 60,
        "jobs": max((e["jobs"] for e in log), default=0),
        "stored_runs": len(results),
        "run_cpu_seconds": sum(r.get("seconds_cpu", 0.0) for r in runs),
        "run_wall_seconds": sum(r.get("seconds_wall", 0.0) for r in runs),
    }


README_START, README_END = "<!-- learning-leaderboard:start -->", "<!-- learning-leaderboard:end -->"


def leaderboard(report: dict[str, Any]) -> str:
    """The README's leaderboard: one row per configuration, both regimes side by side (ratio of rollouts to
    vanilla's target, median [min, max], and the verdict), ranked by the revisited pool's AUC."""
    regimes = list(report["regimes"])
    names = sorted({n for part in report["regimes"].values() for n, r in part["records"].items() if "skipped" not in r},
                   key=lambda n: (-report["regimes"][regimes[0]]["records"].get(n, {}).get("auc", {}).get("mean", 0), n))
    head = "| configuration | " + " | ".join(f"{g}: rollouts vs vanilla [min, max] | {g}: verdict" for g in regimes) + " |"
    lines = [head, "|---|" + "---|---|" * len(regimes)]
    for name in names:
        cells = []
        for regime in regimes:
            r = report["regimes"][regime]["records"].get(name)
            if r is None or "skipped" in r:
                cells += ["-", "-"]
                continue
            ratio = r["rollouts_ratio"]
            same = " (= vanilla)" if r["identical_to_vanilla_seeds"] == r["seeds"] and name != BASELINE else ""
            cells += [f"{fmt(ratio['median'], '.2f')} [{fmt(ratio['min'], '.2f')}, {fmt(ratio['max'], '.2f')}]",
                      f"{r['verdict']}{same} ({r['seeds']} seeds)"]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_docs(report: dict[str, Any]) -> None:
    """``docs/benchmarks.md`` (the full results page, generated) and the README's leaderboard (between its
    ``learning-leaderboard`` markers; left alone when the markers are missing)."""
    root = os.path.dirname(HERE)
    page = markdown(report).replace("](learning.png)", "](../benchmarks/results/learning.png)")
    header = (
        "<!-- generated by benchmarks/learning.py from benchmarks/results/learning.runs/full; do not edit -->\n"
        "# Benchmarks: learning efficiency\n\n"
        "Does a method (or a composed stack) reach vanilla GRPO's accuracy with fewer rollouts? How the task, "
        "the regimes, the target, the noise and the verdicts are defined: `benchmarks/learning.py`'s docstring. "
        "Run `python benchmarks/learning.py --only my_method` to add a method's rows against the stored vanilla "
        "runs, `--report-only` to rebuild this page.\n\n"
    )
    with open(os.path.join(root, "docs", "benchmarks.md"), "w") as handle:
        handle.write(header + page.split("\n", 1)[1].lstrip("\n"))
    readme = os.path.join(root, "README.md")
    with open(readme) as handle:
        text = handle.read()
    if README_START in text and README_END in text:
        before, rest = text.split(README_START, 1)
        _, after = rest.split(README_END, 1)
        with open(readme, "w") as handle:
            handle.write(before + README_START + "\n" + leaderboard(report) + "\n" + README_END + after)


def fmt(value: Any, spec: str = ".0f") -> str:
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return format(value, spec)


def result_stem(mode: str) -> str:
    """``learning`` for the full mode, ``learning.<mode>`` otherwise: a quick run never overwrites full results."""
    return "learning" if mode == FULL.name else f"learning.{mode}"


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    run = s["run"]
    warm = report["warm_start"]
    lines = [
        f"# Learning benchmark ({s['mode']} mode" + (f", a partial run: {' '.join(s['partial'])}" if s["partial"] else "")
        + ")",
        "",
        f"{run['steps']} steps x {run['prompts_per_step']} prompts x {run['num_generations']} completions "
        f"({run['steps'] * run['prompts_per_step'] * run['num_generations']} rollouts per run), lr {run['lr']}, "
        f"evaluation every {run['eval_every']} steps on {len(warm['accuracy_by_level']) * s['task']['eval_per_level']} "
        f"held-out problems (greedy exact match), levels {', '.join(warm['accuracy_by_level'])}; curves are trailing "
        f"means of {s['window']} evaluations, cut at the rollout budget (a configuration that generates extra "
        "rollouts, e.g. refills, is judged on its evaluations within the budget).",
        f"Warm start: checkpoint sha256 `{warm['checkpoint_sha256'][:16]}...`, accuracy {warm['accuracy']:.3f} ("
        + ", ".join(f"{k}: {v:.2f}" for k, v in warm["accuracy_by_level"].items()) + ").",
        "",
    ]
    cost = report.get("cost", {})
    if cost.get("invocations"):
        lines += [
            f"Cost: {cost['runs_trained']} runs trained in {cost['wall_minutes']:.0f} min of wall time over "
            f"{len(cost['invocations'])} invocation(s) with `--jobs {cost['jobs']}` on this {os.cpu_count()}-core "
            f"machine (shared); {cost['stored_runs']} stored runs, {cost['run_cpu_seconds'] / 60:.0f} CPU-minutes in "
            "the runs themselves.",
            "",
        ]
    g = report.get("goals", {})
    if g:
        lines += ["## Goals", ""]
        if "best_stack" in g:
            b = g["best_stack"]
            r = b["rollouts_ratio"]
            lines.append(
                f"- Best composed stack (revisited pool): `{b['configuration']}` needs {fmt(r['median'], '.2f')}x vanilla's "
                f"rollouts (per seed {fmt(r['min'], '.2f')}-{fmt(r['max'], '.2f')}, {b['seeds']} seeds; verdict "
                f"{b['verdict']}); goal <= 0.5x: **{'holds' if b['holds'] else 'does not hold'}**.")
        else:
            lines.append("- Best composed stack: no stack has stored runs; the goal (<= 0.5x) is **not checked**.")
        if "zero_signal" in g:
            z = g["zero_signal"]
            lines.append(
                f"- Zero-signal groups (revisited pool): vanilla {z['vanilla']:.2f}, lowest of a configuration not "
                f"worse than vanilla `{z['configuration']}` {z['lowest']:.2f}; goal <= 0.1: "
                f"**{'holds' if z['holds'] else 'does not hold'}**.")
        for regime, names in g.get("worse_than_vanilla", {}).items():
            lines.append(f"- Worse than vanilla beyond the noise with defaults ({regime} pool): "
                         + (", ".join(f"`{n}`" for n in names) if names else "none") + ".")
        lines.append("")
    for regime, part in report["regimes"].items():
        noise = part["noise"]
        lines += [
            f"## Regime: {regime} pool ({s['pools'][regime]} prompts)",
            "",
            f"Target: vanilla's mean accuracy at {noise['target_rollouts']:.0f} rollouts = {noise['target_accuracy']:.3f}; "
            f"seed sd there `noise.sd_at_target` = {noise['sd_at_target']:.4f} ({noise['seeds']} seeds"
            + (f"; {noise['sd_at_target_3_seeds']:.4f} over seeds 0-2" if "sd_at_target_3_seeds" in noise else "")
            + f"); sd of AUC {noise['sd_auc']:.4f}.",
        ]
        if "tail_gain" in noise:
            lines.append(
                f"Vanilla's curve from {noise['tail_rollouts']:.0f} rollouts to the end of the budget gains "
                f"{noise['tail_gain']:+.4f} (seed sd at the end {noise['sd_final']:.4f}): "
                + ("**flat** (within the noise)." if noise["flat"] else "**still rising** (beyond the noise)."))
        if "sensitivity" in part:
            sens = part["sensitivity"]
            lines.append(
                f"Sensitivity: the oracle needs {fmt(sens['oracle_rollouts_ratio'], '.2f')}x vanilla's rollouts to reach "
                f"the target (per seed {fmt(sens['oracle_rollouts_ratio_min'], '.2f')}-"
                f"{fmt(sens['oracle_rollouts_ratio_max'], '.2f')})."
            )
        lines += [
            "",
            "| configuration | verdict | rollouts to target, median [per seed] | ratio to vanilla [min, max] | AUC (sd) "
            "| final acc. (sd) | by level | zero-signal groups | step time vs vanilla | seeds |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        ranked = sorted(part["records"].values(), key=lambda r: ("skipped" in r, -r.get("auc", {}).get("mean", 0)))
        for r in ranked:
            if "skipped" in r:
                continue
            per_seed = ", ".join(fmt(x) for x in r["rollouts_to_target"]["per_seed"])
            ratio = r["rollouts_ratio"]
            same = " (= vanilla)" if r["identical_to_vanilla_seeds"] == r["seeds"] and r["configuration"] != BASELINE else ""
            lines.append(
                f"| {r['configuration']} | {r['verdict']}{same} | {fmt(r['rollouts_to_target']['median'])} [{per_seed}] | "
                f"{fmt(ratio['median'], '.2f')} [{fmt(ratio['min'], '.2f')}, {fmt(ratio['max'], '.2f')}] | "
                f"{r['auc']['mean']:.3f} ({r['auc']['sd']:.3f}) | {r['final_accuracy']['mean']:.3f} "
                f"({r['final_accuracy']['sd']:.3f}) | "
                + ", ".join(f"{v:.2f}" for v in r["final_accuracy"]["by_level"].values())
                + f" | {r['zero_signal_group_fraction']:.2f} | {r['relative_step_time']:.2f} | {r['seeds']} |"
            )
        skipped = [r for r in part["records"].values() if "skipped" in r]
        if skipped:
            lines += ["", "Not run on this task:", ""]
            lines += [f"- `{r['configuration']}`: {r['skipped'][:300]}" for r in skipped]
        lines += [""]
    lines += [
        f"![accuracy against rollouts, one panel per regime]({result_stem(s['mode'])}.png)",
        "",
        "Verdict: the difference of mean AUC to vanilla against twice its standard error (seed sd floored at "
        "vanilla's); within it, a tie. `inf`: the target was never reached. `(= vanilla)`: every seed trained "
        "bit for bit like vanilla's. A rollouts ratio below 1 with a `tie` verdict is not a win. Zero-signal "
        "groups are counted on the advantages the loss receives: a method with its own objective (`copg`, "
        "`disco`) shows 1.00, one that adds a non-reward term to every advantage shows about 0.",
        "",
        "How the settings were chosen (measured on this task): the first ~5 steps fix the warm start's "
        "off-by-one answers at a pace bounded by Adam's step, so the target sits later, in the slow climb, at "
        f"{100 * s['target_fraction']:.0f} % of the budget; the budget runs on until vanilla's curve is flat. An oracle that preferred prompts with a pass rate near 0.5 (sampled) did not beat "
        "vanilla on greedy accuracy: those prompts are mostly already right under greedy decoding; the oracle "
        "here prefers informative prompts whose greedy answer is wrong. SGD instead of Adam, gradient clipping "
        "off, a settled (decayed-lr) warm start, group size 8 and a pool weighted to solved and unsolved levels "
        "were tried (single seeds) and did not make prompt choice matter more.",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], results: dict, regimes: tuple[str, ...], path: str) -> None:
    """One panel per regime, mean accuracy against rollouts: vanilla (with its min-max seed band), the oracle
    (dashed), the stacks and the configurations whose verdict is not a tie; the ties in light grey; dotted
    lines at the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    fig, axes = plt.subplots(1, len(regimes), figsize=(8 * len(regimes), 5.5), sharey=True, squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        records = report["regimes"][regime]["records"]
        colours = iter(plt.get_cmap("tab10").colors * 6)
        for name, record in records.items():
            if "skipped" in record:
                continue
            runs = [results[k] for k in sorted(results) if k[0] == name and k[1] == regime and "skipped" not in results[k]]
            curves = [stats.mean_curve(r) for r in runs]  # seeds that generate extra rollouts end at other steps
            length = min(len(c) for c in curves)
            x = torch.tensor([[p[0] for p in c[:length]] for c in curves]).mean(0)
            acc = torch.tensor([[p[1] for p in c[:length]] for c in curves])
            shown = name in (BASELINE, ORACLE) or record["kind"] == "stack" or record["verdict"] not in ("tie", "unknown")
            style = dict(color="black", linewidth=2.5) if name == BASELINE else (
                dict(color="grey", linestyle="--", linewidth=2) if name == ORACLE else
                dict(color=next(colours), linewidth=1.5) if shown else dict(color="lightgrey", linewidth=0.8))
            ax.plot(x, acc.mean(0), label=name if shown else None, **style)
            if name == BASELINE:
                ax.fill_between(x, acc.min(0).values, acc.max(0).values, color="black", alpha=0.12)
        noise = report["regimes"][regime]["noise"]
        ax.axhline(noise["target_accuracy"], color="black", linewidth=0.6, linestyle=":")
        ax.axvline(noise["target_rollouts"], color="black", linewidth=0.6, linestyle=":")
        ax.set(xlabel="rollouts (completions generated)", title=f"{regime} pool: mean over seeds (grey: ties with vanilla)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    axes[0][0].set_ylabel("greedy accuracy, mean over levels (held out)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- the command
def plan(configs: list[Configuration], regimes: tuple[str, ...], seeds_of) -> list[tuple[Configuration, str, int]]:
    return [(c, regime, seed) for c in configs if not c.skip for regime in regimes for seed in range(seeds_of(c))]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Learning efficiency of grpo-plugins methods on CPU (resumable).")
    parser.add_argument("--quick", action="store_true", help="vanilla, the oracle, knapsack_rl and ngrpo; 2 seeds, 24 steps")
    parser.add_argument("--only", nargs="+", metavar="METHOD",
                        help="only these methods' rows (defaults and paper settings; 'oracle' if named; a stack as "
                        "'a+b'); vanilla always runs, from the store when it is there")
    parser.add_argument("--configs", nargs="+", metavar="CONFIGURATION",
                        help="only these configurations, by exact name ('ngrpo', 'ngrpo[paper]', 'oracle', 'a+b')")
    parser.add_argument("--regimes", nargs="+", choices=REGIMES, default=list(REGIMES))
    parser.add_argument("--seeds", type=int, help="seeds per configuration (overrides the mode's numbers)")
    parser.add_argument("--steps", type=int, help="optimiser steps per run (overrides the mode's)")
    parser.add_argument("--eval-every", type=int, help="evaluation interval in steps (overrides the mode's)")
    parser.add_argument("--stacks", type=int, help="number of composed stacks to choose and run")
    parser.add_argument("--jobs", type=int, default=2, help="parallel processes (one thread each)")
    parser.add_argument("--rerun", nargs="*", default=[], metavar="NAME", help="ignore stored runs of these configurations")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: rebuild learning.{json,md,png} from the stored runs of this mode")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)

    partial = [f"--{name.replace('_', '-')}" for name in ("only", "configs", "seeds", "steps", "eval_every", "stacks")
               if getattr(args, name) is not None] + (["--regimes"] if tuple(args.regimes) != REGIMES else [])
    restricted = args.only is not None or args.configs is not None
    mode = QUICK if args.quick else FULL
    run = mode.run
    if args.steps:
        run = dataclasses.replace(run, steps=args.steps, eval_every=min(args.eval_every or run.eval_every, args.steps))
    elif args.eval_every:
        run = dataclasses.replace(run, eval_every=args.eval_every)
    mode = dataclasses.replace(mode, run=run)
    if args.seeds:
        mode = dataclasses.replace(mode, seeds=args.seeds, seeds_confirmed=max(args.seeds, min(mode.seeds_confirmed, args.seeds)))
    if args.stacks is not None:
        mode = dataclasses.replace(mode, stacks=args.stacks)
    exact = args.configs
    if exact is None and args.only is None and mode.configurations is not None:
        exact = list(mode.configurations)
    if exact is not None:
        args.only = sorted({name.split("[")[0] for name in exact})
    only = args.only if args.only is not None else mode.configurations
    if args.only is not None:
        mode = dataclasses.replace(mode, stacks=0 if args.stacks is None else args.stacks)
    task = task_settings(mode)
    regimes = tuple(args.regimes)
    started = time.perf_counter()
    TRAINED["runs"] = 0

    warm = warm_start_info(task)
    checkpoint = warm["checkpoint_sha256"]
    stack_names = [c for c in (only or []) if "+" in c]
    configs = discover_configurations(None if only is None else [n for n in only if "+" not in n])
    configs += [stack_configuration(name.split("+")) for name in stack_names]
    if exact is not None:
        configs = [c for c in configs if c.name in exact or c.name == BASELINE]
    confirmed = {BASELINE, ORACLE}

    def seeds_of(config: Configuration) -> int:
        return mode.seeds_confirmed if config.name in confirmed or config.kind == "stack" else mode.seeds

    train = not args.report_only
    results = execute(plan(configs, regimes, seeds_of), mode, task, checkpoint, args.out, args.jobs, set(args.rerun),
                      train)
    regimes_report = {regime: summarise_regime(configs, results, regime, mode) for regime in regimes}

    if mode.stacks and "revisited" in regimes_report:  # stacks chosen from the single-method results
        chosen = choose_stacks(regimes_report["revisited"]["records"], configs, mode.stacks)
        stacks = [stack_configuration(names) for names in chosen if "+".join(names) not in {c.name for c in configs}]
        configs += stacks
        results.update(execute(plan(stacks, regimes, seeds_of), mode, task, checkpoint, args.out, args.jobs,
                               set(args.rerun), train))
        regimes_report = {regime: summarise_regime(configs, results, regime, mode) for regime in regimes}
    if mode.seeds_confirmed > mode.seeds:  # more seeds for every configuration called better than vanilla
        confirmed |= {name for part in regimes_report.values() for name, r in part["records"].items()
                      if r.get("verdict") == "better"}
        results.update(execute(plan(configs, regimes, seeds_of), mode, task, checkpoint, args.out, args.jobs,
                               set(), train))
        regimes_report = {regime: summarise_regime(configs, results, regime, mode) for regime in regimes}
    if restricted or args.report_only:  # the table keeps every configuration with stored runs
        known = {c.name for c in configs}
        candidates = discover_configurations() + [stack_configuration(n.split("+")) for n in stored_stacks(args.out, mode.name)]
        candidates = [c for c in candidates if c.name not in known]
        loaded = execute(plan(candidates, regimes, lambda c: max(mode.seeds_confirmed, 5)), mode, task, checkpoint,
                         args.out, args.jobs, set(), train=False)
        results.update(loaded)
        configs += [c for c in candidates if any(key[0] == c.name for key in loaded)]
        regimes_report = {regime: summarise_regime(configs, results, regime, mode) for regime in regimes}

    report = {
        "benchmark": "learning",
        "settings": {"mode": mode.name, "partial": partial, "run": asdict(mode.run), "task": asdict(task), "seeds": mode.seeds,
                     "seeds_confirmed": mode.seeds_confirmed, "window": mode.window, "target_fraction": mode.target_fraction,
                     "pools": {"revisited": task.revisited_pool, "fresh": task.fresh_pool}},
        "warm_start": warm,
        "regimes": regimes_report,
        "records": [r for part in regimes_report.values() for r in part["records"].values()],
        "seconds_wall": time.perf_counter() - started,
    }
    if TRAINED["runs"]:
        record_invocation(args.out, mode.name, {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - (time.perf_counter() - started))),
            "seconds_wall": time.perf_counter() - started, "runs_trained": TRAINED["runs"], "jobs": args.jobs,
            "arguments": sys.argv[1:] if argv is None else list(argv), "run": asdict(mode.run)})
    report["cost"] = cost_of(args.out, mode.name, results, asdict(mode.run))
    report["goals"] = goals(regimes_report)
    headline_regime = regimes[0]
    report["noise"] = regimes_report[headline_regime]["noise"]
    report["sensitivity"] = regimes_report[headline_regime].get("sensitivity", {})
    report["summary"] = {  # the headline regime's records by configuration
        name: r for name, r in regimes_report[headline_regime]["records"].items() if "skipped" not in r
    }
    os.makedirs(args.out, exist_ok=True)
    stem = result_stem(mode.name)
    with open(os.path.join(args.out, f"{stem}.json"), "w") as handle:
        json.dump(stats.json_safe(report), handle, indent=1)
    with open(os.path.join(args.out, f"{stem}.md"), "w") as handle:
        handle.write(markdown(report))
    plot(report, results, regimes, os.path.join(args.out, f"{stem}.png"))
    if mode.name == FULL.name and not partial and os.path.abspath(args.out) == os.path.abspath(RESULTS):
        write_docs(report)
    print(markdown(report))
    headline = {
        name: {"rollouts_to_target_median": r["rollouts_to_target"]["median"], "final_accuracy": r["final_accuracy"]["mean"],
               "zero_signal_group_fraction": r["zero_signal_group_fraction"], "verdict": r["verdict"]}
        for name, r in report["summary"].items()
    }
    print(json.dumps(stats.json_safe({
        "benchmark": "learning", "mode": mode.name, "regime": headline_regime, "headline": headline,
        "noise": {"sd_at_target": report["noise"]["sd_at_target"]},
        "sensitivity": {"oracle_rollouts_ratio": report["sensitivity"].get("oracle_rollouts_ratio")},
    })))
    return report


if __name__ == "__main__":
    main()
