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
from grpo_plugins_verl.testing import verl_batch


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


class Pairwise(Method):
    """A whole-group objective (as copg, disco and reg_grpo declare it)."""

    name = "toy_pairwise"

    def needs(self):
        return Needs(loss_fields={"group_index"}, features={"whole_groups"})

    @hookimpl
    def loss_objectives(self, inputs):
        group, _ = inputs.local_groups(self.name)
        return {"pairs": LossTerm(group.float(), normaliser="group")}


TINY = ("actor_rollout_ref.rollout.n=4", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2", "data.train_batch_size=2")
"""2 prompts x 4 completions in micro-batches of 8 rows (verl's default: 8 GPUs on one node)."""


class Allocator(Method):
    name = "toy_allocator"

    @hookimpl
    def allocate_rollouts(self, round, prompt_ids):
        return torch.full_like(prompt_ids, round.default_rollouts)


def test_designed_features_verl_lacks_are_refused_naming_method_and_feature():
    found = problems([Objectives(), Setup(), Filter(), Injector(), StepScaler()], verl_config())
    expected = {"toy_step_scaler": "update_control"}  # row_injection: provided (test_verl_injection.py)
    assert len(found) == len(expected)
    for method, feature in expected.items():
        assert any(f"method '{method}' needs trainer feature '{feature}'" in p and "verl lacks it" in p for p in found)
    with pytest.raises(CompositionError, match="method 'toy_step_scaler' needs trainer feature 'update_control'"):
        check_run(Composition([Objectives(), Setup(), Filter(), Injector(), StepScaler()]), verl_config())


@pytest.mark.parametrize("overrides, setting", [
    ((), "trainer_mode=grpo_plugins"),  # verl's own trainer (no config): no replay buffer of the adapter's
    (("+trainer.v1.sampler.custom_sampler.path=my.py", "+trainer.v1.sampler.custom_sampler.name=Mine"), "custom_sampler"),
    (("reward.reward_model.enable=True",), "enable_resource_pool=True"),
    (("trainer.v1.trainer_mode=separate_async",), "trainer.v1.trainer_mode=separate_async"),
])
def test_batch_editing_runs_in_verl_own_sync_replay_buffer(overrides, setting):
    """keep_rows is provided with the grpo_plugins trainer (verl's DAPO filter and refill), refused where verl's
    sync ReplayBuffer does not decide the groups, naming the setting."""
    assert problems([Filter()], verl_config()) == []
    found = problems([Filter()], verl_config(*overrides) if overrides else None)
    assert len(found) == 1 and "'toy_filter' needs trainer feature 'batch_editing'" in found[0] and setting in found[0]


def test_objectives_setup_and_whole_groups_run_with_the_grpo_plugins_trainer():
    assert problems([Objectives(), Setup(), Pairwise()], verl_config(*TINY, "trainer.n_gpus_per_node=1")) == []
    # without the trainer (verl's estimator and policy loss registered by hand) only the loss terms remain
    found = problems([Objectives(), Setup(), Pairwise()], None)
    assert not any("toy_objectives" in p for p in found)
    assert any("'toy_setup' needs trainer feature 'method_setup'" in p for p in found)
    assert any("'toy_pairwise' needs trainer feature 'whole_groups'" in p and "trainer_mode=grpo_plugins" in p for p in found)


@pytest.mark.parametrize("override, setting", [
    ("actor_rollout_ref.actor.use_dynamic_bsz=True", "use_dynamic_bsz=True"),
    ("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=6", "ppo_micro_batch_size_per_gpu=6 is not a multiple of "
     "actor_rollout_ref.rollout.n=4"),
    ("trainer.n_gpus_per_node=4", "ppo_mini_batch_size=2 prompts do not split evenly over the 4 data-parallel ranks"),
    ("actor_rollout_ref.actor.ulysses_sequence_parallel_size=2", "over the 4 data-parallel ranks"),
])
def test_whole_groups_are_refused_where_verl_would_split_a_group(override, setting):
    gpus = () if "n_gpus" in override else ("trainer.n_gpus_per_node=8" if "ulysses" in override else "trainer.n_gpus_per_node=1",)
    found = problems([Pairwise(), Objectives()], verl_config(*TINY, *gpus, override))
    assert len(found) == 2, found  # the feature and the loss field group_index, for the whole-group method only
    assert all("method 'toy_pairwise'" in p and setting in p for p in found)


def test_whole_groups_with_rollout_allocation_are_refused():
    with pytest.raises(CompositionError, match=r"toy_pairwise.*toy_allocator.*allocate_rollouts"):
        check_run(Composition([Pairwise(), Allocator()]), verl_config())


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
