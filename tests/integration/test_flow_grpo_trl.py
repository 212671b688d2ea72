"""Flow-GRPO through the real TRL GRPOTrainer on the multi-turn corridor (``examples/multi_turn/corridor.py``):
every policy token of a trajectory carries the trajectory's group-relative outcome advantage, environment
tokens none; with ``turn_weighting='nested'`` each trajectory's tokens weigh 1/(T_i |a_it|) in the loss."""

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402

from grpo_plugins import CompositionError  # noqa: E402
from grpo_plugins.steps import token_step_index  # noqa: E402
from grpo_plugins.testing import BatchRecorder  # noqa: E402


def expected_row_advantages(batch) -> torch.Tensor:
    """GRPO over each prompt's trajectories (rows), by hand: (R - mean) / (unbiased std + 1e-6), 0 when
    the prompt's outcomes are all equal."""
    out = torch.zeros(batch.num_completions, dtype=torch.float64)
    for prompt in batch.prompt_ids.unique():
        rows = (batch.prompt_ids == prompt).nonzero().flatten()
        r = batch.rewards[rows].double()
        if r.max() > r.min():
            out[rows] = (r - r.mean()) / (r.std() + 1e-6)
    return out


def check_turn_broadcast(batch) -> None:
    steps, mask = batch.steps, batch.completion_mask > 0
    assert steps is not None and int(steps.turn.max()) >= 1  # several turns per trajectory
    assert bool(((token_step_index(steps, *mask.shape) >= 0) == mask).all())  # every policy token in one step
    advantages = batch.advantages
    assert bool((advantages[~mask] == 0).all())  # observation tokens get nothing
    expected = expected_row_advantages(batch)
    for row in range(batch.num_completions):  # one value on every policy token of the trajectory
        assert torch.allclose(advantages[row][mask[row]].double(), expected[row].expand(int(mask[row].sum())),
                              rtol=1e-5, atol=1e-6)


def test_flow_grpo_broadcasts_the_outcome_advantage_to_every_turn(corridor_run):
    recorder = BatchRecorder()
    trainer = corridor_run(["flow_grpo", recorder], max_steps=2)
    for batch in recorder.batches:
        check_turn_broadcast(batch)
    assert any(bool((b.advantages != 0).any()) for b in recorder.batches)  # some group had signal
    logs = [row for row in trainer.state.log_history if "plugins/flow_grpo/turns_per_trajectory" in row]
    assert logs and all(row["plugins/flow_grpo/turns_per_trajectory"] > 1 for row in logs)
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in trainer.state.log_history if "loss" in row)


def test_nested_turn_weighting_composed_with_sapo(corridor_run):
    """The paper's averaging under SAPO's loss (a sequence mean): each trajectory's token weights sum to 1
    (1/T_i per turn, spread over its tokens), 0 on observation tokens; the advantages stay Flow-GRPO's."""
    recorder = BatchRecorder()
    trainer = corridor_run([{"flow_grpo": {"turn_weighting": "nested"}}, "sapo", recorder], max_steps=1, loss_type="sapo")
    batch = recorder.batches[-1]
    check_turn_broadcast(batch)
    weight, mask = batch.row_data["flow_grpo_turn_weight"], batch.completion_mask > 0
    assert bool((weight[~mask] == 0).all())
    assert torch.allclose(weight.sum(dim=1), torch.ones(batch.num_completions, dtype=weight.dtype))
    first = batch.steps.turn == 0  # a turn's tokens weigh 1 / (T_i |a_it|)
    turns = torch.bincount(batch.steps.row, minlength=batch.num_completions)[batch.steps.row[first]]
    length = (batch.steps.end - batch.steps.start)[first]
    first_tokens = weight[batch.steps.row[first], batch.steps.start[first]]
    assert torch.allclose(first_tokens, 1.0 / (turns * length).to(weight.dtype))
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in trainer.state.log_history if "loss" in row)


def test_nested_turn_weighting_is_refused_with_a_token_mean_loss(corridor_run):
    with pytest.raises(CompositionError, match=r"flow_grpo.*loss_type"):
        corridor_run([{"flow_grpo": {"turn_weighting": "nested"}}], max_steps=1, loss_type="dapo")
