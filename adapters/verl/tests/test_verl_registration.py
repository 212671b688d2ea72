"""Loading through verl's ``verl.plugins`` entry points, the method-list channels, and loud failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import grpo_plugins_verl
from grpo_plugins import CompositionError, ConfigError
from grpo_plugins_verl.main import prepare_config
from grpo_plugins_verl.runtime import get_runtime
from grpo_plugins_verl.settings import ENV_VAR, encode_methods, methods_from, parse_methods
from grpo_plugins_verl.testing import install_fake_methods, isolate

FAKE_METHODS = """
import torch
from grpo_plugins import Method, hookimpl


class ToyGate(Method):
    name = "toy_gate"

    @hookimpl
    def gate_loss(self, inputs):
        return torch.ones_like(inputs.log_probs)


class ToyObserver(Method):
    name = "toy_observer"

    @hookimpl
    def observe(self, batch, step):
        pass


class ToyReference(Method):
    name = "toy_reference"

    def requires(self):
        return {"ref_log_probs"}
"""
ENTRY_POINTS = {
    "toy_gate": "grpo_toy_methods:ToyGate",
    "toy_observer": "grpo_toy_methods:ToyObserver",
    "toy_reference": "grpo_toy_methods:ToyReference",
    "toy_broken": "grpo_toy_broken:Broken",
}


def install(root):
    install_fake_methods(root, "grpo_toy_methods", FAKE_METHODS, ENTRY_POINTS)
    (root / "grpo_toy_broken.py").write_text("raise ImportError('toy_broken needs a package that is not installed')\n")
    return root


@pytest.fixture
def fake_methods(tmp_path, monkeypatch):
    root = install(tmp_path / "site")
    isolate(monkeypatch)
    yield root
    sys.path.remove(str(root))
    grpo_plugins_verl.configure(None)


LOADS = (
    "import sys, verl\n"
    "print('loaded by verl', 'grpo_plugins_verl' in sys.modules)\n"
    "from verl.trainer.ppo import core_algos\n"
    "from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY\n"
    "print(core_algos.get_adv_estimator_fn('grpo_plugins').__name__, core_algos.get_policy_loss_fn('grpo_plugins').__name__,"
    " TRAINER_REGISTRY['grpo_plugins'].__name__, sys.modules['grpo_plugins_verl'].get_runtime().composition.names)\n"
)


RAY_WORKER = (
    "import json, ray\n"
    "ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,\n"
    "         runtime_env={'env_vars': {'GRPO_PLUGINS_VERL': json.dumps(['toy_gate'])}})\n"
    "@ray.remote\n"
    "def worker():\n"
    "    import os, sys, torch, verl\n"
    "    assert 'grpo_plugins_verl' in sys.modules\n"
    "    from verl.trainer.ppo.core_algos import get_policy_loss_fn\n"
    "    from grpo_plugins_verl import get_runtime\n"
    "    from grpo_plugins_verl.testing import actor_config\n"
    "    args = dict(old_log_prob=torch.zeros(2, 3), log_prob=torch.full((2, 3), 0.1), advantages=torch.ones(2, 3),\n"
    "                response_mask=torch.ones(2, 3, dtype=torch.bool), loss_agg_mode='token-mean')\n"
    "    ours = get_policy_loss_fn('grpo_plugins')(config=actor_config('grpo_plugins'), **args)[0]\n"
    "    vanilla = get_policy_loss_fn('vanilla')(config=actor_config(), **args)[0]\n"
    "    return get_runtime().composition.names, bool(torch.equal(ours, vanilla)), os.getpid()\n"
    "import os\n"
    "names, equal, pid = ray.get(worker.remote())\n"
    "print('ray worker', names, equal, pid != os.getpid())\n"
    "ray.shutdown()\n"
)


@pytest.fixture(scope="module")
def new_processes(tmp_path_factory):
    """Fresh processes importing verl, run side by side: good methods, a broken method, and a Ray worker
    that gets the method list only through Ray's ``runtime_env`` (as ``python -m grpo_plugins_verl.main`` sets it)."""
    root = install(tmp_path_factory.mktemp("site"))
    sys.path.remove(str(root))
    env = {key: value for key, value in os.environ.items() if key != ENV_VAR}
    env["PYTHONPATH"] = f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    runs = {
        "good": (LOADS, '["toy_gate", {"grpo": {"scale": "none"}}]'),
        "broken": ("import verl\nprint('verl started')", "toy_gate,toy_broken"),
        "ray": (RAY_WORKER, None),
    }
    procs = {
        key: subprocess.Popen([sys.executable, "-c", code], env={**env, ENV_VAR: methods} if methods else env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for key, (code, methods) in runs.items()
    }
    return {key: (proc, *proc.communicate(timeout=180)) for key, proc in procs.items()}


def test_verl_loads_the_adapter_and_the_named_methods_in_a_new_process(new_processes):
    proc, out, err = new_processes["good"]
    assert proc.returncode == 0, err[-3000:]
    assert "loaded by verl True" in out  # verl's verl.plugins entry points imported the adapter
    assert "compute_grpo_plugins_advantage compute_grpo_plugins_policy_loss GRPOPluginsTrainer ['toy_gate', 'grpo']" in out


def test_ray_workers_get_the_methods_through_runtime_env(new_processes):
    proc, out, err = new_processes["ray"]
    assert proc.returncode == 0, err[-3000:]
    assert "ray worker ['toy_gate', 'grpo'] True True" in out


def test_a_method_that_fails_to_import_stops_the_verl_process(new_processes):
    proc, out, err = new_processes["broken"]
    assert proc.returncode != 0 and "verl started" not in out
    assert "PluginStartupError" in err
    assert "method 'toy_broken' (distribution grpo-toy-methods) failed to import" in err
    assert "toy_broken needs a package that is not installed" in err


def test_bad_names_and_configs_are_errors(fake_methods, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "[toy_gte]")
    with pytest.raises(CompositionError, match="did you mean 'toy_gate'"):
        get_runtime()
    monkeypatch.setenv(ENV_VAR, "[{grpo: {scale: sideways}}]")
    with pytest.raises(ConfigError, match="scale"):
        get_runtime()


def test_method_list_channels():
    assert parse_methods("spo,gtpo") == ["spo", "gtpo"]
    assert parse_methods("[spo, {gtpo: {beta: 0.1}}]") == ["spo", {"gtpo": {"beta": 0.1}}]
    assert parse_methods('["spo"]') == ["spo"] and parse_methods(OmegaConf.create(["a", {"b": {"x": 1}}])) == ["a", {"b": {"x": 1}}]
    assert parse_methods(None) == [] and parse_methods("") == []
    algorithm = OmegaConf.create({"grpo_plugins": ["spo"]})
    assert methods_from(algorithm, environ={}) == ["spo"]
    assert methods_from(None, environ={ENV_VAR: encode_methods(["spo"])}) == ["spo"]
    assert methods_from(algorithm, environ={ENV_VAR: "spo"}) == ["spo"]
    with pytest.raises(CompositionError, match="different methods"):
        methods_from(algorithm, environ={ENV_VAR: "gtpo"})


def verl_config(*overrides):
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(overrides))


