"""GDPO: hand-computed numbers from the method card and edge cases (torch and the core only; the
agreement with TRL's and verl's own code is in tests/integration/test_gdpo_crosscheck.py)."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_plugins import Composition, GRPOBatch, Method, hookimpl
from grpo_plugins.errors import BatchError, PluginError

CARD_COMPONENTS = [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 0.0]]  # (correct, format), G = 4


def batch_of(components, prompt_ids, weights=None) -> GRPOBatch:
    comps = torch.tensor(components, dtype=torch.float32)
    w = torch.ones(comps.shape[1]) if weights is None else torch.tensor(weights, dtype=torch.float32)
    return GRPOBatch(
        prompt_ids=torch.tensor(prompt_ids),
        rewards=torch.nan_to_num(comps, nan=0.0) @ w,
        reward_components=comps,
        reward_names=tuple(f"r{k}" for k in range(comps.shape[1])),
        reward_weights=w,
    )


def advantages(methods, batch, **config):
    return Composition(methods, **config).run_advantage_stage(batch).advantages


def test_card_worked_example_and_grpo_contrast():
    gdpo = advantages(["gdpo"], batch_of(CARD_COMPONENTS, [7, 7, 7, 7]))
    # hand numbers from the card: S = [0.634, 0.366, 0.366, -1.366] -> A = [0.689, 0.398, 0.398, -1.486]
    assert gdpo.tolist() == pytest.approx([0.689, 0.398, 0.398, -1.486], abs=1e-3)
    grpo = advantages([], batch_of(CARD_COMPONENTS, [7, 7, 7, 7]))
    assert grpo.tolist() == pytest.approx([0.5, 0.5, 0.5, -1.5], abs=1e-4)
    # the distinguishing property: (1, 0) and (0, 1) collapse under GRPO, not under GDPO
    assert grpo[0] == pytest.approx(grpo[1].item(), abs=1e-6)
    assert gdpo[0] - gdpo[1] > 0.25


def test_card_example_pre_batch_sum():
    batch = batch_of(CARD_COMPONENTS, [7, 7, 7, 7])
    summed = advantages([{"gdpo": {"batch_normalize": False}}], batch)
    assert summed.tolist() == pytest.approx([0.634, 0.366, 0.366, -1.366], abs=1e-3)


def test_uneven_groups_hand_numbers():
    # group 3 (size 2): correct [1, 0] -> +-0.707, format constant -> 0.
    # group 9 (size 3): correct [0, 0, 1] -> [-0.577, -0.577, 1.154], format [1, 0, 0] -> [1.154, -0.577, -0.577].
    # S = [0.707, -0.707, 0.577, -1.154, 0.577]: mean 0, unbiased std 0.8659 -> A = S / 0.8660.
    comps = [[1, 0], [0, 0], [0, 1], [0, 0], [1, 0]]
    ids = [3, 3, 9, 9, 9]
    order = [2, 0, 4, 1, 3]  # shuffled positions: groups are formed by prompt id, not position
    adv = advantages(["gdpo"], batch_of([comps[i] for i in order], [ids[i] for i in order]))
    expected = [0.8164, -0.8164, 0.6666, -1.3332, 0.6666]
    assert adv.tolist() == pytest.approx([expected[i] for i in order], abs=1e-3)


def test_zero_variance_groups_contribute_zero():
    # group 1 is constant in both components: its S is exactly 0; the batch then holds only group 2's spread.
    batch = batch_of([[1, 1], [1, 1], [1, 0], [0, 0]], [1, 1, 2, 2])
    summed = advantages([{"gdpo": {"batch_normalize": False}}], batch)
    assert summed[:2].tolist() == [0.0, 0.0]
    assert summed[2:].tolist() == pytest.approx([0.7070, -0.7070], abs=1e-3)
    # an all-constant batch gives all-zero (finite) advantages
    flat = advantages(["gdpo"], batch_of([[0.3, 1], [0.3, 1], [0.7, 0], [0.7, 0]], [1, 1, 2, 2]))
    assert flat.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_group_of_one_is_a_clear_error():
    with pytest.raises(PluginError, match=r"gdpo.*at least 2 completions.*\[5\]"):
        advantages(["gdpo"], batch_of([[1, 0], [0, 1], [0, 0]], [4, 4, 5]))


def test_nan_component_counts_as_zero_and_inf_is_an_error():
    nan = float("nan")
    with_nan = advantages(["gdpo"], batch_of([[1, nan], [0, 1], [0, 1], [0, nan]], [7, 7, 7, 7]))
    with_zero = advantages(["gdpo"], batch_of([[1, 0], [0, 1], [0, 1], [0, 0]], [7, 7, 7, 7]))
    assert torch.equal(with_nan, with_zero)
    with pytest.raises(PluginError, match="inf"):
        advantages(["gdpo"], batch_of([[1, math.inf], [0, 1], [0, 1], [0, 0]], [7, 7, 7, 7]))
    bad = batch_of(CARD_COMPONENTS, [7, 7, 7, 7])
    bad.rewards = torch.tensor([1.0, nan, 1.0, 0.0])
    with pytest.raises(BatchError, match="NaN"):
        advantages(["gdpo"], bad)


def test_weights_scale_components_before_the_batch_step():
    # weight 3 on format: S = [1.5 - 3*0.866, -0.5 + 3*0.866, ...]; the batch z-score keeps the order
    summed = advantages([{"gdpo": {"batch_normalize": False}}], batch_of(CARD_COMPONENTS, [7] * 4, weights=[1.0, 3.0]))
    assert summed.tolist() == pytest.approx([-1.098, 2.098, 2.098, -3.098], abs=1e-3)


def test_single_reward_falls_back_to_grpo_like_the_paper_code():
    batch = GRPOBatch(prompt_ids=torch.tensor([1, 1, 1, 1, 2, 2]), rewards=torch.tensor([1.0, 0, 0, 0, 2, 0]))
    adv = advantages(["gdpo"], batch)
    assert adv.tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5, 0.7070, -0.7070], abs=1e-3)
    # 'gdpo' mode adds the batch z-score: mean 0, unbiased std sqrt((2.25 + 3 * 0.25 + 2 * 0.5) / 5) = 0.8943
    full = advantages([{"gdpo": {"single_reward": "gdpo"}}], batch)
    assert full.tolist() == pytest.approx([1.677, -0.559, -0.559, -0.559, 0.7906, -0.7906], abs=1e-3)


def test_metrics_and_stateless_round_trip(tmp_path):
    comp = Composition(["gdpo"])
    comp.run_advantage_stage(batch_of(CARD_COMPONENTS, [7] * 4))
    metrics = comp.pop_metrics()
    assert metrics["plugins/gdpo/distinct_advantages_per_group"] == 3.0
    assert comp.state_dict() == {}
    comp.save(tmp_path / "state.pt")
    comp.load(tmp_path / "state.pt")


def test_constant_groups_are_exactly_zero_after_the_batch_step():
    """A group constant in every component gets exactly 0, though the float mean of S once moved it (-5e-8).

    Groups: the card's (S = [0.634, 0.366, 0.366, -1.366]), (1, 1) x 3 (S = 0) and correctness [1, 0, 0],
    format [0, 0, 1] (each (2/3, -1/3, -1/3) / sqrt(1/3), reordered: S = [0.577, -1.155, 0.577]); A = S / std(S)
    (mean 0), each group z-score with its epsilon 1e-4."""
    components = CARD_COMPONENTS + [[1.0, 1.0]] * 3 + [[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]
    a = advantages(["gdpo"], batch_of(components, [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]))
    assert a[4:7].tolist() == [0.0, 0.0, 0.0]
    h, r = math.sqrt(3) / 2, math.sqrt(1 / 3)  # card: correctness std 0.5, format std sqrt(1/3)
    f1, f2 = 0.5 / (0.5 + 1e-4), r / (r + 1e-4)
    card = [1.5 * f1 - h * f2, -0.5 * f1 + h * f2, -0.5 * f1 + h * f2, -0.5 * f1 - h * f2]
    third = [x / (r + 1e-4) for x in (1 / 3, -2 / 3, 1 / 3)]
    s = card + [0.0] * 3 + third
    std = math.sqrt(sum(x * x for x in s) / (len(s) - 1))
    assert a[:4].tolist() + a[7:].tolist() == pytest.approx([x / (std + 1e-4) for x in card + third], abs=1e-5)


def test_constant_groups_are_exactly_zero_at_a_large_reward_scale():
    """Component 0 near 1e6 in float32 (the residue of its group mean once gave the constant group -0.07)."""
    batch = batch_of([[1e6 + 0.1, 0.0], [1e6 + 0.2, 1.0], [1e6 + 0.7, 0.0], [5.0, 5.0], [5.0, 5.0]], [0, 0, 0, 1, 1])
    a = advantages(["gdpo"], batch)
    assert a[3:].tolist() == [0.0, 0.0]
    assert a[:3].sum().item() == pytest.approx(0.0, abs=1e-5)


class AddOneToTheFirstRow(Method):
    """A reward shaper for the tests: +1 on row 0 of batch.rewards only."""

    name = "add_one_to_the_first_row"

    @hookimpl
    def shape_rewards(self, batch: GRPOBatch, rewards: torch.Tensor) -> torch.Tensor:
        return rewards + (torch.arange(rewards.numel()) == 0).to(rewards.dtype)


class DoubleTheWeights(Method):
    """A shaper that writes what it does where GDPO reads it: rewards and reward_weights doubled."""

    name = "double_the_weights"

    @hookimpl
    def shape_rewards(self, batch: GRPOBatch, rewards: torch.Tensor) -> torch.Tensor:
        batch.reward_weights = batch.reward_weights * 2
        return rewards * 2


def test_a_shaping_gdpo_would_drop_is_refused():
    with pytest.raises(PluginError, match=r"gdpo.*never reads batch.rewards.*shape_rewards.*row 0: shaped reward 2, "
                                          r"components give 1"):
        advantages([AddOneToTheFirstRow(), "gdpo"], batch_of(CARD_COMPONENTS, [1, 1, 1, 1]))
    # one component: gdpo falls back to GRPO on the shaped reward, so the shaping is kept: (1, 0, 0, 0) + 1 on row 0
    a = advantages([AddOneToTheFirstRow(), "gdpo"], batch_of([[1.0], [0.0], [0.0], [0.0]], [1, 1, 1, 1]))
    assert a.tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-3)
    # a shaper that writes its reward into reward_weights passes: doubled weights, same z-scores
    doubled = advantages([DoubleTheWeights(), "gdpo"], batch_of(CARD_COMPONENTS, [1, 1, 1, 1]))
    assert doubled.tolist() == pytest.approx([0.689, 0.398, 0.398, -1.486], abs=1e-3)
