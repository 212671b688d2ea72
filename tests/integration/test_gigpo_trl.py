"""GiGPO through the real TRL GRPOTrainer on a multi-turn environment (``examples/multi_turn/corridor.py``):
the adapter turns the rollout's ``env_mask`` and ``step_keys`` into ``GRPOBatch.steps``, and the advantages
are GiGPO's, per step, on the policy's tokens only."""

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from grpo_plugins import Composition  # noqa: E402
from grpo_plugins.testing import BatchRecorder  # noqa: E402


def test_gigpo_trains_on_multi_turn_trajectories(corridor_run, corridor):
    recorder = BatchRecorder()
    trainer = corridor_run(["gigpo", recorder], max_steps=2)
    batch = recorder.batches[-1]
    steps = batch.steps
    assert steps is not None and int(steps.turn.max()) >= 1  # several turns per trajectory
    # every step is a run of policy tokens, and every policy token lies in one step
    mask = batch.completion_mask > 0
    from grpo_plugins.steps import token_step_index

    index = token_step_index(steps, *mask.shape)
    assert bool(((index >= 0) == mask).all())
    # the first turn acts in the prompt's start cell: all trajectories of a group share that state key
    first = steps.turn == 0
    start_cells = torch.tensor([int(p.split()[0]) for p in batch.prompts])
    assert steps.key[first].tolist() == (start_cells[steps.row[first]] * corridor.CELLS + start_cells[steps.row[first]]).tolist()
    # observation tokens (env_mask 0) get no advantage; policy tokens of one step share theirs
    advantages = batch.advantages
    assert bool((advantages[~mask] == 0).all())
    for s in range(steps.num_steps):
        values = advantages[steps.row[s], steps.start[s]:steps.end[s]]
        assert bool((values == values[0]).all())
    logs = [row for row in trainer.state.log_history if "plugins/gigpo/frac_shared_state_steps" in row]
    assert logs and all(row["plugins/gigpo/frac_shared_state_steps"] > 0 for row in logs)
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in trainer.state.log_history if "loss" in row)


def test_gigpo_composes_with_a_loss_method(corridor_run):
    recorder = BatchRecorder()
    corridor_run(["gigpo", "sapo", recorder], max_steps=1)
    assert recorder.batches and recorder.batches[-1].advantages.dim() == 2


def test_without_a_method_needing_steps_the_multi_turn_run_is_trls(corridor_run):
    """No method: TRL's own code path (the rollout, env_mask and rewards untouched), bit for bit."""
    plain = corridor_run(None, trainer_cls=GRPOTrainer, max_steps=2)
    ours = corridor_run([], max_steps=2)
    for a, b in zip(plain.model.parameters(), ours.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_step_field_of_the_wrong_length_names_the_row(corridor_run, corridor):
    def short_keys(prompts, trainer):
        out = corridor.make_rollout()(prompts, trainer)
        out["step_keys"][1] = out["step_keys"][1] + [7]
        return out

    with pytest.raises(Exception, match=r"'step_keys' holds \d+ value\(s\) for row 1"):
        corridor_run(["gigpo"], rollout_func=short_keys, max_steps=1)


def test_gigpo_is_refused_where_the_trainer_gives_no_steps():
    from grpo_plugins import TrainerCapabilities

    problems = Composition(["gigpo"]).capability_problems(TrainerCapabilities.standard("verl"))
    assert any("'steps'" in p for p in problems)
