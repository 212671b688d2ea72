"""Every ``loss_type`` of the installed TRL, at both importance-sampling levels, with TRL's entropy bonus
(static and adaptive), off-policy sequence mask and KL: the adapter's own loss (run because a method
implements a loss hook) with a neutral gate gives TRL's loss and gradient bit for bit, and the
combinations it cannot honour are refused at start-up with the reason."""

from __future__ import annotations

import re

import pytest
import torch
from trl import GRPOConfig, GRPOTrainer

from grpo_plugins import LossInputs, Method, hookimpl
from grpo_plugins.errors import CompositionError
from grpo_plugins_trl.testing import GradientRecorder, digit_overlap_reward, tiny_grpo_run, trl_loss_on_batch
from grpo_plugins_trl.trainer import LOSS_AGGREGATION


def installed_loss_types() -> list[str]:
    """The loss types TRL's ``GRPOConfig.loss_type`` help lists as supported."""
    help_text = GRPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    supported = help_text.split("Supported values are", 1)[1].split(".", 1)[0]
    return re.findall(r"'(\w+)'", supported)


LOSS_TYPES = installed_loss_types()
LEVELS = ("token", "sequence")
EXTRAS = {
    "plain": {},
    "entropy_opsm_kl": dict(entropy_coef=0.05, off_policy_mask_threshold=0.02, beta=0.04, delta=1.3),
    "adaptive_entropy": dict(use_adaptive_entropy=True, entropy_target=5.0, top_entropy_quantile=0.6),
}


class UnitGate(Method):
    """Gates every token by 1: a neutral loss hook that makes the adapter run its own loss."""

    name = "unit_gate"

    @hookimpl
    def gate_loss(self, inputs: LossInputs) -> torch.Tensor:
        return torch.ones_like(inputs.log_probs)


class TokenClip(Method):
    """A per-token surrogate (PPO-clip written on LossInputs), the shape of NGRPO's or SAPO's."""

    name = "token_clip"

    @hookimpl
    def policy_surrogate(self, inputs: LossInputs) -> torch.Tensor:
        clipped = torch.clamp(inputs.ratio, 1 - inputs.clip_low, 1 + inputs.clip_high)
        return -torch.min(inputs.ratio * inputs.advantages, clipped * inputs.advantages)


def test_the_matrix_covers_every_installed_loss_type():
    assert len(LOSS_TYPES) >= 8 and {"grpo", "dapo", "cispo", "sapo", "luspo", "vespo"} <= set(LOSS_TYPES)
    assert set(LOSS_TYPES) <= set(LOSS_AGGREGATION), "a loss type of the installed TRL the adapter does not know"


def batch(seed: int = 0) -> dict:
    """Three groups of four completions (one of them constant-reward), ragged lengths, off-policy log-probs
    far enough from the current ones that clipping, CISPO's cap, VESPO's weights and the off-policy mask act."""
    g = torch.Generator().manual_seed(seed)
    n, t = 12, 6
    lengths = torch.tensor([6, 3, 5, 1, 6, 6, 2, 4, 5, 6, 3, 2])
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    log_probs = -torch.rand(n, t, generator=g) * 2 - 0.05
    return dict(
        prompt_ids=torch.arange(3).repeat_interleave(4),
        rewards=torch.tensor([1.0, 0.0, 0.5, 0.2, 1.0, 1.0, 1.0, 1.0, 0.0, 0.3, 0.9, 0.1]),
        completion_ids=torch.randint(4, 14, (n, t), generator=g),
        completion_mask=mask,
        log_probs=log_probs,
        old_log_probs=log_probs + 0.4 * torch.randn(n, t, generator=g),
        ref_log_probs=log_probs + 0.2 * torch.randn(n, t, generator=g),
        entropies=torch.rand(n, t, generator=g) * 3,
    )


@pytest.mark.parametrize("extras", list(EXTRAS), ids=list(EXTRAS))
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_neutral_gate_gives_trls_loss_and_gradient_bit_for_bit(loss_type, level, extras):
    settings = dict(loss_type=loss_type, importance_sampling_level=level, **EXTRAS[extras])
    data = batch()
    trl = trl_loss_on_batch(None, **data, **settings)  # no loss hook: TRL's own _compute_loss
    gated = trl_loss_on_batch([UnitGate()], **data, **settings)
    assert torch.isfinite(trl.loss) and trl.loss != 0 and trl.grad.abs().sum() > 0  # the comparison has signal
    assert torch.equal(gated.loss, trl.loss), (gated.loss.item(), trl.loss.item())
    assert torch.equal(gated.grad, trl.grad)


