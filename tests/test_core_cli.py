"""Discovery through installed entry points and the ``grpo-plugins`` command (list, show, check)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_plugins import Composition, CompositionError
from grpo_plugins.cli import main
from grpo_plugins.registry import discover, resolve

SCRIPT = Path(sys.executable).parent / "grpo-plugins"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_installed_methods_are_discovered():
    methods, conflicts = discover()
    assert methods["grpo"].distribution == "grpo-plugins"
    info = methods["length_penalty"]
    assert (info.distribution, info.version, info.entry_point.value) == (
        "grpo-plugin-length-penalty",
        "0.1.0",
        "grpo_plugin_length_penalty:LengthPenalty",
    )
    assert resolve("length_penalty").load().name == "length_penalty"
    assert not conflicts


def test_list_json():
    result = run_cli("list", "--json")
    assert result.returncode == 0, result.stderr
    records = {r["name"]: r for r in json.loads(result.stdout)}
    assert records["length_penalty"] == {
        "name": "length_penalty",
        "version": "0.1.0",
        "distribution": "grpo-plugin-length-penalty",
        "hooks": ["shape_rewards"],
        "summary": "Subtract a per-token length penalty from each completion's reward (shape_rewards).",
        "paper": "",
    }
    assert records["grpo"]["paper"] == "https://arxiv.org/abs/2402.03300"
    assert records["grpo"]["hooks"] == ["compute_advantages"]
    for record in records.values():  # every installed method gives the same fields
        assert {"name", "version", "distribution", "hooks", "summary", "paper"} <= set(record)


def test_list_text(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("length_penalty"))
    assert line.split() == ["length_penalty", "0.1.0", "grpo-plugin-length-penalty", "shape_rewards"]


def test_list_reports_broken_and_conflicting_distributions(install_fixture_dists, capsys):
    install_fixture_dists("twins", "broken")
    assert main(["list", "--json"]) == 0
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert "failed to import" in records["broken"]["error"]
    assert records["twin"]["error"] == (
        "registered by two distributions: grpo-plugin-fixture-twin-a and grpo-plugin-fixture-twin-b"
    )
    assert records["length_penalty"]["hooks"] == ["shape_rewards"]  # the others are still listed


def test_show(capsys):
    assert main(["show", "length_penalty"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[:3] == [
        "length_penalty 0.1.0 (grpo-plugin-length-penalty)",
        "Subtract a per-token length penalty from each completion's reward (shape_rewards).",
        "hooks: shape_rewards",
    ]
    assert "  penalty_per_token: float = 0.001  (domain: [0, inf); paper: 0.001)" in out


def test_show_unknown_and_grpo(capsys):
    assert main(["show", "length_penalt"]) == 1
    assert "did you mean 'length_penalty'?" in capsys.readouterr().err
    assert main(["show", "grpo"]) == 0
    out = capsys.readouterr().out
    assert "paper: https://arxiv.org/abs/2402.03300" in out
    assert "  scale: 'group' | 'batch' | 'none' = 'group'  (domain: 'group' | 'batch' | 'none'; paper: 'group')" in out


def test_check(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("model: tiny\ngrpo_plugins:\n  - length_penalty: {penalty_per_token: 0.01}\n  - grpo: {scale: none}\n")
    result = run_cli("check", str(run))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{run}: OK, 1 method(s) composed in this order:",
        "length_penalty (grpo-plugin-length-penalty 0.1.0): shape_rewards",
        "grpo (grpo-plugins 0.1.0): compute_advantages",
    ]


@pytest.mark.parametrize(
    "text, error",
    [
        ("grpo_plugins:\n  - length_penalt\n", "unknown method 'length_penalt'; did you mean 'length_penalty'?"),
        ("grpo_plugins:\n  - length_penalty: {penalty: 1}\n", "unknown config key(s) ['penalty']"),
        ("grpo_plugins: length_penalty\n", "'grpo_plugins' must be a list of methods, got str"),
        ("grpo_plugins: [unclosed\n", "cannot read"),
        ("- just a list\n", "must hold a mapping"),
    ],
)
def test_check_errors(tmp_path, capsys, text, error):
    run = tmp_path / "run.yaml"
    run.write_text(text)
    assert main(["check", str(run)]) == 1
    assert error in capsys.readouterr().err


def test_check_missing_file(tmp_path, capsys):
    assert main(["check", str(tmp_path / "absent.yaml")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_disabling_the_builtin_blocks_it(monkeypatch):
    monkeypatch.setenv("GRPO_PLUGINS_DISABLED", "grpo")
    with pytest.raises(CompositionError, match="method 'grpo' is disabled by GRPO_PLUGINS_DISABLED"):
        Composition(["grpo"])
    with pytest.raises(CompositionError, match="blocks the built-in 'grpo'.*no enabled method implements 'compute_advantages'"):
        Composition(["length_penalty"])
    assert Composition(["spo"]).names == ["spo"]  # another estimator: grpo is not needed


def test_list_json_into_a_closed_pipe_exits_quietly():
    process = subprocess.run(
        f"'{SCRIPT}' list --json | head -c 10", shell=True, capture_output=True, text=True, check=True
    )
    assert process.stdout.startswith("[") and "BrokenPipe" not in process.stderr and "Traceback" not in process.stderr
