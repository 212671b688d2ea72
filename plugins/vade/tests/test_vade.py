"""VADE, enabled by name through its installed entry point; numbers are computed by hand from the method card."""

import pytest
import torch

from grpo_plugins import Composition, CompositionError, GRPOBatch, Method, PluginError, PromptRound, hookimpl
from grpo_plugins.registry import resolve
from grpo_plugins.testing import make_batch
from grpo_plugin_vade import expected_variance_score, sample_beta, thompson_select, time_decay


def observe(composition, prompt_ids, rewards, step):
    batch = GRPOBatch(prompt_ids=torch.tensor(prompt_ids), rewards=torch.tensor(rewards, dtype=torch.float32))
    composition.run_observe(batch, step)


def test_discovered_with_its_hooks():
    assert resolve("vade").distribution == "grpo-plugin-vade"
    composition = Composition(["vade"])
    assert composition.providers("sample_prompts") == ["vade"]
    assert composition.providers("observe") == ["vade"]
    assert composition.providers("compute_advantages") == ["grpo"]  # advantages stay GRPO's


def test_worked_example_posterior_update():
    # Beta(1, 1) + 8 completions with 3 correct -> Beta(4, 6); mean 0.4; E[s] = 4 * 6 / (10 * 11) = 0.218182
    composition = Composition(["vade"])
    observe(composition, [2] * 8, [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0], step=3)
    alpha, beta = composition.method("vade").posterior(torch.tensor([2]), step=3)
    assert (float(alpha[0]), float(beta[0])) == pytest.approx((4.0, 6.0))
    assert float(expected_variance_score(alpha, beta)[0]) == pytest.approx(24 / 110)


def test_worked_example_time_decay():
    # Beta(4, 6) unseen for 10 steps, lam_g = 0.9: 0.9^10 = 0.348678 -> Beta(1 + 0.348678 * 3, 1 + 0.348678 * 5)
    composition = Composition([{"vade": {"time_decay": 0.9}}])
    observe(composition, [0] * 8, [1.0] * 3 + [0.0] * 5, step=5)
    alpha, beta = composition.method("vade").posterior(torch.tensor([0]), step=15)
    assert float(alpha[0]) == pytest.approx(2.046035, abs=1e-5)
    assert float(beta[0]) == pytest.approx(2.743392, abs=1e-5)
    a, b = time_decay(torch.tensor([4.0]), torch.tensor([6.0]), torch.tensor([10]), 0.9, 1.0, 1.0)
    assert (float(a[0]), float(b[0])) == pytest.approx((2.046035, 2.743392), abs=1e-5)


def test_visit_decay_and_time_decay_compose():
    # step 5: Beta(4, 6). step 15 (10 steps later, lam_g 0.9): Beta(2.046035, 2.743392); visit with lam_v 0.5
    # and 2 of 2 correct: alpha = 1 + 0.5 * 1.046035 + 2 = 3.523018, beta = 1 + 0.5 * 1.743392 + 0 = 1.871696
    composition = Composition([{"vade": {"time_decay": 0.9, "visit_decay": 0.5}}])
    observe(composition, [0] * 8, [1.0] * 3 + [0.0] * 5, step=5)
    method = composition.method("vade")
    # the first visit also decays: 1 + 0.5 * 0 + 3 = 4, 1 + 0 + 5 = 6 (prior has nothing to decay)
    alpha, beta = method.posterior(torch.tensor([0]), step=5)
    assert (float(alpha[0]), float(beta[0])) == pytest.approx((4.0, 6.0))
    observe(composition, [0, 0], [1.0, 1.0], step=15)
    alpha, beta = method.posterior(torch.tensor([0]), step=15)
    assert float(alpha[0]) == pytest.approx(3.523018, abs=1e-5)
    assert float(beta[0]) == pytest.approx(1.871696, abs=1e-5)
    assert int(method.table.get("updated_at", torch.tensor([0]))[0]) == 15


def test_unseen_prompts_sit_at_the_prior():
    alpha, beta = Composition(["vade"]).method("vade").posterior(torch.tensor([0, 41]), step=100)
    torch.testing.assert_close(expected_variance_score(alpha, beta), torch.full((2,), 1 / 6, dtype=torch.float64))


