"""``grpo-plugins new``: the template cannot drift from the command, and the command's output installs,
is discovered, and passes the conformance suite out of the box."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from grpo_plugins import scaffold
from grpo_plugins.api import PLUGIN_API
from grpo_plugins.cli import main

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EVERY_HOOK = ("sample_prompts", "allocate_rollouts", "augment_prompts", "shape_rewards", "compute_advantages",
              "adjust_advantages", "mask_tokens", "policy_surrogate", "gate_loss", "loss_terms", "observe")


def test_the_template_is_what_the_command_writes(tmp_path):
    assert main(["new", scaffold.TEMPLATE_NAME, "--directory", str(tmp_path)]) == 0
    written = tmp_path / "grpo-plugin-my-method"
    template = ROOT / "examples" / "plugin-template"
    files = sorted(p.relative_to(written) for p in written.rglob("*") if p.is_file())
    shipped = sorted(p.relative_to(template) for p in template.rglob("*")
                     if p.is_file() and "__pycache__" not in p.parts and ".egg-info" not in str(p))
    assert files == shipped
    for relative in files:
        assert (written / relative).read_text() == (template / relative).read_text(), (
            f"examples/plugin-template/{relative} differs from `grpo-plugins new my_method`: regenerate it"
        )


def test_new_refuses_bad_input(tmp_path, capsys):
    with pytest.raises(ValueError, match="lower-case Python identifier"):
        scaffold.write_distribution("My-Method", tmp_path)
    with pytest.raises(ValueError, match=r"unknown hook\(s\) \['shape_reward'\]"):
        scaffold.write_distribution("ok", tmp_path, ["shape_reward"])
    with pytest.raises(ValueError, match="designed but not yet run"):
        scaffold.write_distribution("ok", tmp_path, ["keep_rows"])
    scaffold.write_distribution("ok", tmp_path)
    with pytest.raises(FileExistsError):
        scaffold.write_distribution("ok", tmp_path)


def test_scaffold_installs_is_listed_and_passes_conformance(tmp_path):
    """Every hook the adapters run, written by the command, installed (editable) into this environment."""
    name = "scaffold_probe"
    subprocess.run([str(BIN / "grpo-plugins"), "new", name, "--directory", str(tmp_path), "--hooks", ",".join(EVERY_HOOK)],
                   check=True, capture_output=True, text=True)
    folder = tmp_path / "grpo-plugin-scaffold-probe"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    installed = subprocess.run([*pip, "install", "-q", "--no-deps", "--no-index", "--no-build-isolation", "-e", str(folder)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    try:
        listing = subprocess.run([str(BIN / "grpo-plugins"), "list"], capture_output=True, text=True, check=True).stdout
        line = next(line for line in listing.splitlines() if line.startswith(name))
        assert "grpo-plugin-scaffold-probe" in line and f"API >={PLUGIN_API},<2" in line and "compute_advantages" in line
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder / "tests")],
                               cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert tests.returncode == 0, tests.stdout + tests.stderr
        assert "11 passed" in tests.stdout  # ten conformance checks and the worked example
    finally:
        subprocess.run([*pip, "uninstall", "-y", "-q", "grpo-plugin-scaffold-probe"], capture_output=True, text=True)
    listing = subprocess.run([str(BIN / "grpo-plugins"), "list"], capture_output=True, text=True, check=True).stdout
    assert name not in listing
