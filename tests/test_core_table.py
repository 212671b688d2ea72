"""The hook table: one row per hook, one dispatcher per combine mode, output contracts with dtypes
(an int64 reward or advantage would truncate silently), pluggy ordering options refused, and the
run's configured order as the only order."""

import inspect

import pytest
import torch

from grpo_plugins import Composition, CompositionError, LossInputs, Method, PluginError, PromptRound, hookimpl, hookspecs
from grpo_plugins.build import collect_impls, enable, in_config_order, parse_specs, register
from grpo_plugins.composition import methods_from_config
from grpo_plugins.dispatch import DISPATCHERS
from grpo_plugins.hooktable import COMBINE_MODES, HOOKS, STAGES, TABLE
from grpo_plugins.needs import FEATURES, PROVIDED_FEATURES
from grpo_plugins.testing import make_batch

ROUND = PromptRound(num_prompts=4, budget=8, dataset_size=50, step=0, default_rollouts=2)


def named(name: str, **hooks) -> Method:
    attrs = {"name": name, **{hook: staticmethod(hookimpl(function)) for hook, function in hooks.items()}}
    return type(f"Method_{name}", (Method,), attrs)()


def loss_inputs(b=2, t=3) -> LossInputs:
    old = -torch.rand(b, t, generator=torch.Generator().manual_seed(0))
    return LossInputs(log_probs=old.clone().requires_grad_(), old_log_probs=old, advantages=torch.ones(b, t), mask=torch.ones(b, t))


# ---------------------------------------------------------------- the table itself
def test_every_spec_has_one_row_and_every_row_one_spec():
    specs = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(fn, "grpo_plugins_spec")]
    assert sorted(specs) == sorted(HOOKS) and len(TABLE) == len(HOOKS)
    assert hookspecs.HOOK_NAMES == tuple(h.name for h in TABLE)
    assert hookspecs.COMBINE == {h.name: h.combine for h in TABLE}


def test_every_row_is_complete():
    for hook in TABLE:
        assert hook.stage in STAGES and hook.combine in COMBINE_MODES and hook.combine in DISPATCHERS, hook.name
        assert hook.feature in FEATURES and hook.effect, hook.name
        assert (hook.feature in PROVIDED_FEATURES) == hook.provided, hook.name  # a designed hook is refused by default
        assert (hook.combine == "chain") == (hook.chained is not None), hook.name
        if hook.chained:
            assert hook.chained in inspect.signature(getattr(hookspecs, hook.name)).parameters
        if hook.output.kind == "tensor":
            assert hook.output.shapes and hook.output.dtype in ("float", "count", "bool"), hook.name
    assert set(DISPATCHERS) == set(COMBINE_MODES)


# ---------------------------------------------------------------- dtypes (an int64 output would truncate)
@pytest.mark.parametrize("hook, make", [
    ("shape_rewards", lambda batch: batch.rewards.long()),
    ("compute_advantages", lambda batch: batch.rewards.long()),
    ("adjust_advantages", lambda batch: batch.rewards.long()),
    ("mask_tokens", lambda batch: batch.completion_mask.bool()),
])
def test_a_float_hook_refuses_an_integer_or_bool_output(hook, make):
    composition = Composition([named("ints", **{hook: make})])
    with pytest.raises(PluginError, match=rf"'ints'.*'{hook}'.*must return a floating-point tensor, got dtype torch\.(int64|bool)"):
        composition.run_advantage_stage(make_batch(group_sizes=(2, 2), rewards=[1.0, 2.0, 3.0, 5.0]))


@pytest.mark.parametrize("hook", ["policy_surrogate", "gate_loss"])
def test_a_float_loss_hook_refuses_an_integer_output(hook):
    composition = Composition([named("ints", **{hook: lambda inputs: torch.ones(2, 3, dtype=torch.long)})])
    with pytest.raises(PluginError, match=rf"'ints'.*'{hook}'.*floating-point tensor, got dtype torch.int64"):
        composition.run_loss_stage(loss_inputs(), lambda inputs: -inputs.ratio * inputs.advantages)
    terms = Composition([named("ints", loss_terms=lambda inputs: {"kl": torch.ones(2, 3, dtype=torch.long)})])
    with pytest.raises(PluginError, match=r"'loss_terms'.*term 'kl': must return a floating-point tensor"):
        terms.run_loss_stage(loss_inputs(), lambda inputs: -inputs.ratio * inputs.advantages)


def test_float_outputs_of_any_precision_pass_unchanged():
    doubled = named("doubled", shape_rewards=lambda rewards: rewards.double() * 2)
    batch = Composition([doubled]).run_advantage_stage(make_batch(group_sizes=(2, 2), rewards=[0.0, 1.0, 2.0, 4.0]))
    assert batch.rewards.dtype == torch.float64 and batch.rewards.tolist() == [0.0, 2.0, 4.0, 8.0]


def test_counts_are_whole_numbers_of_any_integer_or_float_dtype():
    for dtype in (torch.int32, torch.int64, torch.float32):
        counts = Composition([named("alloc", allocate_rollouts=lambda: torch.tensor([2, 2, 4, 0], dtype=dtype))])
        out = counts.run_allocate_rollouts(ROUND, torch.arange(4))
        assert out.dtype == torch.long and out.tolist() == [2, 2, 4, 0]
    as_bool = Composition([named("alloc", allocate_rollouts=lambda: torch.tensor([True, True, False, False]))])
    with pytest.raises(PluginError, match="must return integers, got a bool tensor"):
        as_bool.run_allocate_rollouts(ROUND, torch.arange(4))
    as_bool = Composition([named("sampler", sample_prompts=lambda: torch.tensor([True, False]))])
    with pytest.raises(PluginError, match="must return integers, got a bool tensor"):
        as_bool.run_sample_prompts(ROUND, torch.Generator())


