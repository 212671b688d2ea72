"""The author kit (pytest plugin auto-loaded through ``pytest11``): fixtures and batch helpers."""

import pytest
import torch

from grpo_plugins import Composition, CompositionError, Method, hookimpl
from grpo_plugins.default import GRPO, GRPOConfig
from grpo_plugins.testing import make_batch, run_advantage_stage


def test_grpo_batch_fixture(grpo_batch):
    assert grpo_batch.num_completions == 10 and grpo_batch.num_groups == 4
    assert grpo_batch.group_sizes.tolist() == [3, 1, 4, 2]
    assert grpo_batch.group_prompt_ids.tolist() == [10, 11, 12, 13]
    assert not torch.equal(grpo_batch.prompt_ids, grpo_batch.prompt_ids.sort().values)  # shuffled on purpose
    assert torch.equal(grpo_batch.group_prompt_ids[grpo_batch.group_index], grpo_batch.prompt_ids)
    lengths = grpo_batch.completion_mask.sum(1)
    assert bool((lengths >= 1).all()) and grpo_batch.completion_mask.shape == (10, 6)
    assert torch.equal(grpo_batch.old_log_probs * grpo_batch.completion_mask, grpo_batch.old_log_probs)
    assert grpo_batch.rows[0] == {"prompt_id": int(grpo_batch.prompt_ids[0])}


def test_enable_methods_fixture_uses_real_discovery(enable_methods):
    composition = enable_methods(["length_penalty"])
    entry = composition.user_methods[0]
    assert (entry.name, entry.distribution, entry.version) == ("length_penalty", "grpo-plugin-length-penalty", "0.1.0")
    with pytest.raises(CompositionError, match="unknown method"):
        enable_methods(["no_such_method"])


def test_make_batch():
    batch = make_batch(group_sizes=(2, 3), rewards=[1, 2, 3, 4, 5], shuffle=False, num_components=2, step=7)
    assert batch.prompt_ids.tolist() == [10, 10, 11, 11, 11]
    assert batch.rewards.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0] and batch.rewards.dtype == torch.float32
    assert batch.reward_components.shape == (5, 2) and batch.step == 7
    # shuffling only reorders: the same seed draws the same tokens and masks
    shuffled = make_batch(group_sizes=(2, 3), shuffle=True)
    assert sorted(shuffled.prompt_ids.tolist()) == batch.prompt_ids.tolist()
    with pytest.raises(TypeError, match=r"\['shufle'\] are not GRPOBatch fields"):
        make_batch(shufle=False)


def test_run_advantage_stage_helper():
    batch = run_advantage_stage([{"grpo": {"scale": "none"}}], make_batch(group_sizes=(2, 2), rewards=[1, 3, 0, 0], shuffle=False))
    assert batch.advantages.tolist() == [-1.0, 1.0, 0.0, 0.0]


def test_a_configured_grpo_object_stays_the_replaceable_default():
    class Estimator(Method):
        name = "estimator"

        @hookimpl
        def compute_advantages(self, batch):
            return batch.rewards

    composition = Composition([GRPO(GRPOConfig(scale="none")), Estimator()])
    assert composition.providers("compute_advantages") == ["estimator"]
    assert composition.enabled[0].builtin and composition.enabled[0].distribution == "grpo-plugins"


def test_a_method_object_needs_a_name():
    with pytest.raises(CompositionError, match="method object Method has no name"):
        Composition([Method()])


class CountingSampler(Method):
    """Draws prompt ``k mod D`` in round ``k`` (``k``: batches observed); ``keeps_state`` decides whether the
    count is checkpointed."""

    name = "counting_sampler"

    def __init__(self, keeps_state: bool):
        super().__init__()
        self.keeps_state, self.seen = keeps_state, 0

    @hookimpl
    def sample_prompts(self, round, generator):
        return (torch.arange(round.num_prompts) + self.seen) % round.dataset_size

    @hookimpl
    def observe(self, batch, step):
        self.seen += 1

    def state_dict(self):
        return {"seen": self.seen} if self.keeps_state else {}

    def load_state_dict(self, state):
        self.seen = state.get("seen", 0)


def test_resumed_sampler_rounds_tell_a_sampler_that_forgets_its_state(tmp_path):
    from grpo_plugins import PromptRound
    from grpo_plugins.testing import FirstPrompts, play_sampler_rounds, resumed_sampler_rounds

    def plan(r):
        return PromptRound(num_prompts=2, budget=6, dataset_size=5, step=r, default_rollouts=3)

    straight, resumed = resumed_sampler_rounds(lambda: [CountingSampler(True)], tmp_path, plan, rounds=4, resume_at=2)
    assert straight == resumed == [([0, 1], [3, 3]), ([1, 2], [3, 3]), ([2, 3], [3, 3]), ([3, 4], [3, 3])]
    straight, resumed = resumed_sampler_rounds(lambda: [CountingSampler(False)], tmp_path, plan, rounds=4, resume_at=2)
    assert resumed[2] == ([0, 1], [3, 3]) != straight[2]  # the count restarted at 0 after the resume
    rounds = play_sampler_rounds(Composition([FirstPrompts()]), torch.Generator(), plan, 2)
    assert rounds == [([0, 1], [3, 3])] * 2
