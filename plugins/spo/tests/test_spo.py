"""SPO, enabled by name through its installed entry point; numbers are computed by hand from the method card."""

import math

import pytest
import torch

from grpo_plugins import BatchError, Composition, ConfigError, CompositionError, GRPOBatch, Method, PluginError, PromptRound, hookimpl
from grpo_plugins.parallel import ParallelContext
from grpo_plugins.registry import resolve
from grpo_plugins.testing import make_batch
from grpo_plugin_spo import draw_prompts, forgetting_factor, offline_prior, sampling_weights, spo_advantages


def set_tracker(composition, alpha, beta):
    """Give prompts 0 .. len(alpha)-1 the tracker (alpha, beta)."""
    method = composition.method("spo")
    method.set_tracker(torch.arange(len(alpha)), torch.tensor(alpha), torch.tensor(beta))
    return method


def set_last_log_prob(method, prompt_id, value):
    method.table.columns["last_log_prob"][method.table.rows(torch.tensor([prompt_id]))] = value


def tracker(method, prompt_id):
    alpha, beta = method.tracker(torch.tensor([prompt_id]))
    return float(alpha[0]), float(beta[0])


def batch_of(prompt_ids, rewards, log_probs=None):
    mask = torch.ones(len(prompt_ids), 3)
    old = None if log_probs is None else torch.tensor(log_probs, dtype=torch.float32)[:, None].expand(-1, 3).clone()
    return GRPOBatch(
        prompt_ids=torch.tensor(prompt_ids), rewards=torch.tensor(rewards, dtype=torch.float32),
        completion_mask=mask, old_log_probs=old,
    )


def test_discovered_with_its_default_hooks():
    assert resolve("spo").distribution == "grpo-plugin-spo"
    composition = Composition(["spo"])
    assert composition.providers("compute_advantages") == ["spo"]
    assert composition.providers("sample_prompts") == ["spo"]
    assert composition.providers("observe") == ["spo"]
    assert composition.providers("allocate_rollouts") == []


