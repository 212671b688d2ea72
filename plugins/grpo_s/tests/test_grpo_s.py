"""Tests of GRPO-S: the card's worked example by hand in both forms, the scale's parts, degenerate
batches, clear errors on missing or inconsistent columns, and what distinguishes it from GRPO."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_plugins import BatchError, Composition, CompositionError, ConfigError, GRPOBatch, Method, PluginError, hookimpl
from grpo_plugins.config import undeclared_domains
from grpo_plugins.ops import group_normalize
from grpo_plugins.testing import make_batch
from grpo_plugin_grpo_s import GRPOS, GRPOSConfig, data_hardness, difficulty_scale, first_of_group, model_responsiveness

MEAN_CENTRED = {"grpo": {"scale": "none"}}


class MeanCentred(Method):
    """A mean-centred advantage estimator for the tests (Dr. GRPO's A = r - group mean), not the built-in grpo."""

    name = "mean_centred"

    @hookimpl
    def compute_advantages(self, batch: GRPOBatch) -> torch.Tensor:
        return group_normalize(batch.rewards, batch.group_index, batch.num_groups, scale_by_std=False)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def row_batch(prompt_ids, rewards, rows, num_tokens=3) -> GRPOBatch:
    """A batch with the given dataset rows; log-prob padding holds NaN, which must not matter."""
    n = len(prompt_ids)
    mask = (torch.arange(num_tokens) < torch.tensor([1 + i % num_tokens for i in range(n)])[:, None]).float()
    return make_batch(
        group_sizes=(1,), num_tokens=num_tokens,
        prompt_ids=torch.tensor(prompt_ids), rewards=torch.tensor(rewards, dtype=torch.float32),
        reward_components=None, completion_mask=mask, completion_ids=torch.ones(n, num_tokens, dtype=torch.long),
        old_log_probs=torch.where(mask > 0, torch.tensor(-1.0), torch.tensor(float("nan"))), ref_log_probs=None,
        rows=list(rows),
    )


def prompt_row(embedding, reference, reference_reward, **extra) -> dict:
    return {"prompt_embedding": list(embedding), "reference_embedding": list(reference), "reference_reward": reference_reward, **extra}


ORTHOGONAL = prompt_row([1.0, 0.0], [0.0, 1.0], 0.5)  # h_data = 1; with rewards [0, 1] the gap is 0


# ----------------------------------------------------------------------------- the card's example
def test_card_worked_example_reward_form():
    """e(x) orthogonal to e(x_ref): h_data = 1; gap 0: h_model = .5; s = 2.5. Rewards [0, 1] -> [0, 2.5];
    mean-centred advantages [-1.25, +1.25] instead of [-.5, +.5]."""
    batch = row_batch([1, 1], [0.0, 1.0], [ORTHOGONAL] * 2)
    composition = Composition([MeanCentred(), {"grpo_s": {"apply_to": "reward"}}])
    composition.run_advantage_stage(batch)
    torch.testing.assert_close(batch.rewards, torch.tensor([0.0, 2.5]))
    torch.testing.assert_close(batch.advantages, torch.tensor([-1.25, 1.25]))
    metrics = composition.pop_metrics()
    assert metrics["plugins/grpo_s/mean_scale"] == pytest.approx(2.5)
    assert metrics["plugins/grpo_s/mean_data_hardness"] == pytest.approx(1.0)
    assert metrics["plugins/grpo_s/mean_responsiveness"] == pytest.approx(0.5)


def test_card_worked_example_advantage_form_is_identical_under_mean_centring():
    batch = row_batch([1, 1], [0.0, 1.0], [ORTHOGONAL] * 2)
    Composition([MEAN_CENTRED, "grpo_s"]).run_advantage_stage(batch)
    torch.testing.assert_close(batch.rewards, torch.tensor([0.0, 1.0]))  # the reward is untouched
    torch.testing.assert_close(batch.advantages, torch.tensor([-1.25, 1.25]))


def test_under_std_normalisation_only_the_advantage_form_keeps_the_scale():
    """GRPO's z-score of [0, 1] is +-1/sqrt(2). The reward form's factor would cancel: it is refused at start-up
    with the built-in grpo (under any scale) and with gdpo; the advantage form gives 2.5x."""
    z = 1 / math.sqrt(2)
    for estimator in ([], [MEAN_CENTRED]):
        with pytest.raises(CompositionError, match=r"'grpo_s' cannot run together with method 'grpo'.*cancels "
                                                   r"exactly.*set apply_to='advantage'"):
            Composition([*estimator, {"grpo_s": {"apply_to": "reward"}}])
    assert "gdpo" in GRPOS(GRPOSConfig(apply_to="reward")).needs().excludes
    assert GRPOS().needs().excludes == frozenset()
    by_advantage = Composition(["grpo_s"]).run_advantage_stage(row_batch([1, 1], [0.0, 1.0], [ORTHOGONAL] * 2))
    torch.testing.assert_close(by_advantage.advantages, torch.tensor([-2.5 * z, 2.5 * z]), rtol=1e-5, atol=1e-5)


def test_scale_parts_by_hand():
    """Two prompts, shuffled, of sizes 3 and 2. Prompt 1: cos 0.6 -> h = 0.4; r_ref 1.0, mean reward 1/3 ->
    h_model = sigmoid(2 * 2/3) with k = 2. Prompt 2: identical embeddings -> h = 0; r_ref 0, mean 0.5."""
    rows_1 = prompt_row([3.0, 4.0], [5.0, 0.0], 1.0)  # cos = 15 / 25 = 0.6
    rows_2 = prompt_row([1.0, 1.0], [2.0, 2.0], 0.0)  # cos = 1
    prompt_ids = [1, 2, 1, 1, 2]
    rewards = [1.0, 1.0, 0.0, 0.0, 0.0]
    batch = row_batch(prompt_ids, rewards, [rows_1 if p == 1 else rows_2 for p in prompt_ids])
    composition = Composition([{"grpo_s": {"hardness_weight": 0.5, "responsiveness_weight": 2.0, "gap_sharpness": 2.0}}])
    scale = composition.method("grpo_s").scale(batch, batch.rewards)
    s1 = 1 + 0.5 * 0.4 + 2.0 * sigmoid(2 * (1.0 - 1 / 3))
    s2 = 1 + 0.0 + 2.0 * sigmoid(2 * (0.0 - 0.5))
    torch.testing.assert_close(scale, torch.tensor([s1, s2, s1, s1, s2]))


def test_pure_functions():
    e = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    r = torch.tensor([[0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(data_hardness(e, r), torch.tensor([1.0, 1.0, 0.0]))  # cos 0, -1 (clipped), 1
    index = torch.tensor([0, 1, 0])
    got = model_responsiveness(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, 2.0, 1.0]), index, 2, sharpness=3.0)
    torch.testing.assert_close(got, torch.tensor([sigmoid(1.5), sigmoid(-6.0), sigmoid(1.5)]))
    torch.testing.assert_close(difficulty_scale(torch.tensor([0.5]), torch.tensor([0.25]), 2.0, 4.0), torch.tensor([3.0]))
    assert first_of_group(torch.tensor([1, 0, 1, 2, 0]), 3).tolist() == [1, 0, 3]


class CountingRow(dict):
    """A dataset row that counts the reads of its values."""

    reads = 0

    def __getitem__(self, key):
        CountingRow.reads += 1
        return super().__getitem__(key)


def test_columns_are_read_once_per_prompt_not_once_per_completion():
    """Two prompts of 3 and 2 completions, three columns: 2 x 3 = 6 reads (not 5 x 3 = 15)."""
    rows_1, rows_2 = CountingRow(ORTHOGONAL), CountingRow(prompt_row([1.0, 1.0], [2.0, 2.0], 0.0))
    prompt_ids = [1, 2, 1, 1, 2]
    batch = row_batch(prompt_ids, [1.0, 1.0, 0.0, 0.0, 0.0], [rows_1 if p == 1 else rows_2 for p in prompt_ids])
    CountingRow.reads = 0
    scale = Composition(["grpo_s"]).method("grpo_s").scale(batch, batch.rewards)
    assert CountingRow.reads == 6
    s1, s2 = 1 + 1 + sigmoid(0.5 - 1 / 3), 1 + 0 + sigmoid(0.0 - 0.5)  # h = 1 and 0; r_ref 0.5 and 0
    torch.testing.assert_close(scale, torch.tensor([s1, s2, s1, s1, s2]))


def test_precomputed_hardness_column():
    rows = [{"hardness": 0.2, "reference_reward": 0.5}] * 2
    composition = Composition([{"grpo_s": {"data_hardness": "column"}}])
    scale = composition.method("grpo_s").scale(row_batch([4, 4], [0.0, 1.0], rows), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(scale, torch.tensor([1.7, 1.7]))


def test_switching_a_part_off_needs_no_column():
    rows = [{"reference_reward": 0.5}] * 2  # no embeddings: hardness_weight 0 does not read them
    composition = Composition([{"grpo_s": {"hardness_weight": 0.0}}])
    torch.testing.assert_close(composition.method("grpo_s").scale(row_batch([4, 4], [0.0, 1.0], rows), torch.tensor([0.0, 1.0])), torch.tensor([1.5, 1.5]))


# ----------------------------------------------------------------------------- property vs GRPO
def test_property_harder_prompt_gets_a_larger_signal_than_under_grpo():
    """Two prompts with the same rewards [0, 1]: GRPO gives both the same advantages; GRPO-S gives the prompt
    far from its demonstration (and lagging its reward) the larger ones."""
    easy = prompt_row([1.0, 0.0], [1.0, 0.0], 0.0)  # h = 0, policy ahead of the demonstration
    hard = prompt_row([1.0, 0.0], [0.0, 1.0], 1.0)  # h = 1, policy behind
    prompt_ids, rewards = [1, 1, 2, 2], [0.0, 1.0, 0.0, 1.0]
    rows = [easy, easy, hard, hard]
    plain = Composition([]).run_advantage_stage(row_batch(prompt_ids, rewards, rows))
    assert plain.advantages[1] == plain.advantages[3]
    scaled = Composition(["grpo_s"]).run_advantage_stage(row_batch(prompt_ids, rewards, rows))
    ratio = scaled.advantages / plain.advantages
    torch.testing.assert_close(ratio, torch.tensor([1 + sigmoid(-0.5)] * 2 + [2 + sigmoid(0.5)] * 2))


# ----------------------------------------------------------------------------- degenerate batches
def test_constant_group_stays_exactly_zero_in_both_forms():
    rows = [ORTHOGONAL] * 5
    for apply_to in ("advantage", "reward"):
        batch = Composition([MeanCentred(), {"grpo_s": {"apply_to": apply_to}}]).run_advantage_stage(
            row_batch([1, 1, 1, 2, 2], [0.3, 0.3, 0.3, 0.0, 1.0], rows)
        )
        assert batch.advantages[:3].tolist() == [0.0, 0.0, 0.0]
        assert batch.advantages[3] < 0 < batch.advantages[4]


def test_group_of_one_and_per_token_advantages():
    """A group of one is its own mean (gap r_ref - r); (N, T) advantages are scaled row by row."""
    batch = row_batch([1, 2, 2], [1.0, 0.0, 1.0], [ORTHOGONAL] * 3)
    method = Composition(["grpo_s"]).method("grpo_s")
    advantages = torch.tensor([[1.0, 2.0, 3.0], [-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
    got = method.adjust_advantages(batch=batch, advantages=advantages)
    s1, s2 = 2 + sigmoid(0.5 - 1.0), 2 + sigmoid(0.0)
    torch.testing.assert_close(got, advantages * torch.tensor([[s1], [s2], [s2]]))


def test_nan_reward_is_a_clear_error():
    with pytest.raises(BatchError, match="NaN"):
        Composition(["grpo_s"]).run_advantage_stage(row_batch([1, 1], [0.0, float("nan")], [ORTHOGONAL] * 2))


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"reference_embedding": [0.0, 1.0], "reference_reward": 0.5}] * 2, r"embedding_column='prompt_embedding' is not a column"),
        ([prompt_row([1.0, 0.0], [0.0, 1.0], float("nan"))] * 2, "reference_reward_column='reference_reward' holds NaN"),
        ([prompt_row([1.0, 0.0], [0.0, 1.0, 0.0], 0.5)] * 2, "has width 2 but"),
        ([prompt_row([1.0, 0.0], [0.0, 1.0], "high")] * 2, "must hold one number per row"),
    ],
)
def test_bad_columns_are_clear_errors(rows, message):
    with pytest.raises(PluginError, match=message):
        Composition(["grpo_s"]).run_advantage_stage(row_batch([1, 1], [0.0, 1.0], rows))


def test_hardness_column_outside_unit_interval_and_missing_rows():
    rows = [{"hardness": 1.5, "reference_reward": 0.5}] * 2
    with pytest.raises(PluginError, match=r"hardness_column 'hardness' must hold values in \[0, 1\]"):
        Composition([{"grpo_s": {"data_hardness": "column"}}]).run_advantage_stage(row_batch([1, 1], [0.0, 1.0], rows))
    batch = row_batch([1, 1], [0.0, 1.0], [ORTHOGONAL] * 2)
    batch.rows = None
    with pytest.raises(PluginError, match="'grpo_s'.*no dataset rows"):
        Composition(["grpo_s"]).run_advantage_stage(batch)


@pytest.mark.parametrize("config", [{"gap_sharpness": 0.0}, {"hardness_weight": -1.0}, {"apply_to": "loss"}])
def test_bad_config_is_refused_at_start(config):
    with pytest.raises(ConfigError):
        Composition([{"grpo_s": config}])


def test_only_the_configured_hook_runs_and_domains_are_declared():
    assert undeclared_domains(GRPOSConfig) == []
    assert Composition(["grpo_s"]).providers("adjust_advantages") == ["grpo_s"]
    assert Composition(["grpo_s"]).providers("shape_rewards") == []
    reward_form = Composition([MeanCentred(), {"grpo_s": {"apply_to": "reward"}}])
    assert reward_form.providers("shape_rewards") == ["grpo_s"] and reward_form.providers("adjust_advantages") == []
    assert reward_form.required_fields() == {"rows"}
