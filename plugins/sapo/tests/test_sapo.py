"""Tests of the SAPO plugin: the card's hand-computed numbers, edge cases, and what distinguishes it from
GRPO's clipped surrogate (torch and the core only; the equality with verl's and TRL's own SAPO losses is
in tests/integration/test_sapo_crosscheck.py)."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_plugins import Composition, CompositionError, ConfigError, LossInputs, Method, PluginError, hookimpl
from grpo_plugins.ops import masked_mean
from grpo_plugin_sapo import SAPO, sapo_gate_weight, sapo_token_loss


def seq_mean_token_mean(loss: torch.Tensor, mask: torch.Tensor, count_empty_rows: bool = False) -> torch.Tensor:
    """Mean over rows of each row's token mean. verl skips rows without tokens; TRL counts them (as 0)."""
    per_row = masked_mean(loss, mask, dim=-1)
    if count_empty_rows:
        return per_row.mean()
    has_tokens = (mask.sum(-1) > 0).to(loss.dtype)
    return (per_row * has_tokens).sum() / has_tokens.sum()


def loss_inputs(log_probs, old_log_probs, advantages, mask) -> LossInputs:
    return LossInputs(log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages, mask=mask)


def random_case(seed: int = 0, rows: int = 6, tokens: int = 7):
    """Off-policy inputs with uneven lengths, one row without tokens, and a zero advantage."""
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, tokens, generator=gen) * 4
    log_probs = old + torch.randn(rows, tokens, generator=gen) * 0.8
    log_probs[0, 0] = old[0, 0] + 30.0  # beyond the clamp
    log_probs[1, 1] = old[1, 1] - 30.0
    lengths = torch.tensor([7, 5, 3, 1, 0, 6])[:rows]
    mask = (torch.arange(tokens) < lengths[:, None]).float()
    adv = torch.tensor([1.3, -0.7, 0.0, 2.0, 0.5, -1.1])[:rows, None].expand(rows, tokens).contiguous()
    return log_probs, old, adv, mask


# ----------------------------------------------------------------------------- the card's numbers
def test_card_worked_example_loss_seq_mean_token_mean():
    """Two on-policy sequences, A=+1 with 3 tokens and A=-1 with 1 token: ((-2) + 2/1.05) / 2 = -0.0476."""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -9.0, -9.0]])
    log_probs = old.clone().requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    parts = Composition(["sapo"]).run_loss_stage(loss_inputs(log_probs, old, adv, mask), trainer_surrogate=None)
    expected_tokens = torch.tensor([[-2.0, -2.0, -2.0], [2.0 / 1.05, 0.0, 0.0]])
    torch.testing.assert_close(parts.policy.detach(), expected_tokens)
    loss = seq_mean_token_mean(parts.policy, mask)
    assert loss.item() == pytest.approx(-0.047619, abs=1e-6)
    assert loss.item() == pytest.approx(((-2) + 2 / 1.05) / 2, abs=1e-7)


@pytest.mark.parametrize(
    "ratio, advantage, weight",
    [
        (1.0, 1.0, 1.0),  # w(1) = 4 * 0.5 * 0.5
        (2.0, 1.0, 0.786448),  # 4 * sigmoid(1) * sigmoid(-1) = 4 * 0.731059 * 0.268941
        (0.5, 1.0, 0.940015),  # 4 * sigmoid(-0.5) * sigmoid(0.5) = 4 * 0.377541 * 0.622459
        (2.0, -1.0, 0.768110),  # tau_neg=1.05: 4 * sigmoid(1.05) * sigmoid(-1.05) = 4 * 0.740775 * 0.259225
    ],
)
def test_card_gradient_weights(ratio, advantage, weight):
    """d loss / d log pi = -w(r) * r * A (the card's gradient), checked through autograd."""
    log_probs = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss = sapo_token_loss(log_probs, torch.zeros(1, 1), torch.tensor([[advantage]]))
    loss.sum().backward()
    measured = -log_probs.grad.item() / (ratio * advantage)
    assert measured == pytest.approx(weight, abs=1e-5)
    tau = torch.tensor(1.0 if advantage > 0 else 1.05)
    assert sapo_gate_weight(torch.tensor(ratio), tau).item() == pytest.approx(weight, abs=1e-5)


def test_gate_value_on_policy_and_temperature_for_zero_advantage():
    """f(1) = 2/tau; A = 0 uses tau_neg (its loss and gradient are 0 either way)."""
    old = torch.zeros(1, 3)
    log_probs = old.clone().requires_grad_(True)
    adv = torch.tensor([[0.5, -0.5, 0.0]])
    loss = sapo_token_loss(log_probs, old, adv, tau_pos=2.0, tau_neg=4.0)
    torch.testing.assert_close(loss.detach(), torch.tensor([[-0.5 * 2 / 2.0, 0.5 * 2 / 4.0, 0.0]]))
    loss.sum().backward()
    assert log_probs.grad[0, 2].item() == 0.0


