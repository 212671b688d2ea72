"""One test per hook, run through Composition's ``run_*`` calls, with the combine semantics of each
hook: single provider, chain in config order, multiplied masks and gates, added loss terms, observe all."""

from pathlib import Path

import pytest
import torch

from grpo_plugins import (
    Composition,
    CompositionError,
    LossInputs,
    LossTerm,
    Method,
    PluginError,
    PromptRound,
    RunContext,
    hookimpl,
)
from grpo_plugins.hookspecs import COMBINE, HOOK_NAMES
from grpo_plugins.testing import make_batch
from grpo_plugins.testing import method_with as named

DOCS = Path(__file__).resolve().parents[1] / "docs"
ROUND = PromptRound(num_prompts=4, budget=10, dataset_size=50, step=3, default_rollouts=2)


def loss_inputs(b=3, t=4, seed=0) -> LossInputs:
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=gen)
    return LossInputs(
        log_probs=(old + 0.1 * torch.randn(b, t, generator=gen)).requires_grad_(),
        old_log_probs=old,
        advantages=torch.randn(b, 1, generator=gen).expand(b, t),
        mask=torch.ones(b, t),
    )


def trainer_surrogate(inputs: LossInputs) -> torch.Tensor:
    return -inputs.ratio * inputs.advantages


# ---------------------------------------------------------------- start (designed)
def test_hook_setup():
    seen = []
    first = named("first", setup=lambda context: seen.append(("first", context.seed)))
    second = named("second", setup=lambda: seen.append(("second",)))
    composition = Composition([second, first])
    context = RunContext(trainer="test trainer", seed=17, settings={"group_size": 4})
    composition.run_setup(context)
    assert seen == [("second",), ("first", 17)]  # every implementation, config order
    assert composition.method("first").context is context and composition.method("grpo").context is context
    # the per-step generator: the same for (seed, step, method) in any process, different across steps and methods
    draw = lambda method, step: torch.rand(3, generator=composition.method(method).step_generator(step))
    assert torch.equal(draw("first", 5), draw("first", 5))
    assert not torch.equal(draw("first", 5), draw("first", 6)) and not torch.equal(draw("first", 5), draw("second", 5))
    with pytest.raises(RuntimeError, match=r"'fresh' asked for a step generator.*no run seed"):
        named("fresh").step_generator(0)


