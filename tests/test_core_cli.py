"""Discovery through installed entry points and the ``grpo-plugins`` command (list, show, check, train)."""

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
        "plugin_api": ">=1.0,<2",
        "needs": {"features": ["advantage_hooks"]},
    }
    assert records["grpo"]["paper"] == "https://arxiv.org/abs/2402.03300"
    assert records["grpo"]["hooks"] == ["compute_advantages"]
    for record in records.values():  # every installed method gives the same fields
        assert {"name", "version", "distribution", "hooks", "summary", "paper"} <= set(record)


def test_list_text(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("length_penalty"))
    assert line.split() == ["length_penalty", "0.1.0", "grpo-plugin-length-penalty", "API", ">=1.0,<2", "shape_rewards"]


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
    run.write_text("grpo_plugins:\n  - length_penalty: {penalty_per_token: 0.01}\n  - grpo: {scale: none}\n")
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
        ("grpo_plugins: 3\n", "'grpo_plugins' must be a list of methods (names or {name: {config}}), got int 3"),
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


def test_check_reports_every_problem_at_once(tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text(
        "grpo_plugins:\n  - length_penalt\n  - length_penalty: {penalty: 1}\n  - grpo: {scale: nope}\n"
    )
    assert main(["check", str(run)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"error: {run}: 3 problems:"
    assert err[1].startswith("- unknown method 'length_penalt'; did you mean 'length_penalty'?")
    assert err[2].startswith("- method 'length_penalty' (distribution grpo-plugin-length-penalty): unknown config key(s) ['penalty']")
    assert err[3].startswith("- method 'grpo' (distribution grpo-plugins):") and "'nope'" in err[3]


def test_composition_problems_are_the_messages_composition_raises():
    from grpo_plugins.cli import composition_problems

    composition, problems = composition_problems(["length_penalty", {"grpo": {"scale": "none"}}])
    assert problems == [] and composition.names == ["length_penalty", "grpo"]
    specs = [{"length_penalty": {"penalty": 1}}, "length_penalt"]
    with pytest.raises(CompositionError) as first:
        Composition(specs)
    composition, problems = composition_problems(specs)
    assert problems[0] == str(first.value) and len(problems) == 2
    assert composition.names == ["grpo"]  # what could be built, for the trainer settings check
    # the methods that can be built are composed, so that a trainer can still check its settings for them
    composition, problems = composition_problems(["length_penalt", "length_penalty"])
    assert composition.names == ["length_penalty", "grpo"] and len(problems) == 1


@pytest.mark.parametrize(
    "config, kind",
    [
        ({"grpo_plugins": ["spo"]}, "none"),
        ({}, "none"),
        ({"loss_type": "dapo", "grpo_plugins": ["spo"]}, "trl"),
        ({"grpo_plugin": ["spo"]}, "trl"),  # a misspelt key: checked as a TRL run config, which refuses it
        ({"learning_rate": 1e-6, "algorithm": {"grpo_plugins": ["spo"]}}, "trl"),
        ({"algorithm": {"adv_estimator": "grpo"}, "grpo_plugins": ["spo"]}, "verl"),
        ({"actor_rollout_ref": {"rollout": {"n": 8}}, "grpo_plugins": ["spo"]}, "verl"),
    ],
)
def test_check_recognises_the_trainer_of_a_config(config, kind):
    from grpo_plugins.cli import config_kind

    assert config_kind(config) == kind


def test_check_without_a_trainer_names_a_misspelt_key(tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text("grpo_plugin:\n  - length_penalty\n")
    assert main(["check", str(run), "--trainer", "none"]) == 1
    assert "- unknown key 'grpo_plugin' (did you mean 'grpo_plugins'?)" in capsys.readouterr().err.splitlines()


def test_train_without_the_trl_adapter_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "grpo_plugins_trl", None)  # as if grpo-plugins-trl were not installed
    assert main(["train", "--config", "run.yaml"]) == 1
    err = capsys.readouterr().err
    assert "the TRL adapter, which is not installed: pip install grpo-plugins-trl" in err


def test_train_is_listed_and_other_commands_refuse_extra_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "train" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["list", "--config", "x"])
    assert "unrecognized arguments: --config x" in capsys.readouterr().err


VERL_CONFIG = """
grpo_plugins: [vade, {sapo: {tau_neg: 1.5}}]
algorithm: {adv_estimator: grpo}
actor_rollout_ref:
  actor:
    policy_loss: {loss_mode: gspo}
trainer:
  nnode: 1
  v1: {trainer_mode: separate_async}
"""


def test_check_runs_the_verl_adapters_checks_and_reports_every_problem(tmp_path, capsys):
    pytest.importorskip("grpo_plugins_verl.checks")
    pytest.importorskip("grpo_plugin_vade")
    pytest.importorskip("grpo_plugin_sapo")
    run = tmp_path / "verl.yaml"
    run.write_text(VERL_CONFIG)
    assert main(["check", str(run)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: {run}: 5 problems:",
        "- unknown key 'trainer.nnode' in the verl config (did you mean 'trainer.nnodes'?)",
        *[
            f"- method 'vade' needs trainer feature '{feature}' ({what}); verl lacks it: "
            "trainer.v1.trainer_mode=separate_async (the grpo_plugins trainer is verl's sync trainer; use "
            "trainer.v1.trainer_mode=sync)"
            for feature, what in [
                ("after_step", "a call after each optimiser step (hook observe)"),
                ("method_state", "method state saved with every checkpoint and restored on resume"),
                ("prompt_selection", "choosing the prompts of each round (hook sample_prompts)"),
            ]
        ],
        "- method 'sapo' needs trainer feature 'token_loss' (a per-token loss assembled from the method's hooks "
        "(policy_surrogate, gate_loss, loss_terms)); verl lacks it: actor.policy_loss.loss_mode=gspo (the "
        "methods' loss stage runs on verl's vanilla PPO loss; use loss_mode=vanilla)",
    ]


def test_verl_check_gives_the_message_the_verl_entry_point_raises():
    checks = pytest.importorskip("grpo_plugins_verl.checks")
    pytest.importorskip("grpo_plugin_sapo")
    from hydra import compose, initialize_config_module

    from grpo_plugins_verl.main import prepare_config

    overrides = ["+grpo_plugins=[sapo]", "actor_rollout_ref.actor.policy_loss.loss_mode=gspo"]
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        config = compose(config_name="ppo_trainer", overrides=overrides)
    with pytest.raises(CompositionError) as refused:
        prepare_config(config)
    config = {"grpo_plugins": ["sapo"], "actor_rollout_ref": {"actor": {"policy_loss": {"loss_mode": "gspo"}}}}
    assert checks.check_config(config, verl_validation=False)[1] == [str(refused.value)]
    # verl reads the list from algorithm.grpo_plugins too: the check accepts it there
    composition, problems = checks.check_config({"algorithm": {"grpo_plugins": ["sapo"]}}, verl_validation=False)
    assert problems == [] and composition.providers("policy_surrogate") == ["sapo"]
