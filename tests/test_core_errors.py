"""Every start-up error and every bad-batch error names its culprit; hook tracing."""

import pickle

import pytest
import torch

from grpo_plugins import (
    BatchError,
    Composition,
    CompositionError,
    ConfigError,
    GRPOBatch,
    Method,
    PluginError,
    PromptRound,
    hookimpl,
)
from grpo_plugins.registry import discover
from grpo_plugins.testing import make_batch


class Estimator(Method):
    name = "estimator"

    @hookimpl
    def compute_advantages(self, batch):
        return batch.rewards - batch.rewards.mean()


class OtherEstimator(Estimator):
    name = "other_estimator"


class Raising(Method):
    name = "raising"

    @hookimpl
    def shape_rewards(self, rewards):
        raise RuntimeError("reward model offline")


class Allocator(Method):
    name = "allocator"

    @hookimpl
    def allocate_rollouts(self, round, prompt_ids):
        return torch.full_like(prompt_ids, 3)


# ---------------------------------------------------------------- start-up errors
def test_two_methods_claiming_a_single_provider_slot():
    with pytest.raises(CompositionError) as error:
        Composition([Estimator(), OtherEstimator()])
    message = str(error.value)
    assert "'estimator'" in message and "'other_estimator'" in message and "'compute_advantages'" in message
    assert "single provider" in message


def test_a_name_registered_by_two_distributions(install_fixture_dists):
    install_fixture_dists("twins")
    methods, conflicts = discover()
    assert "twin" not in methods
    assert [i.distribution for i in conflicts["twin"]] == ["grpo-plugin-fixture-twin-a", "grpo-plugin-fixture-twin-b"]
    with pytest.raises(CompositionError) as error:
        Composition(["twin"])
    assert str(error.value) == (
        "method name 'twin' is registered by two distributions: grpo-plugin-fixture-twin-a "
        "(grpo_plugin_fixture_twin_a:Twin) and grpo-plugin-fixture-twin-b (grpo_plugin_fixture_twin_b:Twin); uninstall one"
    )


def test_an_unknown_method_suggests_close_names():
    with pytest.raises(CompositionError, match=r"unknown method 'length_penalt'; did you mean 'length_penalty'\?"):
        Composition(["length_penalt"])
    with pytest.raises(CompositionError, match=r"unknown method 'zzzz' \(installed: .*length_penalty"):
        Composition(["zzzz"])


def test_an_unknown_config_key_lists_the_valid_fields():
    with pytest.raises(ConfigError) as error:
        Composition([{"length_penalty": {"penalty_per_tokens": 0.1}}])
    message = str(error.value)
    assert "method 'length_penalty' (distribution grpo-plugin-length-penalty)" in message
    assert "unknown config key(s) ['penalty_per_tokens']; did you mean 'penalty_per_token'?" in message
    assert "valid fields: penalty_per_token" in message
    with pytest.raises(ConfigError, match=r"'grpo'.*unknown config key\(s\) \['nope'\].*valid fields: aggregation, arithmetic, epsilon, scale"):
        Composition([{"grpo": {"nope": 1}}])


def test_an_ill_typed_config_value_names_key_and_type():
    with pytest.raises(ConfigError, match=r"'length_penalty'.*'penalty_per_token' expects float, got 'big' \(str\)"):
        Composition([{"length_penalty": {"penalty_per_token": "big"}}])
    with pytest.raises(ConfigError, match=r"'grpo'.*'scale' expects 'group' \| 'batch' \| 'none', got 'groups'"):
        Composition([{"grpo": {"scale": "groups"}}])
    with pytest.raises(CompositionError, match=r"method 'length_penalty': its config must be a mapping"):
        Composition([{"length_penalty": 0.1}])


def test_a_misspelt_hookimpl_is_an_error(install_fixture_dists):
    install_fixture_dists("misspelt")
    with pytest.raises(CompositionError) as error:
        Composition(["misspelt"])
    message = str(error.value)
    assert "method 'misspelt' (distribution grpo-plugin-fixture-misspelt) implements an unknown hook" in message
    assert "shape_reward" in message and "Valid hooks: sample_prompts" in message


def test_a_hookimpl_with_an_unknown_argument_is_an_error():
    class ExtraArg(Method):
        name = "extra_arg"

        @hookimpl
        def shape_rewards(self, rewards, temperature):
            return rewards

    with pytest.raises(CompositionError, match=r"(?s)method 'extra_arg'.*\{'temperature'\} are declared in the hookimpl"):
        Composition([ExtraArg()])


