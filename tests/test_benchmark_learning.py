"""The learning benchmark: its statistics on hand-built curves, its discovery of every installed method, and
its quick mode end to end at a reduced length (real warm start, real trainer, real oracle)."""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import learning_stats as stats  # noqa: E402


def make_run(points, seed=0, seconds=1.0, steps_per_point=10, per_step=64):
    """A run whose mean accuracy over the two levels is ``points[i]`` at step ``i * steps_per_point``."""
    curve = [[i * steps_per_point, {"a": p - 0.1, "b": p + 0.1}] for i, p in enumerate(points)]
    return {
        "curve": curve,
        "rollouts_at": {str(step): step * per_step for step, _ in curve},
        "seed": seed,
        "seconds_train_cpu": seconds,
        "steps": (len(points) - 1) * steps_per_point,
        "zero_signal": 0.5,
    }


def test_rollouts_to_reach_auc_and_median():
    run = make_run([0.5, 0.6, 0.7, 0.7])
    assert stats.mean_curve(run)[2] == (1280.0, pytest.approx(0.7))
    assert stats.rollouts_to_reach(run, 0.6) == 640  # the first grid point after step 0 at or above the target
    assert stats.rollouts_to_reach(run, 0.65) == 1280
    assert stats.rollouts_to_reach(run, 0.8) == math.inf
    assert stats.rollouts_to_reach(make_run([0.9, 0.1]), 0.5) == math.inf  # step 0 never counts
    # trapezoids: (0.55 + 0.65 + 0.7) / 3
    assert stats.area_under_curve(run) == pytest.approx((0.55 + 0.65 + 0.7) / 3)
    assert stats.median([3.0, 1.0, math.inf]) == 3.0
    assert stats.median([1.0, math.inf]) == math.inf
    assert stats.median([1.0, 3.0]) == 2.0


def test_noise_target_and_paired_ratios():
    vanilla = [make_run([0.5, 0.60, 0.70], seed=0), make_run([0.5, 0.62, 0.70], seed=1), make_run([0.5, 0.64, 0.72], seed=2)]
    noise = stats.noise(vanilla, 640)
    assert noise["target_accuracy"] == pytest.approx(0.62)
    assert noise["sd_at_target"] == pytest.approx(0.02)  # sample sd of 0.60, 0.62, 0.64
    assert noise["sd_final"] == pytest.approx(math.sqrt(((0.72 - 0.70666667) ** 2 + 2 * 0.00666667**2) / 2), abs=1e-6)
    faster = [make_run([0.5, 0.70, 0.75], seed=s) for s in range(3)]
    # vanilla reaches 0.62 at 1280, 640, 640 rollouts; the faster runs at 640 each
    assert stats.paired_ratios(faster, vanilla, 0.62) == [0.5, 1.0, 1.0]
    with pytest.raises(ValueError):
        stats.accuracy_at(vanilla[0], 100)


def test_summarise_and_ties_within_the_noise():
    vanilla = [make_run([0.5, 0.60 + 0.01 * s, 0.70], seed=s, seconds=2.0) for s in range(3)]
    target = stats.noise(vanilla, 640)
    same = [make_run([0.5, 0.605 + 0.01 * s, 0.70], seed=s, seconds=3.0) for s in range(3)]
    record = stats.summarise(same, vanilla, target)
    assert record["verdict"] == "tie"  # 0.0017 AUC apart with a seed sd of 0.0033
    assert record["relative_step_time"] == pytest.approx(1.5)
    assert record["final_accuracy"]["by_level"] == {"a": pytest.approx(0.6), "b": pytest.approx(0.8)}
    assert record["rollouts_to_target"]["per_seed"] == [1280, 640, 640]
    better = stats.summarise([make_run([0.5, 0.75 + 0.01 * s, 0.8], seed=s) for s in range(3)], vanilla, target)
    assert better["verdict"] == "better" and better["rollouts_ratio"]["median"] == 1.0
    worse = stats.summarise([make_run([0.5, 0.4 + 0.01 * s, 0.5], seed=s) for s in range(3)], vanilla, target)
    assert worse["verdict"] == "worse" and worse["rollouts_to_target"]["median"] == math.inf
    assert stats.verdict([0.9], [0.1, 0.2], 0.0) == "unknown"  # one seed: the noise is unknown
    assert stats.json_safe({"x": [math.inf, math.nan, 1.0]}) == {"x": ["inf", "nan", 1.0]}