# ---------------------------------------------------------------- round planning
def test_hook_sample_prompts():
    seen = {}

    def sample(round, generator):
        seen["round"] = round
        return torch.randint(0, round.dataset_size, (round.num_prompts,), generator=generator)

    assert Composition([]).run_sample_prompts(ROUND, torch.Generator()) is None  # trainer's own sampler
    composition = Composition([named("sampler", sample_prompts=sample)])
    draws = [composition.run_sample_prompts(ROUND, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert draws[0].dtype == torch.long and draws[0].shape == (4,)
    assert torch.equal(draws[0], draws[1])  # the adapter's seeded generator makes ranks agree
    assert seen["round"] is ROUND
    out_of_range = Composition([named("far", sample_prompts=lambda round: torch.full((4,), 50))])
    with pytest.raises(PluginError, match=r"'far'.*'sample_prompts'.*above 49"):
        out_of_range.run_sample_prompts(ROUND, torch.Generator())


def test_hook_allocate_rollouts():
    composition = Composition([named("alloc", allocate_rollouts=lambda round, prompt_ids: torch.tensor([4.0, 0.0, 3.0, 3.0]))])
    counts = composition.run_allocate_rollouts(ROUND, torch.arange(4))
    assert counts.dtype == torch.long and counts.tolist() == [4, 0, 3, 3]
    assert Composition([]).run_allocate_rollouts(ROUND, torch.arange(4)) is None  # budget // P each
    fractional = Composition([named("half", allocate_rollouts=lambda prompt_ids: torch.full((4,), 2.5))])
    with pytest.raises(PluginError, match=r"'half'.*'allocate_rollouts'.*integers"):
        fractional.run_allocate_rollouts(ROUND, torch.arange(4))


def test_hook_augment_prompts():
    add_a = named("a", augment_prompts=lambda prompts: [p + "+a" for p in prompts])
    add_b = named("b", augment_prompts=lambda prompts, rows: [p + "+b" + str(r["x"]) for p, r in zip(prompts, rows)])
    args = (ROUND, torch.arange(2), ["p", "q"], [{"x": 1}, {"x": 2}])
    assert Composition([add_a, add_b]).run_augment_prompts(*args) == ["p+a+b1", "q+a+b2"]
    assert Composition([add_b, add_a]).run_augment_prompts(*args) == ["p+b1+a", "q+b2+a"]  # chain = config order
    dropping = Composition([named("drop", augment_prompts=lambda prompts: prompts[:1])])
    with pytest.raises(PluginError, match=r"'drop'.*'augment_prompts'.*list of 2 prompts"):
        dropping.run_augment_prompts(*args)


# ---------------------------------------------------------------- batch editing (designed)
def test_hook_keep_rows():
    batch = make_batch(group_sizes=(2, 2), rewards=[1.0, 1.0, 0.0, 1.0], shuffle=False)
    assert Composition([]).run_keep_rows(batch) is None  # nothing edits the batch
    varied = named("varied", keep_rows=lambda batch: batch.group_sizes[batch.group_index] > 0)
    not_first = named("not_first", keep_rows=lambda batch: torch.arange(batch.num_completions) > 0)
    kept = Composition([varied, not_first]).run_keep_rows(batch)
    assert kept.dtype == torch.bool and kept.tolist() == [False, True, True, True]  # keep-masks multiply (and)
    as_float = Composition([named("as_float", keep_rows=lambda batch: torch.ones(4))])
    with pytest.raises(PluginError, match=r"'as_float'.*'keep_rows'.*must return a bool tensor, got dtype torch.float32"):
        as_float.run_keep_rows(batch)


def test_hook_inject_rows():
    batch = make_batch(group_sizes=(2, 2))
    demo = named("demo", inject_rows=lambda batch: [{"prompt_id": 10, "completion": "42", "reward": 1.0}])
    more = named("more", inject_rows=lambda: [{"prompt_id": 11, "completion": [5, 6]}])
    rows = Composition([demo, more]).run_inject_rows(batch)
    assert rows == [{"prompt_id": 10, "completion": "42", "reward": 1.0}, {"prompt_id": 11, "completion": [5, 6]}]
    assert Composition([]).run_inject_rows(batch) == []
    bad = Composition([named("bad", inject_rows=lambda: [{"completion": "x"}])])
    with pytest.raises(PluginError, match=r"'bad'.*'inject_rows'.*row 0 must be a dict with 'prompt_id' and 'completion'"):
        bad.run_inject_rows(batch)


# ---------------------------------------------------------------- advantage stage
def test_hook_shape_rewards():
    double = lambda: named("double", shape_rewards=lambda rewards: rewards * 2)
    plus_one = lambda: named("plus_one", shape_rewards=lambda batch, rewards: rewards + 1)
    rewards = torch.tensor([0.0, 1.0, 3.0, 2.0])
    for order, expected in (([double, plus_one], [1.0, 3.0, 7.0, 5.0]), ([plus_one, double], [2.0, 4.0, 8.0, 6.0])):
        batch = make_batch(group_sizes=(2, 2), rewards=rewards, shuffle=False)
        Composition([make() for make in order]).run_advantage_stage(batch)
        torch.testing.assert_close(batch.rewards, torch.tensor(expected))
        torch.testing.assert_close(batch.unshaped_rewards, rewards)  # the trainer's rewards are kept
    # the default estimator sees the shaped rewards: group (1, 3) -> mean 2, std sqrt(2)
    torch.testing.assert_close(batch.advantages[:2], torch.tensor([-0.707106, 0.707106]), atol=1e-5, rtol=0)
    wrong = Composition([named("scalar", shape_rewards=lambda rewards: rewards.sum())])
    with pytest.raises(PluginError, match=r"'scalar'.*'shape_rewards'.*shape \(\).*\(4,\)"):
        wrong.run_advantage_stage(make_batch(group_sizes=(2, 2)))


def test_hook_compute_advantages():
    # default grpo, hand-computed: group 10 = (1, 0, 0) mean 1/3, unbiased std 0.57735
    batch = make_batch(group_sizes=(3, 2), rewards=[1.0, 0.0, 0.0, 2.0, 4.0], shuffle=False)
    composition = Composition([])
    assert composition.providers("compute_advantages") == ["grpo"]
    composition.run_advantage_stage(batch)
    expected = torch.tensor([1.154700, -0.577350, -0.577350, -0.707107, 0.707107])
    torch.testing.assert_close(batch.advantages, expected, atol=1e-5, rtol=0)
    # a user provider replaces the default (a single-provider hook); (N, T) output is accepted
    per_token = named("per_token", compute_advantages=lambda batch: batch.rewards[:, None] * batch.token_mask)
    composition = Composition([per_token])
    assert composition.providers("compute_advantages") == ["per_token"]
    batch = composition.run_advantage_stage(make_batch(group_sizes=(3, 2), num_tokens=6))
    assert batch.advantages.shape == (5, 6)
    with pytest.raises(CompositionError, match=r"'per_token'.*'other'.*both implement hook 'compute_advantages'"):
        Composition([per_token, named("other", compute_advantages=lambda batch: batch.rewards)])
    bad = Composition([named("nan_adv", compute_advantages=lambda batch: batch.rewards / 0 * 0)])
    with pytest.raises(PluginError, match=r"'nan_adv'.*'compute_advantages'.*NaN/inf"):
        bad.run_advantage_stage(make_batch(group_sizes=(3, 2)))


def test_hook_adjust_advantages():
    clip = named("clip", adjust_advantages=lambda advantages: advantages.clamp(-0.5, 0.5))
    scale = named("scale", adjust_advantages=lambda batch, advantages: advantages * 3)
    rewards = [1.0, 0.0, 0.0, 2.0, 4.0]  # grpo: (1.1547, -0.57735, -0.57735, -0.70711, 0.70711)
    batch = Composition([clip, scale]).run_advantage_stage(make_batch(group_sizes=(3, 2), rewards=rewards, shuffle=False))
    torch.testing.assert_close(batch.advantages, torch.tensor([1.5, -1.5, -1.5, -1.5, 1.5]))
    batch = Composition([scale, clip]).run_advantage_stage(make_batch(group_sizes=(3, 2), rewards=rewards, shuffle=False))
    torch.testing.assert_close(batch.advantages, torch.tensor([0.5, -0.5, -0.5, -0.5, 0.5]))
    # an adjuster may turn (N,) into (N, T)
    spread = named("spread", adjust_advantages=lambda batch, advantages: advantages[:, None] * batch.token_mask)
    assert Composition([spread]).run_advantage_stage(make_batch(group_sizes=(3, 2))).advantages.shape == (5, 6)


def test_hook_mask_tokens():
    half = named("half", mask_tokens=lambda batch: torch.full_like(batch.token_mask, 0.5))
    skip_first = named("skip_first", mask_tokens=lambda batch: torch.ones_like(batch.token_mask).index_fill(1, torch.tensor([0]), 0.0))
    batch = make_batch(group_sizes=(3, 2), num_tokens=4)
    composition = Composition([half, skip_first])
    assert composition.providers("mask_tokens") == ["half", "skip_first"]
    composition.run_advantage_stage(batch)
    expected = torch.tensor([[0.0, 0.5, 0.5, 0.5]]).expand(5, 4)
    torch.testing.assert_close(batch.token_weights, expected)  # masks multiply
    assert Composition([]).run_advantage_stage(make_batch(group_sizes=(3, 2))).token_weights is None
    negative = Composition([named("negative", mask_tokens=lambda batch: -batch.token_mask)])
    with pytest.raises(PluginError, match=r"'negative'.*'mask_tokens'.*below 0"):
        negative.run_advantage_stage(make_batch(group_sizes=(3, 2)))


# ---------------------------------------------------------------- loss stage
def test_hook_policy_surrogate():
    inputs = loss_inputs()
    plain = Composition([])
    assert not plain.has_loss_hooks
    torch.testing.assert_close(plain.run_loss_stage(inputs, trainer_surrogate).policy, trainer_surrogate(inputs))
    linear = named("linear", policy_surrogate=lambda inputs: -inputs.log_probs * inputs.advantages)
    composition = Composition([linear])
    assert composition.has_loss_hooks and composition.providers("policy_surrogate") == ["linear"]
    parts = composition.run_loss_stage(inputs, lambda _: pytest.fail("the trainer's surrogate must not run"))
    torch.testing.assert_close(parts.policy, -inputs.log_probs * inputs.advantages)
    parts.policy.sum().backward()
    torch.testing.assert_close(inputs.log_probs.grad, -inputs.advantages)
    with pytest.raises(CompositionError, match=r"'linear'.*'again'.*'policy_surrogate'"):
        Composition([linear, named("again", policy_surrogate=lambda inputs: inputs.log_probs)])


def test_hook_gate_loss():
    inputs = loss_inputs(b=2, t=3)
    per_sequence = named("seq", gate_loss=lambda inputs: torch.tensor([[2.0], [0.0]]))
    per_token = named("tok", gate_loss=lambda inputs: torch.tensor([[1.0, 0.5, 0.0]]).expand(2, 3))
    parts = Composition([per_sequence, per_token]).run_loss_stage(inputs, trainer_surrogate)
    gate = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # gates multiply
    torch.testing.assert_close(parts.policy, trainer_surrogate(inputs) * gate)
    wrong = Composition([named("wrong", gate_loss=lambda inputs: torch.ones(3))])
    with pytest.raises(PluginError, match=r"'wrong'.*'gate_loss'.*\(2, 3\) or \(2, 1\)"):
        wrong.run_loss_stage(inputs, trainer_surrogate)


def test_hook_loss_terms():
    inputs = loss_inputs(b=2, t=3)
    kl = named("kl", loss_terms=lambda inputs: {"kl": inputs.log_ratio ** 2})
    both = named("reg", loss_terms=lambda inputs: {"entropy": torch.ones(2, 3), "kl": torch.zeros(2, 3)})
    parts = Composition([kl, both]).run_loss_stage(inputs, trainer_surrogate)
    assert list(parts.terms) == ["kl/kl", "reg/entropy", "reg/kl"]  # named per method, never merged away
    torch.testing.assert_close(parts.terms["kl/kl"], inputs.log_ratio ** 2)
    torch.testing.assert_close(parts.policy, trainer_surrogate(inputs))  # terms are added by the adapter
    bad = Composition([named("bad", loss_terms=lambda inputs: {"x": torch.ones(2)})])
    with pytest.raises(PluginError, match=r"'bad'.*'loss_terms'.*term 'x'"):
        bad.run_loss_stage(inputs, trainer_surrogate)
    not_dict = Composition([named("not_dict", loss_terms=lambda inputs: torch.ones(2, 3))])
    with pytest.raises(PluginError, match=r"'not_dict'.*'loss_terms'.*dict"):
        not_dict.run_loss_stage(inputs, trainer_surrogate)


def test_hook_loss_objectives():
    inputs = loss_inputs(b=2, t=3)
    per_group = named("pairs", loss_objectives=lambda inputs: {"rank": LossTerm(inputs.log_probs.sum(-1), "group")})
    parts = Composition([per_group]).run_loss_stage(inputs, trainer_surrogate)
    assert list(parts.objectives) == ["pairs/rank"] and parts.objectives["pairs/rank"].normaliser == "group"
    assert parts.terms == {}  # objectives never mix with the trainer-normalised terms
    assert Composition([]).run_loss_stage(inputs, trainer_surrogate).objectives == {}
    plain = Composition([named("plain", loss_objectives=lambda inputs: {"x": torch.ones(2, 3)})])
    with pytest.raises(PluginError, match=r"'plain'.*'loss_objectives'.*term 'x': must be a grpo_plugins.LossTerm"):
        plain.run_loss_stage(inputs, trainer_surrogate)
    with pytest.raises(ValueError, match="normaliser must be one of"):
        LossTerm(torch.ones(2), "batch")


# ---------------------------------------------------------------- optimiser step and after
def test_hook_scale_update():
    batch = make_batch(group_sizes=(2, 2))
    assert Composition([]).run_scale_update(batch, step=3) is None
    half = named("half", scale_update=lambda step: torch.tensor(0.5))
    snr = named("snr", scale_update=lambda batch, step: torch.tensor(float(step)))
    torch.testing.assert_close(Composition([half, snr]).run_scale_update(batch, step=3), torch.tensor(1.5))
    negative = Composition([named("negative", scale_update=lambda: torch.tensor(-1.0))])
    with pytest.raises(PluginError, match=r"'negative'.*'scale_update'.*below 0"):
        negative.run_scale_update(batch, step=3)
    per_row = Composition([named("per_row", scale_update=lambda: torch.ones(2))])
    with pytest.raises(PluginError, match=r"'per_row'.*'scale_update'.*shape \(2,\), expected \(\)"):
        per_row.run_scale_update(batch, step=3)


def test_hook_observe():
    calls = []
    first = named("first", observe=lambda batch, step: calls.append(("first", step, batch.advantages is not None)))
    second = named("second", observe=lambda step: calls.append(("second", step)))
    composition = Composition([second, first])
    batch = composition.run_advantage_stage(make_batch(group_sizes=(2, 2)))
    composition.run_observe(batch, step=5)
    assert calls == [("second", 5), ("first", 5, True)]  # every implementation, config order


# ---------------------------------------------------------------- composition-wide behaviour
def test_row_data_and_metrics_reach_the_adapter():
    class Attach(Method):
        name = "attach"

        @hookimpl
        def adjust_advantages(self, batch, advantages):
            batch.row_data["group_size"] = batch.group_sizes[batch.group_index].float()
            self.log_metric("seen", batch.num_completions)
            return advantages

    composition = Composition([Attach()])
    batch = composition.run_advantage_stage(make_batch(group_sizes=(3, 2), shuffle=False))
    assert batch.row_data["group_size"].tolist() == [3.0, 3.0, 3.0, 2.0, 2.0]
    metrics = composition.pop_metrics()
    assert metrics["plugins/attach/seen"] == 5.0 and "plugins/grpo/frac_zero_advantage" in metrics
    assert composition.pop_metrics() == {}


def test_disabled_hooks_leave_the_slot():
    class Switchable(Method):
        name = "switchable"

        def disabled_hooks(self):
            return {"compute_advantages"}

        @hookimpl
        def compute_advantages(self, batch):
            return batch.rewards

    composition = Composition([Switchable()])
    assert composition.providers("compute_advantages") == ["grpo"]
    assert "switchable (<object from" in composition.describe()


def test_describe_lists_methods_in_order():
    composition = Composition([named("z", observe=lambda step: None), named("a", shape_rewards=lambda rewards: rewards)])
    assert composition.names == ["z", "a", "grpo"]
    lines = composition.describe().splitlines()
    assert lines[0].startswith("z (<object from ") and lines[0].endswith(": observe")
    assert lines[1].endswith(": shape_rewards")
    assert lines[2] == "grpo (grpo-plugins 0.1.0): compute_advantages"


def test_every_hook_has_a_test_and_a_docs_entry():
    """Meta-test: a hook added to the spec fails here until it has a test above and a docs section."""
    hooks_doc = (DOCS / "hooks.md").read_text()
    lifecycle = (DOCS / "lifecycle.md").read_text()
    for hook in HOOK_NAMES:
        assert callable(globals().get(f"test_hook_{hook}")), f"hook '{hook}' has no test_hook_{hook} in {__file__}"
        assert f"## `{hook}`" in hooks_doc, f"hook '{hook}' has no section in docs/hooks.md"
        assert f"`{hook}`" in lifecycle, f"hook '{hook}' is not placed in docs/lifecycle.md"
    assert set(COMBINE.values()) <= {"single", "chain", "multiply", "add", "all"}
    assert "(run by TRL only)" in hooks_doc and "not run on verl yet" in lifecycle
