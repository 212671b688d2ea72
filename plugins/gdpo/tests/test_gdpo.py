"""GDPO: hand-computed numbers from the method card and edge cases (torch and the core only; the
agreement with TRL's and verl's own code is in tests/integration/test_gdpo_crosscheck.py)."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_plugins import Composition, GRPOBatch
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