def test_every_installed_method_gets_a_row():
    from grpo_plugins.registry import discover
    from learning_configs import ORACLE, choose_stacks, discover_configurations, paper_overrides

    methods, _ = discover()
    configs = discover_configurations()
    names = [c.name for c in configs]
    assert names[:2] == ["vanilla", ORACLE]
    assert set(methods) - {"grpo"} <= set(names)
    for name, info in methods.items():
        if name != "grpo" and paper_overrides(info.load()):
            assert f"{name}[paper]" in names
    assert all(c.category for c in configs if c.kind == "single")
    records = {c.name: {"rollouts_ratio": {"median": 0.5 if c.name == "knapsack_rl" else 1.0}, "auc": {"mean": 0.5},
                        "verdict": "tie"} for c in configs if c.kind == "single"}
    stacks = choose_stacks(records, configs, 4)
    assert len(stacks) == 4 and all(len(s) >= 2 for s in stacks)
    assert all("knapsack_rl" in s for s in stacks if any(c.category == "sampler" and c.name in s for c in configs))


def test_quick_mode_end_to_end_and_resumes(tmp_path, capsys):
    pytest.importorskip("trl")
    import learning

    args = ["--quick", "--steps", "6", "--eval-every", "3", "--out", str(tmp_path)]
    report = learning.main(args)
    warm = report["warm_start"]
    assert len(warm["checkpoint_sha256"]) == 64
    assert 0.4 <= warm["accuracy"] <= 0.6  # a mid-range start, no level solved or hopeless
    assert all(0.0 < acc < 1.0 for acc in warm["accuracy_by_level"].values())
    saved = json.loads((tmp_path / "learning.quick.json").read_text())
    assert saved["noise"]["sd_at_target"] >= 0.0 and saved["noise"]["seeds"] == 2
    assert "oracle_rollouts_ratio" in saved["sensitivity"]
    pairs = {(r["configuration"], r["regime"]) for r in saved["records"]}
    assert pairs == {(c, g) for c in ("vanilla", "oracle", "knapsack_rl", "ngrpo") for g in ("revisited", "fresh")}
    for record in saved["records"]:
        assert record["seeds"] == 2 and 0.0 <= record["zero_signal_group_fraction"] <= 1.0
    runs = sorted((tmp_path / "learning.runs").rglob("seed*.json"))
    assert len(runs) == 16
    one = json.loads(runs[0].read_text())
    assert one["rollouts"] == 6 * 128 and one["rollouts_at"]["6"] == 6 * 128  # completions counted by the probe
    assert one["checkpoint_sha256"] == warm["checkpoint_sha256"]
    # on the fresh pool no prompt is seen twice, so knapsack_rl has no history and trains like vanilla
    fresh = {r["configuration"]: r for r in saved["records"] if r["regime"] == "fresh"}
    assert fresh["knapsack_rl"]["identical_to_vanilla_seeds"] == 2
    md = (tmp_path / "learning.quick.md").read_text()
    assert md.count("| ngrpo |") == 2 and "noise.sd_at_target" in md
    assert (tmp_path / "learning.quick.png").stat().st_size > 0
    capsys.readouterr()
    again = learning.main(args)  # every run is stored: nothing trains again
    assert "runs to do" not in capsys.readouterr().out
    assert again["noise"] == report["noise"]
    rebuilt = learning.main(args + ["--report-only", "--configs", "ngrpo"])  # the table keeps the stored rows
    assert {r["configuration"] for r in rebuilt["records"] if "skipped" not in r} == {
        "vanilla", "oracle", "knapsack_rl", "ngrpo"}


def test_trailing_window_smooths_the_curve():
    run = make_run([0.5, 0.7, 0.6, 0.8])
    run["window"] = 2
    assert [round(a, 6) for _, a in stats.mean_curve(run)] == [0.5, 0.6, 0.65, 0.7]
    assert stats.rollouts_to_reach(run, 0.65) == 1280


def test_oracle_prefers_informative_prompts_the_greedy_answer_gets_wrong():
    import torch
    from learning_configs import oracle_order

    rate = torch.tensor([1.0, 0.5, 0.0, 0.25, 0.75, 1.0])
    greedy_wrong = torch.tensor([False, False, True, True, False, False])
    # 3: informative and greedy-wrong; 1, 4: informative; 2: unsolved; 0, 5: solved (drawn order kept)
    assert oracle_order(rate, greedy_wrong).tolist() == [3, 1, 4, 2, 0, 5]


def test_full_mode_target_lies_before_the_end_of_the_budget():
    import learning

    mode = learning.FULL
    draws = mode.run.steps * mode.run.prompts_per_step
    assert 0 < mode.target_fraction < 1 and mode.run.steps % mode.run.eval_every == 0
    task = learning.task_settings(mode)
    assert task.revisited_pool * mode.revisits == draws and task.fresh_pool >= draws  # seen ~revisits times / at most once
    assert len(learning.QUICK.configurations) == 3 and learning.QUICK.run.steps < mode.run.steps