def test_trl_formula_lacks_the_clamp_difference():
    """TRL exponentiates the raw log-ratio; beyond |log r| = 20 the values agree (the gate saturates) but
    past exp overflow (log r > 88) TRL's gradient is NaN while the clamped one is 0."""
    old = torch.zeros(1, 2)
    raw = torch.tensor([[30.0, 100.0]], requires_grad=True)
    adv = torch.ones(1, 2)
    trl_style = -(torch.sigmoid(torch.exp(raw) - 1) * 4) * adv  # TRL's expression at tau = 1, no clamp
    trl_style.sum().backward()
    assert torch.isnan(raw.grad[0, 1])
    ours_lp = raw.detach().clone().requires_grad_(True)
    ours = sapo_token_loss(ours_lp, old, adv)
    torch.testing.assert_close(ours.detach(), trl_style.detach())
    ours.sum().backward()
    assert torch.equal(ours_lp.grad, torch.zeros(1, 2))


# ----------------------------------------------------------------------------- edge cases
def test_masked_tokens_and_rows_without_tokens():
    """Masked positions give 0 loss and no gradient even if their log-probs are NaN; a row without
    tokens is finite."""
    log_probs, old, adv, mask = random_case()
    log_probs = log_probs.clone()
    log_probs[mask == 0] = float("nan")
    log_probs.requires_grad_(True)
    parts = Composition(["sapo"]).run_loss_stage(loss_inputs(log_probs, old, adv, mask), trainer_surrogate=None)
    assert torch.isfinite(parts.policy).all()
    assert torch.equal(parts.policy.detach()[mask == 0], torch.zeros(int((mask == 0).sum())))
    seq_mean_token_mean(parts.policy, mask).backward()
    assert torch.isfinite(log_probs.grad).all() and torch.equal(log_probs.grad[mask == 0], torch.zeros(int((mask == 0).sum())))


def test_all_tokens_masked_gives_zero_loss():
    old = -torch.rand(2, 3)
    log_probs = (old + 0.3).requires_grad_(True)
    mask = torch.zeros(2, 3)
    parts = Composition(["sapo"]).run_loss_stage(loss_inputs(log_probs, old, torch.ones(2, 3), mask), None)
    assert torch.equal(parts.policy.detach(), torch.zeros(2, 3))


def test_nan_advantage_is_a_clear_error():
    old = torch.zeros(1, 2)
    adv = torch.tensor([[float("nan"), 1.0]])
    with pytest.raises(PluginError, match="sapo.*NaN"):
        Composition(["sapo"]).run_loss_stage(loss_inputs(old.clone().requires_grad_(True), old, adv, torch.ones(1, 2)), None)


def test_config_is_validated():
    with pytest.raises(ConfigError, match=r"must lie in \(0, inf\)"):
        Composition([{"sapo": {"tau_pos": 0.0}}])
    with pytest.raises(ConfigError, match="unknown config key"):
        Composition([{"sapo": {"tau": 1.0}}])


def test_conflicts_with_another_surrogate():
    class OtherSurrogate(Method):
        name = "other_surrogate"

        @hookimpl
        def policy_surrogate(self, inputs):
            return inputs.log_probs * 0

    with pytest.raises(CompositionError, match="single provider"):
        Composition(["sapo", OtherSurrogate()])


def test_metrics_report_gate_weights():
    composition = Composition(["sapo"])
    old = torch.zeros(1, 4)
    log_probs = torch.log(torch.tensor([[1.0, 1.0, 3.0, 1.0]])).requires_grad_(True)
    composition.run_loss_stage(loss_inputs(log_probs, old, torch.ones(1, 4), torch.tensor([[1.0, 1.0, 1.0, 0.0]])), None)
    metrics = composition.pop_metrics()
    w3 = 4 * (1 / (1 + math.exp(-2))) * (1 / (1 + math.exp(2)))  # 0.4200: below one half
    assert metrics["plugins/sapo/gate_weight_mean"] == pytest.approx((1 + 1 + w3) / 3, abs=1e-6)
    assert metrics["plugins/sapo/frac_gate_weight_below_half"] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- versus GRPO's clip
def test_differs_from_clipped_surrogate_off_policy_but_matches_on_policy():
    """Outside the clip range PPO/GRPO's gradient is exactly 0; SAPO's stays positive and smooth.
    On-policy (r = 1) both give d loss / d log pi = -A."""
    ratios = torch.tensor([[1.0, 1.5, 0.6]])
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    old = torch.zeros(1, 3)

    lp_clip = torch.log(ratios).requires_grad_(True)
    r = torch.exp(lp_clip)
    clipped = -torch.min(r * adv, torch.clamp(r, 0.8, 1.2) * adv)
    clipped.sum().backward()

    lp_sapo = torch.log(ratios).requires_grad_(True)
    sapo_token_loss(lp_sapo, old, adv).sum().backward()

    assert lp_clip.grad[0, 0].item() == pytest.approx(-1.0) and lp_sapo.grad[0, 0].item() == pytest.approx(-1.0)
    assert lp_clip.grad[0, 1].item() == 0.0 and lp_clip.grad[0, 2].item() == 0.0
    # r = 1.5, A = +1: -w r A with w = 4 sigmoid(0.5) sigmoid(-0.5) = 0.940015
    assert lp_sapo.grad[0, 1].item() == pytest.approx(-0.940015 * 1.5, abs=1e-5)
    # r = 0.6, A = -1, tau = 1.05: w = 4 sigmoid(-0.42) sigmoid(0.42) = 0.957165
    assert lp_sapo.grad[0, 2].item() == pytest.approx(0.957165 * 0.6, abs=1e-5)


def test_discovered_through_entry_point():
    composition = Composition(["sapo"])
    assert isinstance(composition.method("sapo"), SAPO)
    assert composition.providers("policy_surrogate") == ["sapo"]
    assert composition.has_loss_hooks
