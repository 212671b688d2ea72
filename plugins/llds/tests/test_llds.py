"""LLDS: the card's worked example by hand, the action gate, edge cases and gradients (real TRL runs:
tests/integration/test_round1_trl_runs.py)."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_plugins import Composition, ConfigError, LossInputs, PluginError
from grpo_plugin_llds import action_index, displacement_gate, llds_penalty


def token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The paper's aggregation: sum over trainable tokens / number of trainable tokens of the micro-batch."""
    return (values * mask).sum() / mask.sum()


def card_inputs() -> LossInputs:
    """Row 0 (A > 0): [.5,.5 | obs | .5,.5] -> [.4,.6 | obs | .6,.6]; row 1 (A < 0): 6 unchanged tokens."""
    old = torch.full((2, 6), 0.5).log()
    new = torch.tensor([[0.4, 0.6, 0.5, 0.6, 0.6, 0.5], [0.5] * 6]).log().requires_grad_()
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0, 0.0], [1.0] * 6])  # position 2 is tool output, 5 padding
    adv = torch.tensor([[1.0] * 6, [-1.0] * 6])
    return LossInputs(log_probs=new, old_log_probs=old, advantages=adv, mask=mask)


def loss_term(methods, inputs):
    """The per-token LLDS term, from either form: aggregated like the policy loss (the default,
    ``loss_terms``) or with its own token normaliser (``normaliser: token``, ``loss_objectives``)."""
    parts = Composition(methods).run_loss_stage(inputs, lambda i: torch.zeros_like(i.log_probs))
    return parts.terms["llds/llds"] if "llds/llds" in parts.terms else parts.objectives["llds/llds"].values


def test_both_normaliser_forms_give_the_same_per_token_term():
    policy = loss_term(["llds"], card_inputs())
    token = loss_term([{"llds": {"normaliser": "token"}}], card_inputs())
    assert torch.equal(policy, token) and bool((policy != 0).any())


def test_card_worked_example_action_gate():
    inputs = card_inputs()
    term = loss_term(["llds"], inputs)
    # action 1 net change log(.5/.4) + log(.5/.6) = 0.0408 > 0 -> on; only token 1 fell: log(1.25) = 0.2231
    # action 2 went up -> off; the negative response adds 6 tokens to the denominator: 10 tokens
    assert term[0].tolist() == pytest.approx([0.2 * math.log(1.25), 0, 0, 0, 0, 0], abs=1e-7)
    assert token_mean(term, inputs.mask).item() == pytest.approx(0.2 * 0.22314 / 10, abs=1e-6)
    assert token_mean(term, inputs.mask).item() == pytest.approx(0.00446, abs=1e-5)


def test_card_worked_example_response_gate():
    # whole response: 0.0408 - 2 * log(1.2) = 0.0408 - 0.3646 < 0 -> no penalty at all
    assert torch.all(loss_term([{"llds": {"level": "response"}}], card_inputs()) == 0)
    inputs = card_inputs()
    inputs.log_probs = torch.tensor([[0.4, 0.6, 0.5, 0.45, 0.5, 0.5], [0.5] * 6]).log().requires_grad_()
    # now the response lost likelihood in total (0.0408 + log(.5/.45) + 0 > 0): every fallen token is penalised
    term = loss_term([{"llds": {"level": "response"}}], inputs)
    assert term[0].tolist() == pytest.approx([0.2 * math.log(1.25), 0, 0, 0.2 * math.log(0.5 / 0.45), 0, 0], abs=1e-7)


def test_action_index_hand_example():
    trainable = torch.tensor([[1, 1, 0, 1, 0, 1, 1], [1, 0, 0, 1, 1, 1, 0], [0] * 7]).bool()
    assert action_index(trainable).tolist() == [
        [1, 1, 0, 2, 0, 3, 3],
        [4, 0, 0, 5, 5, 5, 0],
        [0] * 7,
    ]


def test_gate_per_action_sums_only_its_own_tokens():
    d = torch.tensor([[0.3, -0.1, 0.0, -0.5, 0.1, 0.0, 0.2]])
    preserving = torch.tensor([[1, 1, 0, 1, 1, 0, 1]]).bool()
    # actions: {0,1} sum 0.2 -> on; {3,4} sum -0.4 -> off; {6} 0.2 -> on
    assert displacement_gate(d, preserving).int().tolist() == [[1, 1, 0, 0, 0, 0, 1]]
    # response: 0.2 - 0.4 + 0.2 = 0 -> not > 0 -> off
    assert not displacement_gate(d, preserving, "response").any()