def test_one_switch_sets_verl_config_and_worker_environment(fake_methods):
    config = prepare_config(
        verl_config(
            "+grpo_plugins=[toy_gate,{toy_observer:{}}]",
            "algorithm.norm_adv_by_std_in_grpo=false",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        )
    )
    expected = ["toy_gate", {"toy_observer": {}}]
    assert config.algorithm.adv_estimator == "grpo_plugins"
    assert OmegaConf.to_container(config.algorithm.grpo_plugins) == expected
    assert config.actor_rollout_ref.actor.policy_loss.loss_mode == "grpo_plugins"
    assert config.trainer.v1.trainer_mode == "grpo_plugins"
    assert json.loads(config.ray_kwargs.ray_init.runtime_env.env_vars[ENV_VAR]) == expected
    assert json.loads(os.environ[ENV_VAR]) == expected
    # verl's strict actor config still accepts the result
    from verl.utils.config import omega_conf_to_dataclass

    assert omega_conf_to_dataclass(config.actor_rollout_ref.actor).policy_loss.loss_mode == "grpo_plugins"
    assert methods_from(config.algorithm) == expected  # driver and workers agree


def test_one_switch_refuses_settings_the_methods_cannot_run_with(fake_methods):
    with pytest.raises(CompositionError, match="loss_mode=gspo"):
        prepare_config(verl_config("+grpo_plugins=[toy_gate]", "actor_rollout_ref.actor.policy_loss.loss_mode=gspo"))
    with pytest.raises(CompositionError, match="adv_estimator=rloo"):
        prepare_config(verl_config("+grpo_plugins=[]", "algorithm.adv_estimator=rloo"))
    with pytest.raises(CompositionError, match="trainer_mode=separate_async"):
        prepare_config(verl_config("+grpo_plugins=[toy_observer]", "trainer.v1.trainer_mode=separate_async"))
    with pytest.raises(CompositionError, match="needs batch field 'ref_log_probs'.*use_kl_loss=True"):
        prepare_config(verl_config("+grpo_plugins=[toy_reference]"))
    with_reference = prepare_config(verl_config("+grpo_plugins=[toy_reference]", "actor_rollout_ref.actor.use_kl_loss=True"))
    assert with_reference.algorithm.adv_estimator == "grpo_plugins"
    kept = prepare_config(verl_config("+grpo_plugins=[toy_observer]", "actor_rollout_ref.actor.policy_loss.loss_mode=gspo"))
    assert kept.actor_rollout_ref.actor.policy_loss.loss_mode == "gspo"  # no loss hooks: verl's loss stays
