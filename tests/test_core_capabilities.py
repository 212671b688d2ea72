"""Methods declare what they need, trainers what they provide; one comparison refuses a pairing that
cannot work, listing every problem with the method, the need and the trainer setting."""

import json

import pytest
import torch

from grpo_plugins import (
    Composition,
    CompositionError,
    Method,
    Needs,
    Range,
    TrainerCapabilities,
    capability_problems,
    check_capabilities,
    hookimpl,
)
from grpo_plugins.cli import main
from grpo_plugins.needs import BATCH_FIELDS, FEATURES, PROVIDED_FEATURES, class_needs
from grpo_plugins.testing import method_with as named


class Budgeted(Method):
    """Variable budgets, a loss term reading row_data, a hint column, and state."""

    name = "budgeted"

    @hookimpl
    def allocate_rollouts(self, round, prompt_ids):
        return torch.full(prompt_ids.shape, round.budget // prompt_ids.numel())

    @hookimpl
    def loss_terms(self, inputs):
        return {"reg": inputs.row_data["weight"][:, None] * inputs.log_probs}

    def needs(self):
        return Needs(loss_fields={"row_data"}, columns=["hint"], settings={"loss_aggregation": ("token_mean",)},
                     why={"row_data": "its per-row weights"})

    def state_dict(self):
        return {"seen": 1}


TRL_LIKE = TrainerCapabilities.standard("TRL GRPOTrainer", settings={"loss_aggregation": "token_mean", "on_policy": True},
                                        setting_names={"loss_aggregation": "loss_type"})


# ---------------------------------------------------------------- what a method needs
def test_needs_combine_the_hooks_requires_state_and_the_declaration():
    needs = Composition([Budgeted()]).needs()
    assert needs["budgeted"].features == {"variable_budgets", "token_loss", "method_state"}
    assert needs["budgeted"].loss_fields == {"row_data"} and needs["budgeted"].columns == {"hint"}
    assert needs["grpo"] == Needs()  # the built-in estimator is the trainer's own: it needs nothing
    reader = named("reader", observe=lambda: None)
    reader.requires = lambda: {"old_log_probs"}
    assert Composition([reader]).needs()["reader"].batch_fields == {"old_log_probs"}


def test_declared_batch_fields_are_required_fields():
    composition = Composition([named("turns", needs=Needs(batch_fields={"steps"}))])
    assert composition.required_fields() == {"steps"} and composition.requirers("steps") == ["turns"]


def test_a_standard_trainer_runs_every_provided_feature():
    composition = Composition([Budgeted()])
    caps = TRL_LIKE.with_columns(["prompt", "hint"])
    assert capability_problems(composition, caps) == []
    check_capabilities(composition, caps)  # no error
    assert composition.capability_problems(TrainerCapabilities.standard("a trainer")) == [  # restricted, unreported
        "method 'budgeted' needs setting 'loss_aggregation' in 'token_mean', which a trainer does not report"
    ]


# ---------------------------------------------------------------- every problem at once, each named
def test_every_problem_is_reported_at_once_naming_method_need_and_setting():
    caps = (
        TRL_LIKE.without("variable_budgets", because="vllm_mode='server' (use vllm_mode='colocate')")
        .without("row_data", because="the verl adapter does not carry row_data to the loss yet")
        .with_settings(loss_aggregation="sequence_mean")
        .with_columns(["prompt"])
    )
    composition = Composition([Budgeted(), named("turns", needs=Needs(batch_fields={"steps"}))])
    problems = capability_problems(composition, caps)
    assert len(problems) == 5, problems
    text = "\n".join(problems)
    assert ("method 'budgeted' needs trainer feature 'variable_budgets' (a different number of completions per "
            "prompt (hook allocate_rollouts)); TRL GRPOTrainer lacks it: vllm_mode='server' (use vllm_mode='colocate')") in text
    assert ("method 'budgeted' needs loss field 'row_data' (LossInputs.row_data in the loss stage) for its per-row "
            "weights; TRL GRPOTrainer lacks it: the verl adapter does not carry row_data to the loss yet") in text
    assert "method 'budgeted' needs dataset column 'hint', which the training dataset of TRL GRPOTrainer lacks (columns: prompt)" in text
    assert ("method 'budgeted' cannot run with TRL GRPOTrainer setting loss_type = 'sequence_mean' (loss_aggregation "
            "must be in 'token_mean')") in text
    assert ("method 'turns' needs batch field 'steps' (GRPOBatch.steps at the advantage stage); "
            "TRL GRPOTrainer lacks it: this adapter does not provide it yet") in text
    with pytest.raises(CompositionError, match=r"cannot run on TRL GRPOTrainer as configured \(5 problems\):\n- method 'budgeted'"):
        composition.check_capabilities(caps)


def test_a_feature_two_settings_take_away_names_both():
    caps = TRL_LIKE.without("variable_budgets", because="vllm_mode='server'").without(
        "variable_budgets", because="an IterableDataset")
    (problem,) = capability_problems(Composition([Budgeted()]), caps.with_columns(["hint"]))
    assert problem.endswith("TRL GRPOTrainer lacks it: vllm_mode='server'; an IterableDataset")


def test_unknown_columns_are_not_checked_and_settings_accept_ranges():
    composition = Composition([named("big_groups", needs=Needs(settings={"group_size": Range(4, None)}))])
    assert capability_problems(composition, TRL_LIKE.with_settings(group_size=8)) == []
    problems = capability_problems(composition, TRL_LIKE.with_settings(group_size=2))
    assert problems == ["method 'big_groups' cannot run with TRL GRPOTrainer setting group_size = 2 (group_size must be in [4, inf))"]
    assert capability_problems(composition, TRL_LIKE) == [
        "method 'big_groups' needs setting 'group_size' in [4, inf), which TRL GRPOTrainer does not report"
    ]
    columns = Composition([named("cols", needs=Needs(columns={"hint"}))])
    assert capability_problems(columns, TRL_LIKE) == []  # columns None: a stream, not checked


@pytest.mark.parametrize("hook, feature", [
    ("setup", "method_setup"), ("keep_rows", "batch_editing"), ("inject_rows", "row_injection"),
    ("loss_objectives", "loss_normalisers"), ("scale_update", "update_control"),
])
def test_a_designed_hook_is_refused_until_an_adapter_provides_it(hook, feature):
    composition = Composition([named("future", **{hook: lambda: None})])
    assert composition.needs()["future"].features == {feature}
    (problem,) = capability_problems(composition, TRL_LIKE)
    assert problem.startswith(f"method 'future' needs trainer feature '{feature}'")
    assert problem.endswith("TRL GRPOTrainer lacks it: this adapter does not provide it yet")
    assert capability_problems(composition, TRL_LIKE.with_features(feature)) == []


def test_standard_capabilities_leave_out_only_the_designed_surface():
    caps = TrainerCapabilities.standard("x")
    assert caps.features == PROVIDED_FEATURES and PROVIDED_FEATURES < set(FEATURES)
    assert {"steps", "old_entropies", "old_log_probs_at"}.isdisjoint(caps.batch_fields)
    assert caps.batch_fields == BATCH_FIELDS - {"old_entropies", "old_log_probs_at", "gradient_statistics",
                                                "probes", "update_preview", "steps"}
    assert "group_index" not in caps.loss_fields and {"row_data", "entropies", "step"} <= caps.loss_fields
    with pytest.raises(ValueError, match=r"unknown feature\(s\) or field\(s\) \['variable_budget'\]"):
        caps.without("variable_budget", because="typo")


# ---------------------------------------------------------------- relations between methods: at start-up
def test_needed_and_excluded_methods_are_start_up_errors_listing_all():
    lonely = named("lonely", needs=Needs(methods={"partner"}, why={"partner": "it reads partner's row data"}))
    singles = named("singles", needs=Needs(excludes={"grpo"}, why={"grpo": "groups of one have no group baseline"}))
    with pytest.raises(CompositionError) as error:
        Composition([lonely, singles])
    message = str(error.value)
    assert "method 'lonely' needs method 'partner' enabled in the same run (it reads partner's row data)" in message
    assert "method 'singles' cannot run together with method 'grpo': groups of one have no group baseline" in message
    estimator = named("estimator", compute_advantages=lambda batch: batch.rewards)
    assert Composition([singles, estimator]).names == ["singles", "estimator", "grpo"]  # grpo inactive: fine


def test_methods_implementing_an_excluded_hook_are_refused_at_start_up():
    replaces = named("replaces", needs=Needs(excludes_hooks={"mask_tokens", "gate_loss"},
                                             why={"mask_tokens": "its objective replaces the policy loss"}))
    weights = named("weights", mask_tokens=lambda batch: batch.token_mask)
    gates = named("gates", gate_loss=lambda inputs: torch.ones_like(inputs.mask))
    with pytest.raises(CompositionError) as error:
        Composition([replaces, weights, gates])
    message = str(error.value)
    assert ("method 'replaces' cannot run together with method 'weights', which implements hook 'mask_tokens': "
            "its objective replaces the policy loss") in message
    assert "method 'replaces' cannot run together with method 'gates', which implements hook 'gate_loss'" in message
    shaper = named("shaper", shape_rewards=lambda rewards: rewards)
    assert Composition([replaces, shaper]).names == ["replaces", "shaper", "grpo"]  # other hooks: fine
    own = named("own", mask_tokens=lambda batch: batch.token_mask, needs=Needs(excludes_hooks={"mask_tokens"}))
    assert Composition([own]).names == ["own", "grpo"]  # its own implementation does not count
    with pytest.raises(CompositionError, match=r"unknown hook 'mask_token'"):
        Composition([named("typo", needs=Needs(excludes_hooks={"mask_token"}))])


def test_bad_declarations_are_start_up_errors():
    with pytest.raises(CompositionError, match=r"method 'typo'.*declares unknown feature 'variable_budget'"):
        Composition([named("typo", needs=Needs(features={"variable_budget"}))])
    with pytest.raises(CompositionError, match=r"method 'typo'.*unknown loss field 'row_dat'"):
        Composition([named("typo", needs=Needs(loss_fields={"row_dat"}))])
    with pytest.raises(CompositionError, match=r"setting 'on_policy' must be restricted to a tuple of values or a Range"):
        Composition([named("typo", needs=Needs(settings={"on_policy": True}))])

    class Shadow(Method):
        name = "shadow"

        def __init__(self):
            super().__init__()
            self.needs = True

    with pytest.raises(CompositionError, match=r"'shadow'.*attribute 'needs' shadows Method.needs\(\)"):
        Composition([Shadow()])


def test_needs_accept_any_iterable_and_merge():
    merged = Needs(features=["token_loss"], columns="hint") | Needs(features={"after_step"}, settings={"on_policy": (True,)})
    assert merged.features == {"token_loss", "after_step"} and merged.columns == {"hint"}
    assert merged.as_dict() == {"features": ["after_step", "token_loss"], "columns": ["hint"], "settings": {"on_policy": "True"}}


# ---------------------------------------------------------------- the command line shows them
def test_list_json_and_show_print_each_methods_needs(capsys):
    assert main(["list", "--json"]) == 0
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert records["length_penalty"]["needs"] == {"features": ["advantage_hooks"]}
    assert records["grpo"]["needs"] == {}
    assert main(["show", "length_penalty"]) == 0
    assert "needs trainer features: advantage_hooks\n" in capsys.readouterr().out
    assert class_needs(Budgeted).lines() == [
        "loss fields: row_data", "trainer features: method_state, token_loss, variable_budgets",
        "dataset columns: hint", "settings: loss_aggregation in 'token_mean'",
    ]


def test_round_planners_need_the_prompt_id_column_to_be_the_row_index():
    from grpo_plugins.needs import prompt_id_problems

    planner = named("planner", sample_prompts=lambda round: torch.arange(round.num_prompts))
    composition = Composition([planner])
    assert prompt_id_problems(composition, None) == [] and prompt_id_problems(composition, []) == []
    assert prompt_id_problems(composition, [0, 1, 2]) == [] and prompt_id_problems(composition, torch.arange(3)) == []
    for column, shown in (([0, 1, 7, 3], "row 2 has prompt_id=7"), (["a", "b"], "row 0 has prompt_id='a'"),
                          ([True, False], "row 0 has prompt_id=True")):
        (problem,) = prompt_id_problems(composition, column)
        assert "method(s) ['planner'] plan the rounds by dataset row index" in problem and shown in problem
    assert prompt_id_problems(Composition([]), [5, 5, 9]) == []  # no planner: the column keys the groups freely
    reader = named("reader", sample_prompts=lambda round: torch.arange(round.num_prompts),
                   needs=Needs(columns={"prompt_id"}))
    assert prompt_id_problems(Composition([reader]), [5, 5, 9]) == []  # it reads the column itself
    allocator = named("allocator", allocate_rollouts=lambda round, prompt_ids: torch.full_like(prompt_ids, 2))
    (problem,) = prompt_id_problems(Composition([reader, allocator]), [5, 5, 9])
    assert "method(s) ['allocator'] plan" in problem


def test_a_method_that_ignores_the_chained_input_must_run_first():
    rebuilds = named("rebuilds", shape_rewards=lambda batch: batch.reward_components.sum(1),
                     needs=Needs(runs_first={"shape_rewards"}, why={"shape_rewards": "it rebuilds the reward"}))
    before = named("before", shape_rewards=lambda rewards: rewards + 1)
    with pytest.raises(CompositionError, match=r"method 'rebuilds' must run first among the methods implementing hook "
                                               r"'shape_rewards' \(it rebuilds the reward\), but method 'before' is "
                                               r"listed before it: list 'rebuilds' before 'before'"):
        Composition([before, rebuilds])
    assert Composition([rebuilds, before]).providers("shape_rewards") == ["rebuilds", "before"]  # after it: fine
