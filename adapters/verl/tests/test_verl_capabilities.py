"""The capability check on verl: what the adapter provides for a run's verl settings, compared with what
the enabled methods need, refused before the first step with every problem at once."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_module

import grpo_plugins_verl
from grpo_plugins import CompositionError, Composition, LossTerm, Method, Needs, hookimpl
from grpo_plugins_verl.advantage import compute_grpo_plugins_advantage
from grpo_plugins_verl.capabilities import check_run, verl_capabilities
from grpo_plugins_verl.testing import isolate, verl_batch


@pytest.fixture(autouse=True)
def clean_runtime(monkeypatch):
    isolate(monkeypatch)
    yield
    grpo_plugins_verl.configure(None)


def verl_config(*overrides):
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(overrides))


class Objectives(Method):
    name = "toy_objectives"

    @hookimpl
    def loss_objectives(self, inputs):
        return {"entropy": LossTerm(inputs.log_probs, normaliser="sequence")}


class Setup(Method):
    name = "toy_setup"

    @hookimpl
    def setup(self, context):
        pass


class Filter(Method):
    name = "toy_filter"

    @hookimpl
    def keep_rows(self, batch):
        return torch.ones(batch.num_completions, dtype=torch.bool)


class Injector(Method):
    name = "toy_injector"

    @hookimpl
    def inject_rows(self, batch):
        return []


class StepScaler(Method):
    name = "toy_step_scaler"

    @hookimpl
    def scale_update(self, batch, step):
        return torch.tensor(1.0)


class Sampler(Method):
    name = "toy_sampler"

    @hookimpl
    def sample_prompts(self, round, generator):
        return torch.arange(round.num_prompts)


class Gate(Method):
    name = "toy_gate"

    @hookimpl
    def gate_loss(self, inputs):
        return torch.ones_like(inputs.log_probs)


class Picky(Method):
    name = "toy_picky"

    def needs(self):
        return Needs(loss_fields={"entropies", "ref_log_probs"}, columns={"prompt_id", "answer"},
                     settings={"loss_aggregation": ("sequence_mean",), "group_size": (8,)})


def problems(methods, config=None, columns=None):
    return Composition(methods).capability_problems(verl_capabilities(config, columns))


def test_designed_features_verl_lacks_are_refused_naming_method_and_feature():
    found = problems([Objectives(), Setup(), Filter(), Injector(), StepScaler()], verl_config())
    expected = {"toy_objectives": "loss_normalisers", "toy_setup": "method_setup", "toy_filter": "batch_editing",
                "toy_injector": "row_injection", "toy_step_scaler": "update_control"}
    assert len(found) == len(expected)
    for method, feature in expected.items():
        assert any(f"method '{method}' needs trainer feature '{feature}'" in p and "verl lacks it" in p for p in found)
    with pytest.raises(CompositionError, match="5 problems"):
        check_run(Composition([Objectives(), Setup(), Filter(), Injector(), StepScaler()]), verl_config())


def test_verl_settings_take_features_away():
    assert problems([Sampler(), Gate()], verl_config()) == []  # the defaults: sync trainer, vanilla loss
    found = problems([Sampler()], verl_config("trainer.v1.trainer_mode=separate_async"))
    assert found and all("trainer.v1.trainer_mode=separate_async" in p for p in found)
    found = problems([Gate()], verl_config("actor_rollout_ref.actor.policy_loss.loss_mode=gspo"))
    assert len(found) == 1 and "'token_loss'" in found[0] and "loss_mode=gspo" in found[0]


def test_declared_fields_columns_and_settings_are_checked_against_the_run():
    config = verl_config("actor_rollout_ref.rollout.n=4")
    found = problems([Picky()], config, columns=["prompt", "answer"])
    assert any("loss field 'ref_log_probs'" in p and "use_kl_loss=True" in p for p in found)
    assert any("dataset column 'prompt_id'" in p for p in found)
    assert any("actor_rollout_ref.actor.loss_agg_mode = 'token_mean'" in p for p in found)
    assert any("actor_rollout_ref.rollout.n = 4" in p for p in found)
    assert not any("entropies" in p or "'answer'" in p for p in found)
    fine = verl_config("actor_rollout_ref.rollout.n=8", "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean",
                       "actor_rollout_ref.actor.use_kl_loss=True")
    assert problems([Picky()], fine, columns=["prompt_id", "answer"]) == []


def test_without_the_trainer_the_estimator_refuses_what_only_the_trainer_provides():
    grpo_plugins_verl.configure([Sampler(), Picky()])
    rewards, mask, uids = verl_batch((2, 3), seed=6)
    with pytest.raises(CompositionError, match="(?s)toy_sampler.*prompt_selection.*toy_picky.*entropies.*trainer_mode=grpo_plugins"):
        compute_grpo_plugins_advantage(rewards, mask, uids, None)


class OldEntropies(Method):
    name = "toy_old_entropies"

    def requires(self):
        return {"old_entropies"}


def test_old_policy_entropies_come_from_verls_old_log_prob_pass():
    assert problems([OldEntropies()], verl_config()) == []
    found = problems([OldEntropies()], verl_config("algorithm.rollout_correction.bypass_mode=True"))
    assert len(found) == 1 and "'old_entropies'" in found[0] and "bypass_mode=True" in found[0]
    assert problems([OldEntropies()]) and "trainer_mode=grpo_plugins" in problems([OldEntropies()])[0]
