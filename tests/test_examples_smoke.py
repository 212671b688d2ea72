"""The README's demo and the learning benchmark keep running (tiny sizes; results are not judged)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, with_stderr: bool = False):
    done = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return (done.stdout, done.stderr) if with_stderr else done.stdout


def test_demo_trains_both_runs_and_writes_the_plot(tmp_path):
    out, err = run("examples/trl_demo.py", "--steps", "3", "--warm-start-steps", "5", "--eval-every", "3",
                   "--out", str(tmp_path), with_stderr=True)
    assert "knapsack_rl (grpo-plugin-knapsack-rl" in out and "unlikeliness (grpo-plugin-unlikeliness" in out
    assert "plugins/knapsack_rl/" in out  # what each method did
    # one progress bar per run with the reward, the accuracy and the methods' numbers; no raw metric dicts
    assert "{'loss'" not in out + err and "'reward':" not in out + err
    bars = [line for line in err.replace("\r", "\n").splitlines() if "3/3" in line]
    assert any(line.startswith("vanilla GRPO") and "reward" in line and "acc" in line for line in bars)
    assert any(line.startswith("knapsack_rl+ngrpo+unlikeliness") and "knapsack_rl " in line for line in bars)
    assert "| run | reward (last 10 steps) | accuracy start -> end |" in out  # the comparison table
    assert f"Plot: {tmp_path / 'demo.png'}" in out
    assert (tmp_path / "demo.png").stat().st_size > 0
    results = json.loads((tmp_path / "demo.json").read_text())
    assert [r["label"] for r in results] == ["vanilla GRPO (trl.GRPOTrainer)", "knapsack_rl+ngrpo+unlikeliness"]
    assert all(len(r["reward"]) == 3 for r in results)


def test_learning_benchmark_writes_results(tmp_path):
    out = run("benchmarks/learning.py", "--seeds", "1", "--steps", "2", "--configs", "ngrpo", "--regimes", "revisited", "--out", str(tmp_path))
    headline = json.loads(out.strip().splitlines()[-1])
    assert set(headline["headline"]) == {"vanilla", "ngrpo"}
    summary = json.loads((tmp_path / "learning.json").read_text())["summary"]
    assert 0.0 <= summary["ngrpo"]["zero_signal_group_fraction"] <= 1.0
    assert (tmp_path / "learning.md").read_text().count("| ngrpo |") == 1


def test_multi_turn_example_trains_grpo_and_gigpo():
    out = run("examples/multi_turn/train_trl.py", "--steps", "2")
    lines = [line for line in out.splitlines() if "success rate" in line]
    assert [line.split()[0] for line in lines] == ["GRPO", "GiGPO"]
