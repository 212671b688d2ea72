"""Statistics of the learning benchmark (pure Python, no torch): targets, rollouts to reach them, areas under
the curve, the seed noise and the verdict that turns differences smaller than the noise into ties.

A run is a dict with ``curve`` (``[[step, {level: accuracy}], ...]``, step 0 first, on the evaluation grid),
``rollouts_at`` (``{step: completions generated up to that step}`` for every grid step) and optionally
``window``: the curve's value at a grid point is the mean of the last ``window`` evaluations (a trailing
average that takes out the point-to-point wiggle of greedy accuracy; 1: the raw evaluation).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Iterable, Sequence

INF = float("inf")
TAIL = 0.7
"""The last 30 % of the budget: vanilla's curve has flattened when it gains no more than its seed sd there."""


def within_budget(run: dict[str, Any], budget: float) -> dict[str, Any]:
    """``run`` with its curve cut at ``budget`` rollouts: the evaluations after more completions than every
    configuration is given (a method that generates extra rollouts, e.g. refills, reaches the budget
    before the last step) are left out of every statistic."""
    curve = [point for point in run["curve"] if run["rollouts_at"][str(point[0])] <= budget]
    return run if len(curve) == len(run["curve"]) else dict(run, curve=curve)


def mean_curve(run: dict[str, Any]) -> list[tuple[float, float]]:
    """``[(rollouts, mean accuracy over levels)]`` of one run on its evaluation grid, each value the mean of
    the last ``run["window"]`` evaluations (fewer at the start)."""
    window = int(run.get("window", 1))
    raw = [sum(acc.values()) / len(acc) for _, acc in run["curve"]]
    smooth = [sum(raw[max(0, i - window + 1) : i + 1]) / len(raw[max(0, i - window + 1) : i + 1]) for i in range(len(raw))]
    return [(float(run["rollouts_at"][str(step)]), value) for (step, _), value in zip(run["curve"], smooth)]


def accuracy_at(run: dict[str, Any], rollouts: float) -> float:
    """Mean accuracy over levels at the grid point with ``rollouts`` completions (which must be on the grid)."""
    for x, acc in mean_curve(run):
        if x == rollouts:
            return acc
    raise ValueError(f"{rollouts} rollouts is not on the run's evaluation grid")


def rollouts_to_reach(run: dict[str, Any], target: float) -> float:
    """Completions generated at the first grid point (after step 0) whose mean accuracy is ``>= target``;
    ``inf`` if the run never reaches it."""
    for x, acc in mean_curve(run)[1:]:
        if acc >= target - 1e-12:
            return x
    return INF


def area_under_curve(run: dict[str, Any]) -> float:
    """Trapezoidal mean accuracy over the rollout budget (the area divided by the budget)."""
    points = mean_curve(run)
    area = sum((x1 - x0) * (a0 + a1) / 2 for (x0, a0), (x1, a1) in zip(points, points[1:]))
    return area / (points[-1][0] - points[0][0])


def sd(values: Sequence[float]) -> float:
    """Sample standard deviation (0 for fewer than two values)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def median(values: Iterable[float]) -> float:
    """Median that handles ``inf`` (more than half infinite: ``inf``)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    n = len(ordered)
    mid = n // 2
    if n % 2:
        return ordered[mid]
    low, high = ordered[mid - 1], ordered[mid]
    return INF if high == INF else (low + high) / 2


def noise(vanilla: list[dict[str, Any]], target_rollouts: float) -> dict[str, Any]:
    """The target and the seed noise: vanilla's mean (over seeds) accuracy at ``target_rollouts`` is the
    target every configuration is asked to reach; ``sd_at_target`` is the seed standard deviation of
    vanilla's accuracy there (``sd_at_target_3_seeds``: over the first three runs, when there are more);
    ``sd_final`` the same at the end of the budget. Whether vanilla's curve has flattened:
    ``tail_gain`` is its mean accuracy (over seeds) at the end minus at the first grid point past
    ``TAIL`` of the budget, ``flat`` whether that gain is within ``sd_final``."""
    at_target = [accuracy_at(run, target_rollouts) for run in vanilla]
    final = [mean_curve(run)[-1][1] for run in vanilla]
    grid = [x for x, _ in mean_curve(vanilla[0])]
    tail_start = next(x for x in grid if x >= TAIL * grid[-1])
    tail_gain = statistics.mean(final) - statistics.mean(accuracy_at(run, tail_start) for run in vanilla)
    out = {
        "target_rollouts": target_rollouts,
        "target_accuracy": statistics.mean(at_target),
        "vanilla_at_target_per_seed": at_target,
        "sd_at_target": sd(at_target),
        "sd_final": sd(final),
        "sd_auc": sd([area_under_curve(run) for run in vanilla]),
        "seeds": len(vanilla),
        "tail_rollouts": tail_start,
        "tail_gain": tail_gain,
        "flat": tail_gain <= sd(final),
    }
    if len(at_target) > 3:  # the noise with the seed count of a single-method row
        out["sd_at_target_3_seeds"] = sd(at_target[:3])
    return out