def test_paper_settings_leave_out_notes_that_are_not_values():
    from dataclasses import dataclass

    from grpo_plugins import POSITIVE, Method, option
    from learning_configs import paper_overrides

    class Demo(Method):
        name = "demo"

        @dataclass(frozen=True)
        class Config:
            rate: float = option(0.1, "a rate", paper=0.2, domain=POSITIVE)
            width: float = option(0.5, "a width", paper="not given (inferred 0.5)", domain=POSITIVE)
            same: float = option(1.0, "as in the paper", paper=1.0, domain=POSITIVE)

    assert paper_overrides(Demo) == {"rate": 0.2}


def test_probe_counts_zero_signal_groups_for_sequence_and_token_advantages():
    import torch
    from grpo_plugins.testing import make_batch
    from learning_configs import SignalProbe

    batch = make_batch(group_sizes=(2, 3), shuffle=False, num_tokens=4)
    probe = SignalProbe()
    sequence = torch.tensor([0.0, 0.0, 1.0, -0.5, -0.5])  # the first group carries no signal
    assert torch.equal(probe.adjust_advantages(batch, sequence), sequence)  # passed through unchanged
    tokens = torch.zeros(5, 4)
    tokens[0, 0] = 0.3  # signal on a real token of the first group; padding values are ignored
    tokens[2:, 3] = torch.where(batch.completion_mask[2:, 3] > 0, 0.0, 9.0)
    probe.adjust_advantages(batch, tokens)
    assert probe.zero_signal == [0.5, 0.5] and probe.completions == [5, 5]


def test_flatness_of_vanilla_over_the_last_part_of_the_budget():
    rising = [make_run([0.5, 0.6, 0.65, 0.70] + [0.70 + 0.01 * i for i in range(7)], seed=s) for s in range(3)]
    noise = stats.noise(rising, 640)
    # 11 points up to 6,400 rollouts: the tail starts at the first grid point at or past 4,480 (0.73); the end is 0.76
    assert noise["tail_rollouts"] == 7 * 640 and noise["tail_gain"] == pytest.approx(0.03)
    assert noise["sd_final"] == 0.0 and noise["flat"] is False
    flat = [make_run([0.5, 0.6, 0.7] + [0.7 + 0.002 * ((i + s) % 2) for i in range(8)], seed=s) for s in range(3)]
    assert stats.noise(flat, 640)["flat"] is True  # the tail's gain is within the seeds' spread


def test_every_statistic_stops_at_the_rollout_budget():
    run = make_run([0.5, 0.6, 0.7, 0.8, 0.9])  # 640 rollouts a grid step: 2,560 in all
    cut = stats.within_budget(run, 1920)  # a configuration that spent the budget by the third grid point
    assert [step for step, _ in cut["curve"]] == [0, 10, 20, 30] and len(run["curve"]) == 5
    assert stats.mean_curve(cut)[-1] == (1920.0, pytest.approx(0.8))
    assert stats.area_under_curve(cut) == pytest.approx((0.55 + 0.65 + 0.75) / 3)
    assert stats.rollouts_to_reach(cut, 0.85) == math.inf
    assert stats.within_budget(run, 2560) is run  # within the budget: unchanged


def test_noise_also_over_the_first_three_seeds():
    vanilla = [make_run([0.5, p, 0.7], seed=s) for s, p in enumerate([0.60, 0.62, 0.64, 0.70, 0.70])]
    noise = stats.noise(vanilla, 640)
    assert noise["sd_at_target_3_seeds"] == pytest.approx(0.02) and noise["sd_at_target"] > 0.04
    assert "sd_at_target_3_seeds" not in stats.noise(vanilla[:3], 640)


def test_goals_name_the_best_stack_and_the_lowest_zero_signal():
    import learning

    def record(name, kind, ratio, zero, verdict="tie"):
        return {"configuration": name, "kind": kind, "rollouts_ratio": {"median": ratio, "min": ratio, "max": ratio},
                "auc": {"mean": 0.6}, "verdict": verdict, "seeds": 5, "zero_signal_group_fraction": zero}

    records = {"vanilla": record("vanilla", "baseline", 1.0, 0.5, "reference"),
               "a": record("a", "single", 0.9, 0.0, "worse"), "b": record("b", "single", 0.8, 0.08),
               "a+b": record("a+b", "stack", 0.45, 0.3), "b+c": record("b+c", "stack", math.nan, 0.2)}
    goals = learning.goals({"revisited": {"records": records}, "fresh": {"records": {}}})
    assert goals["best_stack"]["configuration"] == "a+b" and goals["best_stack"]["holds"]
    assert goals["zero_signal"] == {"vanilla": 0.5, "lowest": 0.08, "configuration": "b", "goal": 0.1, "holds": True}
    assert goals["worse_than_vanilla"] == {"revisited": ["a"], "fresh": []}