def test_a_pluggy_wrapper_is_refused():
    class Wrapper(Method):
        name = "wrapper"

        @hookimpl(wrapper=True)
        def shape_rewards(self, rewards):
            return (yield)

    with pytest.raises(CompositionError, match=r"method 'wrapper'.*'shape_rewards'.*wrapper"):
        Composition([Wrapper()])


def test_grpo_plugins_disabled_blocks_a_method(monkeypatch):
    monkeypatch.setenv("GRPO_PLUGINS_DISABLED", "sapo, length_penalty")
    assert "length_penalty" not in discover()[0]
    with pytest.raises(CompositionError, match="method 'length_penalty' is disabled by GRPO_PLUGINS_DISABLED"):
        Composition(["length_penalty"])
    monkeypatch.setenv("GRPO_PLUGINS_DISABLED", "")
    assert Composition(["length_penalty"]).names == ["length_penalty", "grpo"]


def test_grpo_plugins_load_hides_every_other_method(monkeypatch):
    monkeypatch.setenv("GRPO_PLUGINS_LOAD", "length_penalty")
    assert set(discover()[0]) == {"length_penalty"}
    assert Composition(["length_penalty"]).names == ["length_penalty", "grpo"]  # the built-in default stays
    monkeypatch.setenv("GRPO_PLUGINS_LOAD", "")
    assert discover()[0] == {}
    with pytest.raises(CompositionError, match="method 'length_penalty' is not listed in GRPO_PLUGINS_LOAD"):
        Composition(["length_penalty"])


def test_a_method_failing_to_import_names_its_distribution(install_fixture_dists):
    install_fixture_dists("broken")
    with pytest.raises(CompositionError) as error:
        Composition(["broken"])
    message = str(error.value)
    assert "method 'broken' (distribution grpo-plugin-fixture-broken) failed to import" in message
    assert "grpo_plugin_fixture_broken:Broken" in message and "ModuleNotFoundError" in message


def test_a_method_failing_to_start_names_itself(install_fixture_dists):
    install_fixture_dists("fragile")
    with pytest.raises(CompositionError) as error:
        Composition(["fragile"])
    assert "method 'fragile' (distribution grpo-plugin-fixture-fragile) failed to start: OSError: cache directory missing" in str(
        error.value
    )


def test_a_method_enabled_twice_and_an_unreadable_entry():
    with pytest.raises(CompositionError, match=r"\['length_penalty'\] are enabled more than once"):
        Composition(["length_penalty", {"length_penalty": {"penalty_per_token": 0.1}}])
    with pytest.raises(CompositionError, match="cannot read method entry 3"):
        Composition([3])


# ---------------------------------------------------------------- bad batches
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(rewards=torch.zeros(11)), r"rewards must be \(10,\) to match prompt_ids, got tensor of shape \(11,\)"),
        (dict(prompt_ids=torch.zeros(10)), r"prompt_ids must be an \(N,\) integer tensor"),
        (dict(reward_components=torch.zeros(9, 1)), r"reward_components must be \(10, K\)"),
        (dict(reward_weights=torch.ones(2)), r"reward_weights must be \(K,\) = \(1,\)"),
        (dict(old_log_probs=torch.zeros(10, 7)), r"old_log_probs must be \(N, T\) = \(10, T\) like the other token tensors"),
        (dict(completion_mask=torch.ones(10)), r"completion_mask must be \(N, T\)"),
        (dict(rows=[{}] * 9), r"rows must hold N=10 items like prompt_ids, got 9"),
        (dict(completions=["a"] * 11), r"completions must hold N=10 items"),
    ],
)
def test_wrong_shapes(change, message):
    with pytest.raises(BatchError, match=message):
        Composition([]).run_advantage_stage(make_batch(group_sizes=(3, 3, 2, 2), **change))


def test_nan_and_inf_rewards_are_named():
    rewards = torch.tensor([1.0, float("nan"), 0.0, float("inf")])
    batch = GRPOBatch(prompt_ids=torch.tensor([5, 5, 7, 7]), rewards=rewards)
    with pytest.raises(BatchError, match=r"rewards contain NaN/inf at completions \[1, 3\] \(prompt ids \[5, 7\]\)"):
        Composition([]).run_advantage_stage(batch)