def test_all_correct_and_all_wrong_groups_still_update():
    composition = Composition(["vade"])
    observe(composition, [0] * 4 + [1] * 4, [1.0] * 4 + [0.0] * 4, step=1)
    alpha, beta = composition.method("vade").posterior(torch.tensor([0, 1]), step=1)
    torch.testing.assert_close(alpha, torch.tensor([5.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(beta, torch.tensor([1.0, 5.0], dtype=torch.float64))
    # E[s] = 5 / (6 * 7) = 0.119 < 1/6: solved and unsolved prompts drift out of selection
    assert float(expected_variance_score(alpha, beta)[0]) == pytest.approx(5 / 42)


def test_worked_example_thompson_choice():
    # Beta(500, 500), Beta(1, 1000), Beta(500, 1): draws ~0.5, ~0.001, ~0.998 -> scores 0.25, 0.001, 0.002
    alpha = torch.tensor([500.0, 1.0, 500.0], dtype=torch.float64)
    beta = torch.tensor([500.0, 1000.0, 1.0], dtype=torch.float64)
    picks = [int(thompson_select(alpha, beta, 1, torch.Generator().manual_seed(s))[0]) for s in range(200)]
    assert picks.count(0) == 200
    draws = sample_beta(alpha.repeat(2000), beta.repeat(2000), torch.Generator().manual_seed(0)).view(2000, 3)
    torch.testing.assert_close(draws.mean(0), torch.tensor([0.5, 1 / 1001, 500 / 501], dtype=torch.float64), atol=2e-3, rtol=0)


def test_sampler_selects_uncertain_prompts_unlike_uniform_sampling():
    composition = Composition(["vade"])
    # prompts 0..5 solved (8/8), 6..9 unsolved (0/8), 10, 11 mixed (4/8)
    ids = [i for i in range(12) for _ in range(8)]
    rewards = [1.0] * 48 + [0.0] * 32 + [1.0, 0.0] * 8
    observe(composition, ids, rewards, step=1)
    round = PromptRound(num_prompts=2, budget=8, dataset_size=12, step=1, default_rollouts=4)
    picks = torch.cat([composition.run_sample_prompts(round, torch.Generator().manual_seed(s)) for s in range(100)])
    mixed_share = float((picks >= 10).double().mean())
    assert mixed_share > 0.6  # uniform sampling: 2/12
    again = composition.run_sample_prompts(round, torch.Generator().manual_seed(3))
    assert torch.equal(again, composition.run_sample_prompts(round, torch.Generator().manual_seed(3)))


def test_candidate_pool_and_more_prompts_than_the_dataset():
    composition = Composition([{"vade": {"pool_size": 4}}])
    round = PromptRound(num_prompts=3, budget=12, dataset_size=50, step=0, default_rollouts=4)
    chosen = composition.run_sample_prompts(round, torch.Generator().manual_seed(0))
    assert chosen.shape == (3,) and len(set(chosen.tolist())) == 3
    big = PromptRound(num_prompts=7, budget=28, dataset_size=3, step=0, default_rollouts=4)
    chosen = Composition(["vade"]).run_sample_prompts(big, torch.Generator().manual_seed(0))
    assert chosen.shape == (7,) and set(chosen.tolist()) == {0, 1, 2}


def test_uneven_groups_and_groups_of_one():
    composition = Composition(["vade"])
    batch = make_batch(group_sizes=(3, 1, 4, 2), rewards=[1.0] * 10)
    composition.run_observe(batch, 2)
    alpha, beta = composition.method("vade").posterior(torch.tensor([10, 11, 12, 13]), step=2)
    torch.testing.assert_close(alpha, torch.tensor([4.0, 2.0, 5.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(beta, torch.ones(4, dtype=torch.float64))


class FirstPrompts(Method):
    """Another prompt sampler (the compositions with the real spo and knapsack_rl are in tests/integration)."""

    name = "first_prompts"

    @hookimpl
    def sample_prompts(self, round, generator):
        return torch.arange(round.num_prompts) % round.dataset_size


class EvenAllocator(Method):
    """A rollout allocator: the round's budget split evenly."""

    name = "even_allocator"

    @hookimpl
    def allocate_rollouts(self, round, prompt_ids):
        return torch.full_like(prompt_ids, round.budget // prompt_ids.numel())


def test_conflicts_with_another_sampler_and_composes_with_an_allocator():
    with pytest.raises(CompositionError, match="vade.*first_prompts.*sample_prompts"):
        Composition(["vade", FirstPrompts()])
    both = Composition(["vade", EvenAllocator()])
    assert both.providers("sample_prompts") == ["vade"] and both.providers("allocate_rollouts") == ["even_allocator"]
    round = PromptRound(num_prompts=2, budget=8, dataset_size=5, step=0, default_rollouts=4)
    prompts = both.run_sample_prompts(round, torch.Generator().manual_seed(0))
    assert both.rollout_counts(round, prompts).tolist() == [4, 4]


def test_nan_rewards_are_a_clear_error():
    composition = Composition(["vade"])
    with pytest.raises(PluginError, match="vade.*observe.*NaN"):
        observe(composition, [0, 0], [1.0, float("nan")], step=1)


def test_state_round_trip(tmp_path):
    composition = Composition([{"vade": {"time_decay": 0.95}}])
    observe(composition, [0, 0, 3, 3, 3], [1.0, 0.0, 1.0, 1.0, 0.0], step=4)
    composition.save(tmp_path / "vade.pt")
    restored = Composition([{"vade": {"time_decay": 0.95}}])
    restored.load(tmp_path / "vade.pt")
    round = PromptRound(num_prompts=2, budget=8, dataset_size=6, step=9, default_rollouts=4)
    first = composition.run_sample_prompts(round, torch.Generator().manual_seed(1))
    assert torch.equal(first, restored.run_sample_prompts(round, torch.Generator().manual_seed(1)))
    for key, value in composition.state_dict()["vade"].items():
        assert torch.equal(restored.state_dict()["vade"][key], value)