def test_worked_example_advantages():
    # v = [0.5, 0.5, 0.25, 0.75], r = [1, 0, 1, 0] -> a = [0.5, -0.5, 0.75, -0.75], mean 0,
    # unbiased std = sqrt((0.25 + 0.25 + 0.5625 + 0.5625) / 3) = 0.735980 -> A = [0.679366, -0.679366, 1.019049, -1.019049]
    composition = Composition(["spo"])
    set_tracker(composition, [1.0, 2.0, 1.0, 3.0], [1.0, 2.0, 3.0, 1.0])
    batch = composition.run_advantage_stage(batch_of([0, 1, 2, 3], [1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(batch.advantages, torch.tensor([0.679366, -0.679366, 1.019049, -1.019049]), atol=1e-5, rtol=0)
    assert batch.advantages.shape == (4,)


def test_worked_example_tracker_update():
    # alpha = beta = 4, r = 1, D = 0.009: rho = 2^(-0.15) = 0.901250 -> alpha = 4.605, beta = 3.605
    assert float(forgetting_factor(torch.tensor(0.009, dtype=torch.float64))) == pytest.approx(0.901250, abs=1e-6)
    composition = Composition(["spo"])
    method = set_tracker(composition, [4.0], [4.0])
    set_last_log_prob(method, 0, -1.0)  # mean behaviour log-prob at the previous visit
    composition.run_observe(batch_of([0], [1.0], log_probs=[-1.009]), step=5)
    assert tracker(method, 0) == pytest.approx((4.605, 3.605), abs=1e-3)
    assert float(method.table.get("last_log_prob", torch.tensor([0]))[0]) == pytest.approx(-1.009, abs=1e-6)


def test_first_visit_has_zero_distance_and_rho_max():
    # D = 0 -> rho = 2^0 = 1, clipped to 0.96: alpha = 0.96 * 0.5 + 1 = 1.48, beta = 0.96 * 0.5 = 0.48
    composition = Composition(["spo"])
    composition.run_observe(batch_of([3], [1.0], log_probs=[-2.0]), step=1)
    method = composition.method("spo")
    assert tracker(method, 3) == pytest.approx((1.48, 0.48))
    assert int(method.table.get("visits", torch.tensor([3]))[0]) == 1


def test_large_distance_is_clipped_at_rho_min():
    # D = 1 -> 2^(-1/0.06) ~ 1e-5, clipped to 0.875: alpha = 0.875 * 2 + 0, beta = 0.875 * 2 + 1
    composition = Composition(["spo"])
    method = set_tracker(composition, [2.0], [2.0])
    set_last_log_prob(method, 0, -0.5)
    composition.run_observe(batch_of([0], [0.0], log_probs=[-1.5]), step=1)
    assert tracker(method, 0) == pytest.approx((1.75, 2.75))


def test_constant_forgetting_factor():
    # rho = 0.875: group of 4 with 3 successes: alpha = 0.875 * 0.5 + 3 = 3.4375, beta = 0.4375 + 1
    composition = Composition([{"spo": {"rho_mode": "constant"}}])
    composition.run_observe(batch_of([2, 2, 2, 2], [1.0, 1.0, 0.0, 1.0], log_probs=[-1.0, -9.0, -3.0, -2.0]), step=1)
    assert tracker(composition.method("spo"), 2) == pytest.approx((3.4375, 1.4375))


def test_sampling_weights_of_the_card():
    # v = 0.5 -> sqrt(0.25) + 0.05 = 0.55; v = 0.9 -> 0.3 + 0.05 = 0.35; v = 0 -> 0.05
    weights = sampling_weights(torch.tensor([1.0, 9.0, 0.0]), torch.tensor([1.0, 1.0, 1.0]))
    torch.testing.assert_close(weights, torch.tensor([0.55, 0.35, 0.05]))


def test_offline_prior():
    # n = 8, s = 3, rho_min = 0.875 -> N0 = 8; alpha = 8 * 3.5 / 9 = 3.1111, beta = 8 * 5.5 / 9 = 4.8889
    alpha, beta = offline_prior(torch.tensor([3]), 8)
    assert (float(alpha[0]), float(beta[0])) == pytest.approx((28 / 9, 44 / 9))


def test_sampler_prefers_uncertain_prompts_and_is_reproducible():
    composition = Composition(["spo"])
    # prompt 0 at v = 0.5 (w = 0.55), prompts 1..9 at v ~ 0.001 (w ~ 0.0816)
    set_tracker(composition, [10.0] + [0.01] * 9, [10.0] + [10.0] * 9)
    round = PromptRound(num_prompts=1, budget=4, dataset_size=10, step=3, default_rollouts=4)
    draws = torch.cat([composition.run_sample_prompts(round, torch.Generator().manual_seed(s)) for s in range(400)])
    share = float((draws == 0).double().mean())
    expected = 0.55 / (0.55 + 9 * (math.sqrt(0.01 / 10.01 * (1 - 0.01 / 10.01)) + 0.05))
    assert share == pytest.approx(expected, abs=0.07)
    first = composition.run_sample_prompts(round, torch.Generator().manual_seed(7))
    assert torch.equal(first, composition.run_sample_prompts(round, torch.Generator().manual_seed(7)))


def test_sampler_draws_with_replacement_only_when_needed():
    gen = torch.Generator().manual_seed(0)
    distinct = draw_prompts(torch.ones(5), 5, gen)
    assert sorted(distinct.tolist()) == [0, 1, 2, 3, 4]
    assert draw_prompts(torch.ones(3), 7, gen).shape == (7,)
    assert draw_prompts(torch.zeros(4), 2, gen).shape == (2,)  # all-zero weights fall back to uniform


def test_non_zero_advantages_on_all_correct_groups_unlike_grpo():
    # every group has the same reward inside it: GRPO gives 0 everywhere, SPO compares with the tracker
    batch = make_batch(group_sizes=(3, 1, 4, 2), rewards=None)
    batch.rewards = (batch.prompt_ids % 2).float()  # prompts 11, 13 all correct; 10, 12 all wrong
    grpo = Composition([]).run_advantage_stage(make_batch(group_sizes=(3, 2, 4, 2), rewards=[1.0] * 11))
    assert bool((grpo.advantages == 0).all())
    composition = Composition(["spo"])
    set_tracker(composition, [0.0] * 10 + [1.0, 1.0, 3.0, 1.0], [1.0] * 10 + [1.0, 1.0, 1.0, 3.0])
    out = composition.run_advantage_stage(batch)
    assert bool((out.advantages != 0).all())
    # all-correct batch, trackers disagree (v = 0.5 vs 0.75): a = [0.5, 0.25] -> still signal
    composition = Composition(["spo"])
    set_tracker(composition, [1.0, 3.0], [1.0, 1.0])
    out = composition.run_advantage_stage(batch_of([0, 0, 1], [1.0, 1.0, 1.0]))
    # a = [0.5, 0.5, 0.25]: mean 0.416667, std 0.144338 -> [0.57735, 0.57735, -1.154701]
    torch.testing.assert_close(out.advantages, torch.tensor([0.57735, 0.57735, -1.154701]), atol=1e-5, rtol=0)


def test_groups_of_one_uneven_groups_and_zero_variance():
    composition = Composition(["spo"])
    batch = make_batch(group_sizes=(3, 1, 4, 2))
    out = composition.run_advantage_stage(batch)
    assert torch.isfinite(out.advantages).all()
    # all trackers at 0.5: A is the batch-normalised reward
    r = batch.rewards.double()
    expected = (r - r.mean()) / (r.std() + 1e-8)
    torch.testing.assert_close(out.advantages.double(), expected, atol=1e-6, rtol=0)
    # a batch whose a = r - v is constant gives zeros, never NaN
    out = Composition(["spo"]).run_advantage_stage(batch_of([0, 1, 2], [1.0, 1.0, 1.0]))
    assert torch.equal(out.advantages, torch.zeros(3))


def test_batch_of_one_gets_zero():
    out = Composition(["spo"]).run_advantage_stage(batch_of([5], [1.0]))
    assert torch.equal(out.advantages, torch.zeros(1))
    assert torch.equal(spo_advantages(torch.tensor([1.0]), torch.tensor([0.3])), torch.zeros(1))


def test_constant_batch_gets_exact_zeros_despite_the_mean_residue():
    # rho constant 0.875: three fresh prompts fail (v = 0.5, a = -0.5, exact), then fail again with
    # v = 0.4375 / 1.875 = 0.2333..: a is constant but its float mean is not, A must still be exactly 0
    composition = Composition([{"spo": {"rho_mode": "constant"}}])
    batch = batch_of([0, 1, 2], [0.0, 0.0, 0.0])
    for step in (1, 2):
        out = composition.run_advantage_stage(batch)
        assert torch.equal(out.advantages, torch.zeros(3))
        assert composition.pop_metrics()["plugins/spo/frac_zero_advantage"] == 1.0
        composition.run_observe(batch, step)
    # offline prior s = 0 of n = 8 (v = 0.5/9 * 8 / 8 = 1/18) on 7 prompts, all correct: a = 17/18 everywhere
    composition = Composition(["spo"])
    composition.method("spo").initialize(torch.arange(7), torch.zeros(7), 8)
    out = composition.run_advantage_stage(batch_of(list(range(7)), [1.0] * 7))
    assert torch.equal(out.advantages, torch.zeros(7))
    # the function itself: equal a -> 0, one differing a -> the usual normalisation
    assert torch.equal(spo_advantages(torch.zeros(3, dtype=torch.float64), torch.full((3,), 0.7, dtype=torch.float64)),
                       torch.zeros(3, dtype=torch.float64))


def test_norm_epsilon_must_be_positive():
    with pytest.raises(ConfigError, match="spo.*norm_epsilon.*\\(0, inf\\)"):
        Composition([{"spo": {"norm_epsilon": 0.0}}])


def _all_equal_rank(rank: int, port: int, shards: list, out_dir: str) -> None:
    """One gloo rank: SPO advantages of its shard with the batch statistics reduced across ranks."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        parallel = ParallelContext(rank=rank, world_size=2, gathered=False)
        results = [spo_advantages(torch.tensor(r, dtype=torch.float64), torch.tensor(v, dtype=torch.float64), parallel)
                   for r, v in shards[rank]]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_all_equal_is_decided_across_data_parallel_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # case 1: a = 1 - 0.3 = 0.7 on every row of both ranks -> all 0
    # case 2: rank 0 a = [0.7, 0.7], rank 1 a = [0.4] (constant on each rank, not globally):
    #   mean 0.6, unbiased std sqrt((0.01 + 0.01 + 0.04) / 2) = 0.173205 -> [0.57735, 0.57735] and [-1.154701]
    # case 3: rank 1 holds no rows; rank 0 a = [0.7, 0.7] -> 0
    shards = [
        [([1.0, 1.0], [0.3, 0.3]), ([1.0, 1.0], [0.3, 0.3]), ([1.0, 1.0], [0.3, 0.3])],
        [([1.0], [0.3]), ([1.0], [0.6]), ([], [])],
    ]
    mp.start_processes(_all_equal_rank, args=(port, shards, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    assert torch.equal(rank0[0], torch.zeros(2, dtype=torch.float64)) and torch.equal(rank1[0], torch.zeros(1, dtype=torch.float64))
    torch.testing.assert_close(rank0[1], torch.tensor([0.57735, 0.57735], dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(rank1[1], torch.tensor([-1.154701], dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.equal(rank0[2], torch.zeros(2, dtype=torch.float64)) and rank1[2].shape == (0,)


def test_value_is_read_before_the_update():
    composition = Composition(["spo"])
    batch = batch_of([0, 1], [1.0, 0.0])
    first = composition.run_advantage_stage(batch).advantages.clone()
    composition.run_observe(batch, step=1)
    method = composition.method("spo")
    # no behaviour log-probs in this batch -> rho_constant 0.875: alpha = 0.4375 + 1, beta = 0.4375
    assert float(method.values(torch.tensor([0]))[0]) == pytest.approx(1.4375 / 1.875)
    torch.testing.assert_close(first, torch.tensor([0.707107, -0.707107]), atol=1e-5, rtol=0)


def test_single_rollout_switch_and_budget_check():
    composition = Composition([{"spo": {"single_rollout": True}}])
    round = PromptRound(num_prompts=3, budget=3, dataset_size=10, step=0, default_rollouts=1)
    assert composition.run_allocate_rollouts(round, torch.tensor([4, 5, 6])).tolist() == [1, 1, 1]
    wrong = PromptRound(num_prompts=3, budget=12, dataset_size=10, step=0, default_rollouts=4)
    with pytest.raises(PluginError, match="spo.*allocate_rollouts.*budget is 12"):
        composition.run_allocate_rollouts(wrong, torch.tensor([4, 5, 6]))
    # the sampler fills the budget with prompts of one completion each
    prompts = composition.run_sample_prompts(wrong, torch.Generator().manual_seed(0))
    assert prompts.shape == (12,) and prompts.max() < 10
    assert composition.rollout_counts(wrong, prompts).tolist() == [1] * 12
    plain = Composition(["spo"]).run_sample_prompts(wrong, torch.Generator().manual_seed(0))
    assert plain.shape == (3,)


def test_requires_old_log_probs_only_for_the_logprob_shift():
    assert Composition(["spo"]).required_fields() == {"old_log_probs"}
    assert Composition([{"spo": {"rho_mode": "constant"}}]).required_fields() == set()


class EvenAllocator(Method):
    """Another rollout allocator (the composition with the real knapsack_rl is in tests/integration)."""

    name = "even_allocator"

    @hookimpl
    def allocate_rollouts(self, round, prompt_ids):
        return torch.full_like(prompt_ids, round.budget // prompt_ids.numel())


def test_switches_leave_slots_to_other_methods():
    composition = Composition([{"spo": {"use_advantage": False}}, EvenAllocator()])
    assert composition.providers("compute_advantages") == ["grpo"]
    assert composition.providers("allocate_rollouts") == ["even_allocator"]
    assert composition.providers("sample_prompts") == ["spo"]
    assert composition.providers("observe") == ["spo"]
    off = Composition([{"spo": {"use_sampler": False}}])
    assert off.providers("sample_prompts") == []
    with pytest.raises(CompositionError, match="spo.*even_allocator.*allocate_rollouts"):
        Composition([{"spo": {"single_rollout": True}}, EvenAllocator()])


def test_nan_rewards_are_a_clear_error():
    composition = Composition(["spo"])
    batch = batch_of([0, 1], [1.0, float("nan")])
    with pytest.raises(BatchError, match="NaN"):
        composition.run_advantage_stage(batch)
    with pytest.raises(PluginError, match="spo.*observe.*NaN"):
        composition.run_observe(batch, 1)


def test_fully_masked_completion_does_not_move_the_distance():
    composition = Composition(["spo"])
    method = set_tracker(composition, [4.0], [4.0])
    set_last_log_prob(method, 0, -1.0)
    batch = batch_of([0, 0], [1.0, 0.0], log_probs=[-1.0, -7.0])
    batch.completion_mask[1] = 0  # second completion has no tokens: only the first counts, D = 0
    composition.run_observe(batch, 1)
    assert tracker(method, 0) == pytest.approx((0.96 * 4 + 1, 0.96 * 4 + 1))


def test_hashed_prompt_ids_are_tracked_sparsely():
    # 63-bit ids (prompt-text hashes) need no dense table
    ids = [2**62 + 5, 7, 2**62 + 5]
    composition = Composition([{"spo": {"rho_mode": "constant"}}])
    composition.run_observe(batch_of(ids, [1.0, 0.0, 1.0]), 1)
    method = composition.method("spo")
    assert method.table.keys.tolist() == [7, 2**62 + 5]
    assert tracker(method, 2**62 + 5) == pytest.approx((0.4375 + 2, 0.4375))
    assert tracker(method, 12345) == (0.5, 0.5)


def test_state_round_trip(tmp_path):
    composition = Composition(["spo"])
    composition.run_observe(batch_of([0, 1, 1, 4], [1.0, 0.0, 1.0, 0.0], log_probs=[-1.0, -2.0, -2.5, -0.5]), 1)
    composition.save(tmp_path / "spo.pt")
    restored = Composition(["spo"])
    restored.load(tmp_path / "spo.pt")
    for key, value in composition.state_dict()["spo"].items():
        torch.testing.assert_close(restored.state_dict()["spo"][key], value, equal_nan=True)
    follow = batch_of([1, 4], [1.0, 1.0], log_probs=[-2.0, -0.4])
    composition.run_observe(follow, 2)
    restored.run_observe(follow, 2)
    ids = torch.tensor([0, 1, 4])
    torch.testing.assert_close(restored.method("spo").values(ids), composition.method("spo").values(ids))
