"""The TRL training command: ``grpo-plugins train --config run.yaml`` (``python -m grpo_plugins_trl.grpo``)
trains the tiny local model from a YAML file, and ``grpo-plugins check`` runs the same start-up checks
as the command and the trainer, with every problem reported at once and the same messages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("grpo_plugin_knapsack_rl")
pytest.importorskip("grpo_plugin_ngrpo")
pytest.importorskip("grpo_plugin_unlikeliness")
pytest.importorskip("grpo_plugin_llds")

import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from grpo_plugins import CompositionError  # noqa: E402
from grpo_plugins.cli import main as cli  # noqa: E402
from grpo_plugins_trl import PluginGRPOConfig  # noqa: E402
from grpo_plugins_trl.checks import checked_composition  # noqa: E402
from grpo_plugins_trl.testing import arithmetic_dataset, tiny_grpo_run, tiny_model, tiny_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "trl_command" / "run.yaml"
SCRIPT = Path(sys.executable).parent / "grpo-plugins"


def write_assets(folder: Path, data_format: str = "jsonl") -> dict:
    """The tiny model and tokenizer (``save_pretrained``) and an arithmetic dataset file; their paths."""
    tiny_model().save_pretrained(folder / "model")
    tiny_tokenizer().save_pretrained(folder / "model")
    dataset = arithmetic_dataset(32)
    path = folder / f"train.{data_format}"
    if data_format == "parquet":
        dataset.to_parquet(str(path))
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in dataset))
    return {"model_name_or_path": str(folder / "model"), "dataset_name": str(path), "output_dir": str(folder / "out")}


def problems_of(capsys) -> list[str]:
    """The ``- problem`` lines a command printed on stderr (continuation lines joined)."""
    problems: list[str] = []
    for line in capsys.readouterr().err.splitlines():
        if line.startswith("- "):
            problems.append(line[2:])
        elif line.startswith("  ") and problems:
            problems[-1] += "\n" + line[2:]
    return problems


def test_train_command_trains_the_example_config_on_the_tiny_model(tmp_path):
    paths = write_assets(tmp_path, "parquet")
    flags = [f"--{key}={value}" for key, value in paths.items()] + ["--max_steps=2"]
    done = subprocess.run([str(SCRIPT), "train", "--config", str(EXAMPLE), *flags], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "2/2" in output  # TRL's own progress bar ran to the end
    for prefix in ("plugins/knapsack_rl/", "plugins/ngrpo/", "plugins/unlikeliness/"):
        assert prefix in output  # every method ran and TRL logged its metrics
    trained = load_file(str(tmp_path / "out" / "model.safetensors"))
    initial = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert trained.keys() == initial.keys()
    assert any(not trained[name].equal(initial[name]) for name in initial)  # two optimiser steps changed the model


def test_check_accepts_the_config_the_command_trains(tmp_path, capsys):
    paths = write_assets(tmp_path)
    config = {**yaml.safe_load(EXAMPLE.read_text()), **paths}
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(config))
    assert cli(["check", str(run)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{run}: OK for TRL GRPOTrainer, 3 method(s) composed in this order:",
        "knapsack_rl (grpo-plugin-knapsack-rl 0.1.0): allocate_rollouts, observe",
        "ngrpo (grpo-plugin-ngrpo 0.1.0): compute_advantages, policy_surrogate",
        "unlikeliness (grpo-plugin-unlikeliness 0.1.0): shape_rewards",
        "grpo (grpo-plugins 0.1.0): no active hook",
    ]


BAD = """
multi_objective_aggregation: normalize_then_sum
learning_rat: 1.0e-3
reward_funcs: [grpo_plugins_trl.testing.exact_answer_reward, no_such_module.reward]
grpo_plugin: [spo]
algorithm:
  grpo_plugins: [spo]
grpo_plugins:
  - llds: {coef: 0.2}
  - gtpo: {alpha: 1.0}
  - ngrpo: {}
"""


def test_check_and_train_refuse_a_bad_config_with_every_problem_and_the_same_messages(tmp_path, capsys):
    paths = write_assets(tmp_path)
    config = {**yaml.safe_load(EXAMPLE.read_text()), **paths}
    config.pop("grpo_plugins")
    run = tmp_path / "bad.yaml"
    run.write_text(yaml.safe_dump(config) + BAD)

    assert cli(["check", str(run)]) == 1
    checked = problems_of(capsys)
    assert cli(["train", "--config", str(run)]) == 1
    assert problems_of(capsys) == checked  # the command refuses with exactly the check's problems
    assert not (tmp_path / "out").exists()  # refused before anything was loaded or written

    expected = [
        "unknown key 'learning_rat' in the run config (did you mean 'learning_rate'?)",
        "unknown key 'grpo_plugin' in the run config (did you mean 'grpo_plugins'?)",
        "'algorithm.grpo_plugins' is where a verl config names its methods; in a TRL run config 'grpo_plugins' "
        "belongs at the top level",
        "reward_funcs: cannot load 'no_such_module.reward': ModuleNotFoundError: No module named 'no_such_module'",
        "method 'gtpo' (distribution grpo-plugin-gtpo): unknown config key(s) ['alpha']",
        "method 'ngrpo' needs trainer feature 'advantage_hooks'",
    ]
    assert len(checked) == len(expected)
    for problem, start in zip(checked, expected):
        assert problem.startswith(start)
    assert "multi_objective_aggregation='normalize_then_sum'" in checked[-1]


def test_the_trainer_refuses_what_check_refuses_with_the_same_message(tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text("multi_objective_aggregation: normalize_then_sum\nuse_cpu: true\nbf16: false\ngrpo_plugins: [ngrpo]\n")
    assert cli(["check", str(run), "--trainer", "trl"]) == 1
    problems = problems_of(capsys)
    # the run config names no model, dataset or reward: reported with the methods' problem
    assert [p for p in problems if p.startswith("method ")] == [problems[-1]]
    with pytest.raises(CompositionError) as refused:
        tiny_grpo_run(["ngrpo"], multi_objective_aggregation="normalize_then_sum", train=False)
    assert problems[-1] in str(refused.value)
    # the function the trainer's constructor is to call gives the same refusal, and the run's composition
    settings = dict(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False)
    args = PluginGRPOConfig(multi_objective_aggregation="normalize_then_sum", **settings)
    with pytest.raises(CompositionError) as refused:
        checked_composition(args, ["ngrpo"])
    assert str(refused.value) == problems[-1]
    assert checked_composition(PluginGRPOConfig(**settings), ["ngrpo"]).names == ["ngrpo", "grpo"]


def test_flags_override_the_file_and_are_checked(tmp_path, capsys):
    paths = write_assets(tmp_path)
    config = {**yaml.safe_load(EXAMPLE.read_text()), **paths}
    from grpo_plugins_trl.checks import prepare_run

    prepared, problems = prepare_run(config, ["--loss_type", "bnpo", "--no_such_flag", "3"])
    assert problems == ["the TRL settings are refused: unknown command-line argument(s) ['--no_such_flag', '3']"]
    prepared, problems = prepare_run(config, ["--loss_type", "bnpo", "--multi_objective_aggregation", "normalize_then_sum"])
    assert prepared.training_args.loss_type == "bnpo"  # the flags win over the file
    assert problems and all(p.startswith("method '") and "normalize_then_sum" in p for p in problems)
    assert {p.split("'")[1] for p in problems} == {"knapsack_rl", "ngrpo", "unlikeliness"}
