"""HPT: the card's worked example by hand, the per-prompt switch, the injected demonstrations, the loss
weights (removed rollouts, renormalised RL rows, the SFT mean over demonstration tokens), edge cases
and the contrast with GRPO (torch and the core only; real TRL runs: tests/integration/test_hpt_trl.py)."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_plugins import Composition, GRPOBatch, LossInputs, LossTotals, Method, PluginError, RunContext, hookimpl
from grpo_plugins.injection import INJECTED_KEY, append_rows, kind_code, parse_rows
from grpo_plugin_hpt import BAND, RL, SFT, HPT, prompt_modes

LN2 = math.log(2.0)


def grouped_batch(correct=(0, 1, 8, 3), size=8, seed=0) -> GRPOBatch:
    """Prompts 0.. with ``size`` completions each, ``correct[q]`` of them with reward 1; lengths 1..4."""
    gen = torch.Generator().manual_seed(seed)
    prompt_ids = torch.arange(len(correct)).repeat_interleave(size)
    rewards = torch.cat([(torch.arange(size) < c).float() for c in correct])
    n = prompt_ids.numel()
    lengths = torch.randint(1, 5, (n,), generator=gen)
    mask = (torch.arange(4) < lengths[:, None]).float()
    return GRPOBatch(prompt_ids=prompt_ids, rewards=rewards, reward_components=rewards[:, None].clone(),
                     reward_names=("accuracy",), reward_weights=torch.ones(1),
                     completion_ids=torch.randint(5, 50, (n, 4), generator=gen) * mask.long(), completion_mask=mask,
                     rows=[{"solution": f"demonstration {int(p)}"} for p in prompt_ids])


def with_demonstrations(composition: Composition, batch: GRPOBatch, tokens=(3, 4)) -> GRPOBatch:
    """``batch`` with the rows ``inject_rows`` returns appended, as an adapter does (scored reward 1)."""
    rows = parse_rows(composition.run_inject_rows(batch), batch.prompt_ids, ["hpt"])
    return append_rows(batch, rows, [list(tokens)] * len(rows), torch.ones(len(rows), 1))


def loss_parts(composition: Composition, batch: GRPOBatch, log_probs: torch.Tensor):
    inputs = LossInputs(log_probs=log_probs, old_log_probs=log_probs.detach(),
                        advantages=batch.advantages[:, None].expand_as(log_probs), mask=batch.completion_mask,
                        row_data=dict(batch.row_data))
    return composition.run_loss_stage(inputs, lambda i: -i.advantages * i.ratio)


def totals(batch: GRPOBatch) -> LossTotals:
    return LossTotals(tokens=float(batch.completion_mask.sum()), sequences=batch.num_completions,
                      groups=batch.num_groups)


def test_card_worked_example():
    """c = [0, 1, 8, 3], gamma = 0 -> [sft, rl, rl, rl]; demo token probs [.5, .25] -> L_SFT = 1.5 ln 2 = 1.04;
    c_sft = .5 and L_GRPO = .3 -> L = .82."""
    assert prompt_modes(torch.tensor([0, 1, 8, 3]), gate=0, band=0).tolist() == [SFT, RL, RL, RL]
    composition = Composition([{"hpt": {"sft_coef": 0.5}}])
    batch = grouped_batch()
    assert composition.run_inject_rows(batch) == [
        {"prompt_id": 0, "completion": "demonstration 0", "kind": "demonstration"}]
    batch = composition.run_advantage_stage(with_demonstrations(composition, batch))
    log_probs = torch.full(batch.completion_mask.shape, -0.7)
    log_probs[-1, :2] = torch.tensor([0.5, 0.25]).log()
    parts = loss_parts(composition, batch, log_probs)
    sft = parts.objectives["hpt/sft"].reduce(batch.completion_mask, totals(batch))
    assert float(sft) == pytest.approx(0.5 * 1.5 * LN2, rel=1e-6)
    assert 1.5 * LN2 == pytest.approx(1.04, abs=5e-3)
    assert float(0.3 + sft) == pytest.approx(0.82, abs=5e-3)


def test_sft_prompts_lose_their_rollouts_and_rl_rows_are_renormalised():
    composition = Composition(["hpt"])
    batch = composition.run_advantage_stage(with_demonstrations(composition, grouped_batch()))
    weight, sft = batch.row_data["hpt_policy_weight"], batch.row_data["hpt_sft_weight"]
    demonstration = batch.row_data[INJECTED_KEY] == kind_code("demonstration")
    removed = (batch.prompt_ids == 0) & ~demonstration
    rl = ~removed & ~demonstration
    tokens = batch.completion_mask.sum(-1)
    assert weight[removed].eq(0).all() and weight[demonstration].eq(0).all()
    assert torch.allclose(weight[rl], tokens.sum() / tokens[rl].sum())
    # a token-mean policy loss over the whole batch with these weights is the mean over the RL rows' tokens
    per_token = torch.rand(batch.completion_mask.shape, generator=torch.Generator().manual_seed(1))
    weighted = (weight[:, None] * per_token * batch.completion_mask).sum() / batch.completion_mask.sum()
    assert float(weighted) == pytest.approx(float((per_token * batch.completion_mask)[rl].sum() / tokens[rl].sum()))
    assert torch.allclose(sft[demonstration], tokens.sum() / tokens[demonstration].sum()) and sft[~demonstration].eq(0).all()


def test_sequence_aggregation_renormalises_by_rows_and_renormalise_off_keeps_weight_one():
    composition = Composition(["hpt"])
    composition.method("hpt").context = RunContext(trainer="test", settings={"loss_aggregation": "sequence_mean"})
    batch = composition.run_advantage_stage(with_demonstrations(composition, grouped_batch()))
    weight = batch.row_data["hpt_policy_weight"]
    assert torch.allclose(weight[weight > 0], torch.tensor(33 / 24))  # 32 rollouts + 1 demonstration over 24 RL rows
    plain = Composition([{"hpt": {"renormalise": False}}])
    batch = plain.run_advantage_stage(with_demonstrations(plain, grouped_batch()))
    assert set(batch.row_data["hpt_policy_weight"].tolist()) == {0.0, 1.0}


def test_the_gate_zeroes_the_policy_loss_of_removed_rows_and_demonstrations():
    composition = Composition(["hpt"])
    batch = composition.run_advantage_stage(with_demonstrations(composition, grouped_batch()))
    parts = loss_parts(composition, batch, torch.full(batch.completion_mask.shape, -1.0, requires_grad=True))
    removed = batch.row_data["hpt_policy_weight"] == 0
    assert parts.policy[removed].eq(0).all() and parts.policy[~removed].ne(0).any()


def test_band_removes_rollouts_without_a_demonstration():
    composition = Composition([{"hpt": {"gate": 0, "band": 2}}])
    batch = grouped_batch(correct=(0, 1, 2, 3))
    assert prompt_modes(torch.tensor([0, 1, 2, 3]), 0, 2).tolist() == [SFT, BAND, BAND, RL]
    assert [row["prompt_id"] for row in composition.run_inject_rows(batch)] == [0]
    batch = composition.run_advantage_stage(with_demonstrations(composition, batch))
    weight = batch.row_data["hpt_policy_weight"]
    assert weight[batch.prompt_ids < 3].eq(0).all() and weight[batch.prompt_ids == 3].gt(0).all()
    assert composition.method("hpt").pop_metrics() == {"sft_prompts": 0.25, "band_prompts": 0.5, "rl_prompts": 0.25,
                                                       "demonstrations": 1.0}


def test_gate_counts_correct_rollouts_with_the_threshold():
    composition = Composition([{"hpt": {"gate": 2, "success_threshold": 0.5}}])
    batch = grouped_batch(correct=(2, 3))
    assert [row["prompt_id"] for row in composition.run_inject_rows(batch)] == [0]


def test_all_prompts_in_rl_mode_inject_nothing_and_the_sft_term_is_zero():
    composition = Composition(["hpt"])
    batch = grouped_batch(correct=(1, 8, 3))
    assert composition.run_inject_rows(batch) == []
    batch = composition.run_advantage_stage(batch)
    parts = loss_parts(composition, batch, torch.full(batch.completion_mask.shape, -1.0))
    assert float(parts.objectives["hpt/sft"].reduce(batch.completion_mask, totals(batch))) == 0.0


def test_nan_log_probs_in_padding_are_ignored_by_the_sft_term():
    composition = Composition(["hpt"])
    batch = composition.run_advantage_stage(with_demonstrations(composition, grouped_batch(), tokens=(3,)))
    log_probs = torch.full(batch.completion_mask.shape, -2.0)
    log_probs[batch.completion_mask == 0] = math.nan
    value = loss_parts(composition, batch, log_probs).objectives["hpt/sft"].reduce(batch.completion_mask, totals(batch))
    assert float(value) == pytest.approx(2.0)


def test_groups_of_one_in_sft_mode_become_pairs_with_their_demonstration():
    composition = Composition(["hpt"])
    batch = composition.run_advantage_stage(with_demonstrations(composition, grouped_batch(correct=(0, 0, 0), size=1)))
    assert batch.group_sizes.tolist() == [2, 2, 2] and batch.row_data["hpt_policy_weight"].eq(0).all()
    assert batch.row_data["hpt_sft_weight"][3:].gt(0).all()


def test_missing_demonstration_is_a_clear_error():
    batch = grouped_batch()
    batch.rows = [{"solution": ""} for _ in batch.rows]
    with pytest.raises(PluginError, match="hpt: prompt id 0 is in SFT mode.*column 'solution'"):
        Composition(["hpt"]).run_inject_rows(batch)


def test_nan_rewards_are_refused():
    batch = grouped_batch()
    batch.rewards[3] = math.nan
    with pytest.raises(Exception, match="NaN|finite"):
        Composition(["hpt"]).run_advantage_stage(batch)


def test_unlike_grpo_a_failed_prompt_still_gets_a_gradient():
    """GRPO gives a group whose rollouts all fail advantage 0 (no gradient); HPT trains its demonstration."""
    assert Composition([]).run_advantage_stage(grouped_batch(correct=(0, 0))).advantages.eq(0).all()  # GRPO alone
    composition = Composition(["hpt"])
    batch = composition.run_advantage_stage(with_demonstrations(composition, grouped_batch(correct=(0, 0))))
    log_probs = torch.full(batch.completion_mask.shape, -1.0, requires_grad=True)
    parts = loss_parts(composition, batch, log_probs)
    term = parts.objectives["hpt/sft"].reduce(batch.completion_mask, totals(batch))
    (parts.policy.sum() + term).backward()
    demonstration = batch.row_data[INJECTED_KEY] != 0
    assert log_probs.grad[demonstration].ne(0).any() and log_probs.grad[~demonstration].eq(0).all()


def test_config_domains():
    with pytest.raises(Exception, match="gate"):
        Composition([{"hpt": {"gate": -1}}])
    assert HPT().config.sft_coef == 1.0


class LowerTheLikelyCorrect(Method):
    """A shaper for the tests (like unlikeliness): correct rollouts of reward 1 drop to 0.9."""

    name = "lower_the_likely_correct"

    @hookimpl
    def shape_rewards(self, batch: GRPOBatch, rewards: torch.Tensor) -> torch.Tensor:
        return torch.where(rewards >= 1, rewards - 0.1, rewards)


def test_modes_come_from_the_trainer_rewards_before_shaping():
    """Rewards [1, 1, 1, 0] x 2 prompts, shaped to 0.9 on the correct ones: both prompts stay RL (3 correct
    each), nothing is injected and every generated row keeps policy weight 1 (it once turned all to SFT)."""
    composition = Composition([LowerTheLikelyCorrect(), "hpt"])
    batch = grouped_batch(correct=(3, 3), size=4)
    assert composition.run_inject_rows(batch) == []
    batch = composition.run_advantage_stage(batch)
    assert batch.rewards.max().item() == pytest.approx(0.9)
    assert batch.row_data["hpt_policy_weight"].tolist() == [1.0] * 8
    metrics = composition.pop_metrics()
    assert metrics["plugins/hpt/rl_prompts"] == 1.0 and metrics["plugins/hpt/sft_prompts"] == 0.0
