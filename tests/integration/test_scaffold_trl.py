"""A method written by `grpo-plugins new` composes with a built-in method in a tiny real TRL run."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

BIN = Path(sys.executable).parent
SCRIPT = """
from grpo_plugins_trl.testing import tiny_grpo_run
trainer = tiny_grpo_run(["scaffold_shaper", "knapsack_rl"], max_steps=2, output_dir={out!r})
batch = trainer.last_plugin_batch
print("METHODS", trainer.composition.names)
print("ROWS", batch.num_completions)
"""


def test_a_scaffolded_method_trains_composed_with_a_builtin_one(tmp_path):
    subprocess.run([str(BIN / "grpo-plugins"), "new", "scaffold_shaper", "--directory", str(tmp_path), "--hooks",
                    "shape_rewards"], check=True, capture_output=True, text=True)
    folder = tmp_path / "grpo-plugin-scaffold-shaper"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    installed = subprocess.run([*pip, "install", "-q", "--no-deps", "--no-index", "--no-build-isolation", "-e", str(folder)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    try:
        run = subprocess.run([sys.executable, "-c", SCRIPT.format(out=str(tmp_path / "run"))], capture_output=True,
                             text=True, timeout=900, env={"OMP_NUM_THREADS": "1", **_env()})
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "METHODS ['scaffold_shaper', 'knapsack_rl', 'grpo']" in run.stdout
        assert "ROWS" in run.stdout
    finally:
        subprocess.run([*pip, "uninstall", "-y", "-q", "grpo-plugin-scaffold-shaper"], capture_output=True, text=True)


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