def paired_ratios(runs: list[dict[str, Any]], vanilla: list[dict[str, Any]], target: float) -> list[float]:
    """Per seed: rollouts this configuration needs to reach ``target`` / rollouts vanilla of the same seed
    needs (seeds paired by position; a seed vanilla misses is left out)."""
    out = []
    for run, base in zip(runs, vanilla):
        mine, theirs = rollouts_to_reach(run, target), rollouts_to_reach(base, target)
        if theirs != INF:
            out.append(mine / theirs)
    return out


def summarise(runs: list[dict[str, Any]], vanilla: list[dict[str, Any]], target: dict[str, Any]) -> dict[str, Any]:
    """One configuration's record in one regime against vanilla's runs in that regime.

    Keys: ``rollouts_to_target`` (per seed, median, min, max), ``rollouts_ratio`` (median of the per-seed
    ratios to vanilla, with min and max), ``auc`` (mean and sd), ``final_accuracy`` (mean, sd, by level),
    ``zero_signal_group_fraction``, ``seconds_per_step`` (CPU seconds of training, evaluation excluded) and
    ``relative_step_time`` (to vanilla's), ``seeds``, and the ``verdict`` (:func:`verdict`).
    """
    needed = [rollouts_to_reach(run, target["target_accuracy"]) for run in runs]
    ratios = paired_ratios(runs, vanilla, target["target_accuracy"])
    aucs = [area_under_curve(run) for run in runs]
    finals = [mean_curve(run)[-1][1] for run in runs]
    levels = list(runs[0]["curve"][-1][1])
    step_time = statistics.mean(run["seconds_train_cpu"] / run["steps"] for run in runs)
    vanilla_step_time = statistics.mean(run["seconds_train_cpu"] / run["steps"] for run in vanilla)
    vanilla_aucs = [area_under_curve(run) for run in vanilla]
    return {
        "seeds": len(runs),
        "rollouts_to_target": {"per_seed": needed, "median": median(needed), "min": min(needed), "max": max(needed)},
        "rollouts_ratio": {
            "median": median(ratios) if ratios else math.nan,
            "min": min(ratios) if ratios else math.nan,
            "max": max(ratios) if ratios else math.nan,
            "per_seed": ratios,
        },
        "auc": {"mean": statistics.mean(aucs), "sd": sd(aucs)},
        "final_accuracy": {
            "mean": statistics.mean(finals),
            "sd": sd(finals),
            "by_level": {level: statistics.mean(run["curve"][-1][1][level] for run in runs) for level in levels},
        },
        "zero_signal_group_fraction": statistics.mean(run["zero_signal"] for run in runs),
        "seconds_per_step": step_time,
        "relative_step_time": step_time / vanilla_step_time,
        "verdict": verdict(aucs, vanilla_aucs, target["sd_auc"]),
    }


def verdict(aucs: Sequence[float], vanilla_aucs: Sequence[float], noise_sd: float) -> str:
    """``"better"``, ``"worse"`` or ``"tie"``: the difference of mean AUCs against twice its standard error
    (each side's seed sd, floored at vanilla's measured seed sd ``noise_sd``). Differences within it are ties.
    With fewer than two seeds on either side the noise is unknown: ``"unknown"``."""
    if len(aucs) < 2 or len(vanilla_aucs) < 2:
        return "unknown"
    if list(aucs) == list(vanilla_aucs):
        return "tie"
    diff = statistics.mean(aucs) - statistics.mean(vanilla_aucs)
    sd_mine = max(sd(aucs), noise_sd)
    sd_theirs = max(sd(vanilla_aucs), noise_sd)
    threshold = 2 * math.sqrt(sd_mine**2 / len(aucs) + sd_theirs**2 / len(vanilla_aucs))
    if abs(diff) <= threshold:
        return "tie"
    return "better" if diff > 0 else "worse"


def json_safe(value: Any) -> Any:
    """``value`` with infinite and NaN floats written as strings (JSON has neither)."""
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
