"""GRPO-S in the real TRL GRPOTrainer: two tiny steps alone (each prompt's advantages are GRPO's times
1 + hardness + responsiveness, read from the dataset's columns) and composed with round 1's ``ngrpo``."""

from __future__ import annotations

import math
import statistics

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402

from grpo_plugins.testing import BatchRecorder  # noqa: E402
from grpo_plugins_trl.testing import arithmetic_dataset, digit_overlap_reward, tiny_grpo_run  # noqa: E402


def dataset_with_difficulty_columns():
    """The arithmetic problems with a 2-d 'embedding' whose angle to the reference grows with the sum, and the
    demonstration's reward 1.0 (a perfect answer)."""
    data = arithmetic_dataset(32)
    angles = [int(a) / 18 * math.pi / 2 for a in data["answer"]]
    data = data.add_column("prompt_embedding", [[math.cos(t), math.sin(t)] for t in angles])
    data = data.add_column("reference_embedding", [[1.0, 0.0]] * len(data))
    return data.add_column("reference_reward", [1.0] * len(data))


def hand_scale(row: dict, group_rewards: list[float]) -> float:
    """1 + clip(1 - cos, 0, 1) + sigmoid(r_ref - mean r), by hand."""
    e, ref = row["prompt_embedding"], row["reference_embedding"]
    cos = (e[0] * ref[0] + e[1] * ref[1]) / (math.hypot(*e) * math.hypot(*ref))
    hardness = min(max(1 - cos, 0.0), 1.0)
    return 1 + hardness + 1 / (1 + math.exp(-(row["reference_reward"] - statistics.fmean(group_rewards))))


def logged(trainer, key: str) -> list[float]:
    return [row[key] for row in trainer.state.log_history if key in row]


def test_grpo_s_alone_scales_each_prompts_advantages():
    recorder = BatchRecorder()
    trainer = tiny_grpo_run(["grpo_s", recorder], max_steps=2, dataset=dataset_with_difficulty_columns(),
                            reward_funcs=digit_overlap_reward)
    assert len(recorder.batches) == 2
    for batch in recorder.batches:
        ids, rewards = batch.prompt_ids.tolist(), batch.rewards.tolist()
        groups = {p: [r for q, r in zip(ids, rewards) if q == p] for p in set(ids)}
        expected = []
        for p, r, row in zip(ids, rewards, batch.rows):
            g = groups[p]
            grpo = 0.0 if max(g) == min(g) else (r - statistics.fmean(g)) / (statistics.stdev(g) + 1e-4)
            expected.append(hand_scale(row, g) * grpo)
        torch.testing.assert_close(batch.advantages, torch.tensor(expected), rtol=1e-4, atol=1e-5)
    scales = logged(trainer, "plugins/grpo_s/mean_scale")
    assert len(scales) == 2 and all(1.0 <= s <= 3.0 for s in scales)
    assert all(math.isfinite(x) for x in logged(trainer, "loss"))


def test_missing_column_stops_the_run_at_start_up_naming_method_and_column():
    from grpo_plugins import CompositionError

    with pytest.raises(CompositionError, match="method 'grpo_s' needs dataset column 'reference_reward'"):
        tiny_grpo_run([{"grpo_s": {"hardness_weight": 0.0}}], max_steps=1, train=False)


def test_grpo_s_composed_with_ngrpo():
    recorder = BatchRecorder()
    trainer = tiny_grpo_run(["ngrpo", "grpo_s", recorder], max_steps=2, dataset=dataset_with_difficulty_columns(),
                            reward_funcs=digit_overlap_reward)
    assert trainer.composition.providers("compute_advantages") == ["ngrpo"]
    assert trainer.composition.providers("adjust_advantages") == ["grpo_s"]
    assert len(logged(trainer, "plugins/grpo_s/mean_scale")) == 2
    assert all(math.isfinite(x) for x in logged(trainer, "loss"))
    assert all(bool(torch.isfinite(b.advantages).all()) for b in recorder.batches)
