"""The docs cannot drift from the code, and the plugin template works as copied."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_plugins import docs
from grpo_plugins.cli import main
from grpo_plugins.hookspecs import COMBINE, HOOK_NAMES

ROOT = Path(__file__).resolve().parents[1]


def test_hooks_md_is_generated_from_the_hookspecs():
    committed = (ROOT / "docs" / "hooks.md").read_text()
    assert committed == docs.render(), "docs/hooks.md is stale: run python -m grpo_plugins.docs --output docs/hooks.md"


def test_hooks_md_states_signature_and_combine_mode_of_every_hook():
    page = docs.render()
    for hook in HOOK_NAMES:
        section = page.split(f"## `{hook}`", 1)[1].split("\n## ", 1)[0]
        assert f"def {hook}(" in section and f"Combine mode: `{COMBINE[hook]}`" in section
        assert "**Returns**" in section or hook == "observe"
    assert docs.signature("shape_rewards") == "def shape_rewards(batch: GRPOBatch, rewards: torch.Tensor) -> torch.Tensor"


def test_cli_output_in_the_tutorial_is_the_real_output(capsys):
    page = (ROOT / "docs" / "writing-a-plugin.md").read_text()
    shown = page.split("$ grpo-plugins show length_penalty\n", 1)[1].split("```", 1)[0]
    assert main(["show", "length_penalty"]) == 0
    assert capsys.readouterr().out == shown


def test_lifecycle_places_every_hook_in_both_trainers():
    page = (ROOT / "docs" / "lifecycle.md").read_text()
    trl, verl = page.split("## In TRL", 1)[1].split("## In verl", 1)
    for hook in HOOK_NAMES:
        assert f"`{hook}`" in trl and f"`{hook}`" in verl, hook


def test_docs_check_command(tmp_path):
    stale = tmp_path / "hooks.md"
    stale.write_text("old\n")
    assert docs.main(["--check", str(stale)]) == 1
    assert docs.main(["--output", str(stale)]) == 0
    assert docs.main(["--check", str(stale)]) == 0


def test_plugin_template_builds_is_discovered_and_passes_its_tests(tmp_path):
    """Build the template as a wheel into a private site directory, then run its own tests there."""
    if importlib.util.find_spec("setuptools") is None:  # the template's build backend, used offline
        pytest.skip("setuptools is not installed in this environment; the template cannot be built offline")
    template = tmp_path / "plugin-template"
    shutil.copytree(ROOT / "examples" / "plugin-template", template, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation"]
    built = subprocess.run([*pip, "--target", str(site), str(template)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    entry_points = next(site.glob("grpo_plugin_my_method-*.dist-info")).joinpath("entry_points.txt").read_text()
    assert "my_method = grpo_plugin_my_method:MyMethod" in entry_points
    shutil.rmtree(template / "build", ignore_errors=True)
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(template / "tests")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "10 passed, 1 skipped" in tests.stdout  # the conformance suite and the worked example
