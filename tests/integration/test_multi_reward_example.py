"""The multi-reward example runs for 2 steps and reports what its rewards and its shaping method did."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "multi_reward" / "train.py"


def run(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_example_trains_two_steps_with_ton_next_to_trls_rewards(tmp_path):
    out = run("--steps", "2", "--output-dir", str(tmp_path))
    lines = out.strip().splitlines()
    assert "reward functions: ['format_reward', 'accuracy_reward'] weights: [0.5, 1.0]" in lines
    assert any(line.startswith("ton (grpo-plugin-ton") and "shape_rewards" in line for line in lines)
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 2 and all("plugins/ton/skip_rate=" in s and "rewards/accuracy_reward/mean=" in s for s in steps)
    summary = json.loads(lines[-1])
    assert summary["steps"] == 2 and summary["methods"] == ["ton"] and summary["reward_weights"] == [0.5, 1.0]
    last = summary["last"]
    for key in ("plugins/ton/skip_rate", "plugins/ton/format_rate", "rewards/format_reward/mean"):
        assert 0.0 <= last[key] <= 1.0
    # The strict format pays only for a thought; TON's format pays for a thought or a skip, never less often.
    assert last["plugins/ton/format_rate"] >= last["rewards/format_reward/mean"]
    # The shaped reward: 0.5 x think-or-not format + accuracy.
    expected = 0.5 * last["plugins/ton/format_rate"] + last["rewards/accuracy_reward/mean"]
    assert last["plugins/ton/mean_reward"] == pytest.approx(expected, abs=1e-6)


def test_example_without_plugins_is_plain_trl():
    summary = json.loads(run("--steps", "2", "--no-plugins").strip().splitlines()[-1])
    assert summary["methods"] == [] and summary["steps"] == 2
    assert not any(key.startswith("plugins/ton/") for key in summary["last"])