def test_gradient_pushes_fallen_tokens_back_up_and_gate_has_no_gradient():
    inputs = card_inputs()
    token_mean(loss_term(["llds"], inputs), inputs.mask).backward()
    grad = inputs.log_probs.grad
    # d/dlogp of 0.2 * (logp_old - logp) / 10 on the one penalised token; nothing elsewhere (the gate is constant)
    expected = torch.zeros(2, 6)
    expected[0, 0] = -0.02
    assert torch.allclose(grad, expected, atol=1e-7)


def test_zero_advantage_is_preserved_negative_is_not():
    inputs = card_inputs()
    inputs.advantages = torch.tensor([[0.0] * 6, [-1.0] * 6])
    assert loss_term(["llds"], inputs)[0, 0].item() == pytest.approx(0.2 * math.log(1.25), abs=1e-7)
    inputs.advantages = torch.tensor([[-0.1] * 6, [-1.0] * 6])
    assert torch.all(loss_term(["llds"], inputs) == 0)


def test_all_tokens_masked_and_uneven_rows():
    inputs = card_inputs()
    inputs.mask = torch.zeros(2, 6)
    assert torch.all(loss_term(["llds"], inputs) == 0)
    # a group of one / a single row micro-batch
    one = card_inputs()
    single = LossInputs(log_probs=one.log_probs[:1], old_log_probs=one.old_log_probs[:1],
                        advantages=one.advantages[:1], mask=one.mask[:1])
    term = loss_term(["llds"], single)
    assert token_mean(term, single.mask).item() == pytest.approx(0.2 * math.log(1.25) / 4, abs=1e-7)


def test_nan_rewards_are_rejected_before_the_loss():
    from grpo_plugins import BatchError
    from grpo_plugins.testing import make_batch

    batch = make_batch(rewards=[0.0, 1.0, float("nan"), 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    with pytest.raises(BatchError, match="NaN"):
        Composition(["llds"]).run_advantage_stage(batch)


def test_answer_span_weight():
    inputs = card_inputs()
    inputs.row_data = {"answer_span": torch.tensor([[1, 0, 0, 0, 0, 0], [0] * 6])}
    term = loss_term([{"llds": {"answer_coef": 0.05}}], inputs)
    assert term[0, 0].item() == pytest.approx(0.05 * math.log(1.25), abs=1e-7)
    with pytest.raises(Exception, match=r"llds: answer_coef=0.05 needs row_data\['answer_span'\] \(2, 6\).*missing"
                                         r".*Another enabled method must attach it"):
        loss_term([{"llds": {"answer_coef": 0.05}}], card_inputs())
    inputs.row_data = {"answer_span": torch.ones(2, 5)}
    with pytest.raises(Exception, match=r"answer_span.*of shape \(2, 5\)"):
        loss_term([{"llds": {"answer_coef": 0.05}}], inputs)


def test_answer_coef_declares_the_row_data_it_reads():
    from grpo_plugins import TrainerCapabilities

    assert Composition(["llds"]).needs()["llds"].loss_fields == frozenset()
    lacking = TrainerCapabilities.standard("a trainer").without("row_data", because="no row data in the loss")
    problems = Composition([{"llds": {"answer_coef": 0.05}}]).capability_problems(lacking)
    assert len(problems) == 1 and "'llds' needs loss field 'row_data'" in problems[0] and "answer_span" in problems[0]


def test_distinct_from_grpo_and_metrics():
    comp = Composition(["llds"])
    assert Composition([]).has_loss_hooks is False and comp.has_loss_hooks
    comp.run_loss_stage(card_inputs(), lambda i: torch.zeros_like(i.log_probs))
    assert comp.pop_metrics()["plugins/llds/frac_gated_actions"] == pytest.approx(0.5)
    inputs = card_inputs()
    penalty, gate = llds_penalty(inputs.log_probs, inputs.old_log_probs, inputs.advantages, inputs.mask)
    assert not gate.requires_grad and penalty.requires_grad


def test_bad_config_and_stateless(tmp_path):
    """LLDS keeps no state: after loss calls the state is empty, the checkpoint holds nothing, a restored
    composition gives the bit-identical penalty, and state offered to it is refused."""
    with pytest.raises(ConfigError):
        Composition([{"llds": {"level": "turn"}}])
    comp = Composition(["llds"])
    first = comp.run_loss_stage(card_inputs(), lambda i: torch.zeros_like(i.log_probs)).terms["llds/llds"]
    comp.save(tmp_path / "s.pt")
    assert comp.state_dict() == {} and torch.load(tmp_path / "s.pt", weights_only=True) == {}
    restored = Composition(["llds"])
    restored.load(tmp_path / "s.pt")
    again = restored.run_loss_stage(card_inputs(), lambda i: torch.zeros_like(i.log_probs)).terms["llds/llds"]
    assert torch.equal(first, again) and bool((first != 0).any())
    with pytest.raises(PluginError, match="llds.*stateless"):
        restored.load_state_dict({"llds": {"step": 1}})
