"""The GPU example's CPU-checkable parts: its assets load in verl, and its overrides fit verl's config.

``examples/verl/run_tiny_grpo.sh`` itself needs a GPU and vLLM; here its exact command line is
captured (the script runs with a stub interpreter for the training call), composed with verl's own
Hydra config, passed through ``prepare_config`` and verl's ``validate_config``, and its first
round is planned on verl's ``RLHFDataset`` built from the generated parquet and tokenizer.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import grpo_plugins_verl
from grpo_plugins_verl.main import prepare_config
from grpo_plugins_verl.settings import ENV_VAR
from grpo_plugins_verl.trainer import ROLLOUT_N_KEY, GRPOPluginsTrainer, IndexedDataset

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "verl"
METHODS = ("vade", "sapo")
STUB = """#!/bin/sh
if [ "$1" = "-m" ]; then shift 2; printf '%s\\n' "$@" > "$ARGS_FILE"; exit 0; fi
exec "$REAL_PYTHON" "$@"
"""


def installed(name: str) -> bool:
    return any(ep.name == name for ep in metadata.entry_points(group="grpo_plugins"))


pytestmark = pytest.mark.skipif(
    not all(installed(m) for m in METHODS), reason=f"the example composes {METHODS}; install those plugins"
)


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    """Run the example script with a stub interpreter: real asset building, captured training overrides."""
    work = tmp_path_factory.mktemp("tiny")
    stub = work / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    env = {**os.environ, "WORK": str(work), "PYTHON": str(stub), "REAL_PYTHON": sys.executable, "ARGS_FILE": str(work / "args")}
    subprocess.run(["bash", str(EXAMPLE / "run_tiny_grpo.sh")], env=env, capture_output=True, text=True, timeout=300)
    overrides = (work / "args").read_text().splitlines()
    stale = work / "ckpt" / "global_step_2"
    stale.mkdir(parents=True)
    (stale / "grpo_plugins.pt").write_text("from an earlier run")
    again = subprocess.run(["bash", str(EXAMPLE / "run_tiny_grpo.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert "OK" not in again.stdout  # the stub trained nothing: a stale state file must not pass the check
    return work, overrides


def test_example_overrides_fit_verl_config(example_run):
    work, overrides = example_run
    assert "+grpo_plugins=[vade,sapo]" in overrides
    # sapo's own aggregation, and no resume of an earlier run in the same folder (it would train nothing)
    assert "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean" in overrides
    assert "trainer.resume_mode=disable" in overrides
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        config = compose(config_name="ppo_trainer", overrides=overrides)
    config = prepare_config(config)
    assert config.algorithm.adv_estimator == "grpo_plugins"
    assert config.actor_rollout_ref.actor.policy_loss.loss_mode == "grpo_plugins"  # sapo has a loss hook
    assert config.trainer.v1.trainer_mode == "grpo_plugins"  # vade samples prompts and keeps state
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    assert not need_critic(config)


def test_example_assets_load_in_verl_and_plan_a_round(example_run):
    work, overrides = example_run
    from transformers import AutoTokenizer
    from verl.trainer.ppo.utils import create_rl_dataset

    spec = importlib.util.spec_from_file_location("tiny_reward", EXAMPLE / "reward.py")
    reward = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reward)
    assert reward.compute_score("tiny_arith", "44 is it", "44") == {"score": 1.0, "acc": 1.0}
    assert reward.compute_score("tiny_arith", "4 4", "44")["score"] == 0.0

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        config = prepare_config(compose(config_name="ppo_trainer", overrides=overrides))
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    text = "user : what is 8 + 36 ? assistant : 44"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    dataset = create_rl_dataset([str(work / "train.parquet")], config.data, tokenizer, None, is_train=True)

    trainer = object.__new__(GRPOPluginsTrainer)
    trainer.config = config
    trainer.global_steps = 1
    trainer.train_dataset = IndexedDataset(dataset)
    trainer.train_dataloader_it = None
    trainer.grpo_plugins = grpo_plugins_verl.get_runtime(config.algorithm)
    trainer.prompt_generator = torch.Generator().manual_seed(1)
    assert trainer.grpo_plugins.composition.names == ["vade", "sapo", "grpo"]
    td = trainer._fetch_one_gen_batch()  # vade picks the prompts from verl's RLHFDataset
    assert len(td) == 8 and ROLLOUT_N_KEY not in td.keys()
    ids = [trainer.grpo_plugins.prompt_ids[uid] for uid in td["uid"]]
    assert all(0 <= i < 64 for i in ids)
    assert [row[0]["content"] for row in td["raw_prompt"]] == [dataset[i]["raw_prompt"][0]["content"] for i in ids]
    assert OmegaConf.select(config, f"ray_kwargs.ray_init.runtime_env.env_vars.{ENV_VAR}") is not None