def test_an_empty_batch():
    batch = GRPOBatch(prompt_ids=torch.zeros(0, dtype=torch.long), rewards=torch.zeros(0))
    with pytest.raises(BatchError, match="the batch is empty"):
        Composition([]).run_advantage_stage(batch)


def test_a_group_of_one_under_the_default_estimator():
    with pytest.raises(PluginError) as error:
        Composition([]).run_advantage_stage(make_batch(group_sizes=(3, 1, 4, 2)))  # prompt id 11 has one completion
    message = str(error.value)
    assert "method 'grpo' (distribution grpo-plugins), hook 'compute_advantages'" in message
    assert "prompt id(s) [11] have 1" in message
    # an estimator built for single completions takes the slot, and groups of one are fine
    assert Composition([Estimator()]).run_advantage_stage(make_batch(group_sizes=(3, 1))).advantages.shape == (4,)


def test_all_tokens_masked():
    batch = make_batch(group_sizes=(2, 2))
    batch.completion_mask = torch.zeros_like(batch.completion_mask)
    with pytest.raises(BatchError, match="completion_mask masks every token"):
        Composition([]).run_advantage_stage(batch)

    class DropAll(Method):
        name = "drop_all"

        @hookimpl
        def mask_tokens(self, batch):
            return torch.zeros_like(batch.token_mask)

    with pytest.raises(BatchError, match=r"token masks of \['drop_all'\] drop every token"):
        Composition([DropAll()]).run_advantage_stage(make_batch(group_sizes=(2, 2)))


def test_budget_counts_must_sum_to_the_budget():
    round = PromptRound(num_prompts=4, budget=16, dataset_size=100, step=0, default_rollouts=4)
    with pytest.raises(PluginError, match=r"'allocator'.*'allocate_rollouts'.*summing to 12, expected the budget 16"):
        Composition([Allocator()]).run_allocate_rollouts(round, torch.arange(4))
    round = PromptRound(num_prompts=4, budget=12, dataset_size=100, step=0, default_rollouts=3)
    assert Composition([Allocator()]).run_allocate_rollouts(round, torch.arange(4)).tolist() == [3, 3, 3, 3]


def test_a_plugin_raising_is_reraised_naming_plugin_and_hook():
    with pytest.raises(PluginError) as error:
        Composition([Raising()]).run_advantage_stage(make_batch(group_sizes=(2, 2)))
    assert (error.value.method, error.value.hook) == ("raising", "shape_rewards")
    assert "method 'raising' (distribution <object from" in str(error.value)
    assert "hook 'shape_rewards': raised RuntimeError: reward model offline" in str(error.value)
    assert isinstance(error.value.__cause__, RuntimeError)


def test_plugin_errors_cross_process_boundaries():
    error = PluginError("raising", "shape_rewards", "grpo-plugin-x", "raised RuntimeError: boom")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.method, copy.hook, copy.distribution, str(copy)) == ("raising", "shape_rewards", "grpo-plugin-x", str(error))


def test_a_plugin_raising_a_core_error_is_still_named():
    class Strict(Method):
        name = "strict"

        @hookimpl
        def adjust_advantages(self, advantages):
            raise BatchError("needs reference log-probs")

    with pytest.raises(PluginError, match=r"'strict'.*'adjust_advantages': raised BatchError: needs reference"):
        Composition([Strict()]).run_advantage_stage(make_batch(group_sizes=(2, 2)))


# ---------------------------------------------------------------- tracing
def test_hook_calls_are_traced(monkeypatch, capsys):
    monkeypatch.setenv("GRPO_PLUGINS_TRACE", "1")
    composition = Composition([{"length_penalty": {"penalty_per_token": 0.1}}])
    composition.run_advantage_stage(make_batch(group_sizes=(2, 2)))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(
        "[grpo_plugins] shape_rewards <- length_penalty (grpo-plugin-length-penalty): tensor (4,) float32 in "
    )
    assert lines[1].startswith("[grpo_plugins] compute_advantages <- grpo (grpo-plugins): tensor (4,) float32 in ")
    monkeypatch.setenv("GRPO_PLUGINS_TRACE", "0")
    Composition(["length_penalty"]).run_advantage_stage(make_batch(group_sizes=(2, 2)))
    assert capsys.readouterr().err == ""