def test_non_finite_and_out_of_bound_outputs_are_refused_per_the_table():
    inf_rewards = Composition([named("inf", shape_rewards=lambda rewards: rewards / 0)])
    with pytest.raises(PluginError, match=r"'inf'.*'shape_rewards'.*NaN/inf"):
        inf_rewards.run_advantage_stage(make_batch(group_sizes=(2, 2), rewards=[1.0, 2.0, 3.0, 4.0]))
    negative_gate = Composition([named("neg", gate_loss=lambda inputs: -torch.ones(2, 1))])
    with pytest.raises(PluginError, match=r"'neg'.*'gate_loss'.*below 0"):
        negative_gate.run_loss_stage(loss_inputs(), lambda inputs: inputs.log_probs)


def test_without_completion_tokens_only_per_sequence_advantages_are_accepted():
    batch = make_batch(group_sizes=(2, 2), completion_mask=None, completion_ids=None, old_log_probs=None, ref_log_probs=None)
    per_token = Composition([named("tok", compute_advantages=lambda batch: torch.zeros(4, 6))])
    with pytest.raises(PluginError, match=r"'tok'.*shape \(4, 6\), expected \(4,\)$"):
        per_token.run_advantage_stage(batch)


# ---------------------------------------------------------------- order: the run's list, nothing else
@pytest.mark.parametrize("option", ["tryfirst", "trylast", "hookwrapper", "optionalhook"])
def test_pluggy_ordering_options_are_refused_at_start_up(option):
    class Eager(Method):
        name = "eager"

        @hookimpl(**{option: True})
        def shape_rewards(self, rewards):
            return rewards

    with pytest.raises(CompositionError, match=rf"method 'eager'.*hook 'shape_rewards' uses pluggy's {option}=True.*configured order"):
        Composition([Eager()])


def test_hooks_run_in_the_configured_order_whatever_the_registration_order():
    """pluggy keeps registration order; the core sorts every hook's implementations by the run's list.
    Register in one order, collect in another: the collected order must be the run's."""
    calls = []
    a = named("a", observe=lambda: calls.append("a"))
    b = named("b", observe=lambda: calls.append("b"))
    c = named("c", observe=lambda: calls.append("c"))
    registered = enable([a, b, c], {})
    manager = register(registered)
    configured = [registered[2], registered[0], registered[1], registered[3]]  # c, a, b, grpo
    impls = collect_impls(manager, configured)
    assert [entry.name for entry, _ in impls["observe"]] == ["c", "a", "b"]
    found = manager.hook.observe.get_hookimpls()
    assert [impl.plugin_name for impl in in_config_order(found[::-1], registered)] == ["a", "b", "c"]


# ---------------------------------------------------------------- one name instead of a list
def test_a_single_name_is_a_list_of_one():
    assert parse_specs("spo") == [("spo", {})]
    assert Composition("length_penalty").names == ["length_penalty", "grpo"]
    assert methods_from_config({"grpo_plugins": "ngrpo"}) == ["ngrpo"]
    assert Composition(methods_from_config({"grpo_plugins": "length_penalty"})).providers("shape_rewards") == ["length_penalty"]
    assert Composition(named("solo", observe=lambda: None)).names == ["solo", "grpo"]


@pytest.mark.parametrize("value, message", [
    (3, r"the method list must be a list of names.*got int 3"),
    ({"length_penalty": {}}, r"the method list must be a list, got a mapping.*one list item"),
])
def test_other_wrong_list_types_say_what_is_wrong(value, message):
    with pytest.raises(CompositionError, match=message):
        Composition(value)


@pytest.mark.parametrize("value, message", [
    (3, r"'grpo_plugins' must be a list of methods \(names or \{name: \{config\}\}\), got int 3"),
    ({"ngrpo": {}}, r"'grpo_plugins' must be a list of methods, got a mapping.*'- name: \{config\}'"),
])
def test_a_config_with_a_wrong_grpo_plugins_type_says_what_is_wrong(value, message):
    with pytest.raises(CompositionError, match=message):
        methods_from_config({"grpo_plugins": value})


# ---------------------------------------------------------------- designed parts the core already implements
def test_loss_term_normalisers_by_hand_with_nan_padding_ignored():
    from grpo_plugins import LossTerm, LossTotals

    values = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("nan"), float("nan")]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    totals = LossTotals(tokens=3, sequences=2, groups=1)
    same_group = torch.tensor([2, 2])
    reduce = lambda normaliser: LossTerm(values, normaliser).reduce(mask, totals, same_group).item()
    assert reduce("token") == pytest.approx(7 / 3)  # (1 + 2 + 4) / 3 tokens
    assert reduce("sequence") == pytest.approx(2.75)  # (1.5 + 4) / 2 sequences
    assert reduce("group") == pytest.approx(2.75)  # one group of two: its mean of sequence means
    assert reduce("sum") == pytest.approx(7.0)
    # micro-batches add up to the step's value (the totals are the step's)
    halves = [LossTerm(values[i:i + 1], "token").reduce(mask[i:i + 1], totals).item() for i in (0, 1)]
    assert sum(halves) == pytest.approx(7 / 3)
    per_sequence = LossTerm(torch.tensor([3.0, 5.0]), "group")
    assert per_sequence.reduce(mask, LossTotals(3, 2, 2), torch.tensor([1, 2])).item() == pytest.approx((3 / 1 + 5 / 2) / 2)
    with pytest.raises(ValueError, match="'token' LossTerm needs \\(B, T\\)"):
        LossTerm(torch.tensor([3.0, 5.0]), "token").reduce(mask, totals)