def test_the_gate_is_really_applied_in_every_configuration():
    """A gate of 0.5 halves the policy part: the neutral gate's equality is not a bypass."""

    class HalfGate(UnitGate):
        name = "half_gate"

        @hookimpl
        def gate_loss(self, inputs: LossInputs) -> torch.Tensor:
            return torch.full_like(inputs.log_probs, 0.5)

    data = batch()
    for loss_type in LOSS_TYPES:
        for level in LEVELS:
            settings = dict(loss_type=loss_type, importance_sampling_level=level)
            trl = trl_loss_on_batch(None, **data, **settings)
            half = trl_loss_on_batch([HalfGate()], **data, **settings)
            torch.testing.assert_close(half.loss, trl.loss / 2, rtol=1e-6, atol=1e-8)
            torch.testing.assert_close(half.grad, trl.grad / 2, rtol=1e-6, atol=1e-8)


SETTINGS = dict(max_steps=4, num_iterations=2, gradient_accumulation_steps=2, reward_funcs=digit_overlap_reward)


def full_run(plugins, trainer_cls=None, **overrides):
    recorder = GradientRecorder()
    trainer = tiny_grpo_run(plugins, trainer_cls=trainer_cls, callbacks=[recorder], **{**SETTINGS, **overrides})
    logs = [row for row in trainer.state.log_history if "loss" in row and "train_runtime" not in row]
    return logs, recorder.gradients, [p.detach().clone() for p in trainer.model.parameters()]


@pytest.mark.parametrize(
    "settings",
    [
        dict(loss_type="cispo", epsilon_high=1.05, off_policy_mask_threshold=0.001),
        dict(loss_type="luspo", importance_sampling_level="sequence", entropy_coef=0.02),
        dict(loss_type="vespo", use_adaptive_entropy=True, entropy_target=10.0, entropy_coef_delta=0.01),
        dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.05, off_policy_mask_threshold=0.001),
    ],
    ids=["cispo_opsm", "luspo_sequence_entropy", "vespo_adaptive", "gspo_kl_opsm"],
)
def test_training_with_a_neutral_gate_equals_grpo_trainer(settings):
    """Whole runs (old log-probs, gradient accumulation, the adaptive controller's state across steps):
    losses, every logged metric, gradients and parameters are GRPOTrainer's."""
    (v_logs, v_grads, v_params), (p_logs, p_grads, p_params) = (
        full_run(None, trainer_cls=GRPOTrainer, **settings), full_run([UnitGate()], **settings)
    )
    assert len(v_logs) == len(p_logs) == SETTINGS["max_steps"]
    for v_row, p_row in zip(v_logs, p_logs):
        for key, value in v_row.items():
            if key != "step_time":
                assert p_row[key] == value, f"step {v_row['step']}: {key} {p_row[key]!r} != {value!r}"
    for v_step, p_step in zip(v_grads, p_grads, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(v_step, p_step, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(v_params, p_params, strict=True))
    assert any(row["loss"] != 0 for row in v_logs)


@pytest.mark.parametrize(
    "settings,reason",
    [
        (dict(importance_sampling_level="sequence"), "importance_sampling_level='sequence'"),
        (dict(loss_type="cispo"), "loss_type='cispo'"),
        (dict(loss_type="vespo"), "loss_type='vespo'"),
    ],
)
def test_a_per_token_surrogate_is_refused_where_it_would_drop_trls_objective(settings, reason):
    with pytest.raises(CompositionError, match=re.escape(reason)) as error:
        tiny_grpo_run([TokenClip()], train=False, **settings)
    assert "token_clip" in str(error.value) and "policy_surrogate" in str(error.value)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "luspo", "sapo"])
def test_a_per_token_surrogate_runs_with_ratio_losses_at_token_level(loss_type):
    """TokenClip is TRL's PPO-clip: with a clipped loss type it gives TRL's numbers (to rounding)."""
    data = batch()
    surrogate = trl_loss_on_batch([TokenClip()], **data, loss_type=loss_type)
    trl = trl_loss_on_batch(None, **data, loss_type=loss_type)
    if loss_type == "sapo":  # the method replaces SAPO's soft gate by clipping: a different, finite loss
        assert torch.isfinite(surrogate.loss) and surrogate.loss != trl.loss
    else:
        torch.testing.assert_close(surrogate.loss, trl.loss, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(surrogate.grad, trl.grad, rtol=1e-6, atol=1e-7)
