"""The shared helpers against a plain Python loop, on random uneven groups (groups of one and empty
groups included), and the batch-global statistics across two real gloo processes."""

import importlib.util
import math
import socket
import statistics
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from grpo_plugins import ParallelContext
from grpo_plugins import ops


def uneven_groups(seed: int, num_groups: int = 9):
    """Random group sizes in 0..5 (ones and empties included), members in shuffled order."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 6, (num_groups,), generator=gen)
    sizes[0], sizes[1], sizes[2] = 1, 0, 5
    index = torch.repeat_interleave(torch.arange(num_groups), sizes)
    index = index[torch.randperm(index.numel(), generator=gen)]
    values = torch.randn(index.numel(), generator=gen, dtype=torch.float64)
    return index, values, num_groups


def members(index, values, g):
    return [values[i] for i in range(len(index)) if int(index[i]) == g]


@pytest.mark.parametrize("seed", range(5))
def test_segment_statistics_match_a_loop(seed):
    index, values, G = uneven_groups(seed)
    ref = {name: [] for name in ("sum", "count", "mean", "std", "std_pop", "max", "min")}
    for g in range(G):
        xs = [float(v) for v in members(index, values, g)]
        ref["sum"].append(sum(xs))
        ref["count"].append(len(xs))
        ref["mean"].append(statistics.fmean(xs) if xs else 0.0)
        ref["std"].append(statistics.stdev(xs) if len(xs) > 1 else 0.0)
        ref["std_pop"].append(statistics.pstdev(xs) if len(xs) > 1 else 0.0)
        ref["max"].append(max(xs) if xs else -math.inf)
        ref["min"].append(min(xs) if xs else math.inf)
    got = {
        "sum": ops.segment_sum(values, index, G),
        "count": ops.segment_count(index, G),
        "mean": ops.segment_mean(values, index, G),
        "std": ops.segment_std(values, index, G),
        "std_pop": ops.segment_std(values, index, G, unbiased=False),
        "max": ops.segment_max(values, index, G),
        "min": ops.segment_min(values, index, G),
    }
    for name, expected in ref.items():
        assert got[name].tolist() == pytest.approx(expected, abs=1e-12), name
    assert got["count"].dtype == torch.long


@pytest.mark.parametrize("seed", range(3))
def test_segment_sum_and_mean_of_rows(seed):
    index, _, G = uneven_groups(seed)
    values = torch.randn(index.numel(), 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for g in range(G):
        rows = members(index, values, g)
        total = sum(rows, torch.zeros(4, dtype=torch.float64))
        torch.testing.assert_close(ops.segment_sum(values, index, G)[g], total)
        torch.testing.assert_close(ops.segment_mean(values, index, G)[g], total / max(len(rows), 1))


@pytest.mark.parametrize("seed", range(3))
def test_group_normalize_matches_a_loop(seed):
    index, values, G = uneven_groups(seed)
    eps = 1e-6
    expected_std, expected_centred = [], []
    for i in range(len(index)):
        xs = [float(v) for v in members(index, values, int(index[i]))]
        centred = float(values[i]) - statistics.fmean(xs)
        std = statistics.stdev(xs) if len(xs) > 1 else 0.0
        expected_centred.append(centred)
        expected_std.append(centred / (std + eps))
    assert ops.group_normalize(values, index, G, epsilon=eps).tolist() == pytest.approx(expected_std, abs=1e-9)
    assert ops.group_normalize(values, index, G, scale_by_std=False).tolist() == pytest.approx(expected_centred, abs=1e-12)
    # a group of one has advantage 0, never NaN
    lonely = int((ops.segment_count(index, G) == 1).nonzero()[0])
    assert ops.group_normalize(values, index, G)[index == lonely].tolist() == [0.0]


def test_masked_sum_and_mean_match_a_loop():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    mask = (torch.rand(5, 6, generator=gen) > 0.4).double()
    mask[2] = 0  # a row without tokens
    rows_sum = [sum(float(values[r, t]) for t in range(6) if mask[r, t]) for r in range(5)]
    rows_cnt = [sum(1 for t in range(6) if mask[r, t]) for r in range(5)]
    assert ops.masked_sum(values, mask, dim=-1).tolist() == pytest.approx(rows_sum)
    assert ops.masked_mean(values, mask, dim=-1).tolist() == pytest.approx([s / max(c, 1) for s, c in zip(rows_sum, rows_cnt)])
    assert ops.masked_mean(values, mask, dim=-1)[2] == 0
    assert float(ops.masked_sum(values, mask)) == pytest.approx(sum(rows_sum))
    assert float(ops.masked_mean(values, mask)) == pytest.approx(sum(rows_sum) / sum(rows_cnt))
    assert float(ops.masked_mean(values, torch.zeros_like(mask))) == 0.0
    # soft weights weight the mean
    assert float(ops.masked_mean(torch.tensor([[2.0, 4.0]]), torch.tensor([[0.5, 1.5]]))) == pytest.approx((1 + 6) / 2)


def test_masked_statistics_ignore_nan_and_inf_in_padding():
    values = torch.tensor([[1.0, 3.0, float("nan")], [float("inf"), 2.0, float("-inf")]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    assert ops.masked_sum(values, mask, dim=-1).tolist() == [4.0, 2.0]
    assert ops.masked_mean(values, mask, dim=-1).tolist() == [2.0, 2.0]
    total = ops.global_masked_mean(values, mask.bool(), ParallelContext())
    assert float(total) == 2.0
    total.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[1 / 3, 1 / 3, 0.0], [0.0, 1 / 3, 0.0]]))


def test_single_process_global_statistics():
    values = torch.tensor([1.0, 2.0, 4.0, 7.0])
    mean, std = ops.global_mean_std(values, ParallelContext())
    assert (float(mean), float(std)) == pytest.approx((3.5, statistics.stdev([1, 2, 4, 7])))
    assert float(ops.global_mean_std(torch.tensor([3.0]), ParallelContext())[1]) == 0.0
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert float(ops.global_masked_mean(values[None], mask, ParallelContext())) == pytest.approx(1.5)
    assert not bool(ops.global_all_equal(values, ParallelContext()))
    assert bool(ops.global_all_equal(torch.full((3,), 0.1), ParallelContext()))
    assert bool(ops.global_all_equal(torch.tensor([]), ParallelContext()))  # nothing: equal


# ---------------------------------------------------------------- two real processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_global_statistics_across_two_gloo_processes(tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(11, generator=gen, dtype=torch.float64) * 3 + 1
    tokens = torch.randn(11, 5, generator=gen, dtype=torch.float64)
    mask = (torch.rand(11, 5, generator=gen) > 0.3).double()
    split = [0, 4, 11]  # uneven shards: 4 rows on rank 0, 7 on rank 1
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "fixtures"))
    from gloo_worker import rank_main  # importable by the spawned processes

    mp.spawn(rank_main, args=(2, _free_port(), values, tokens, mask, split, str(tmp_path)), nprocs=2, join=True)
    single = ParallelContext()
    mean, std = ops.global_mean_std(values, single)
    expected_token_mean = ops.global_masked_mean(tokens, mask, single)
    grads = []
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["mean"], mean)
        torch.testing.assert_close(got["std"], std)
        torch.testing.assert_close(got["token_mean"], expected_token_mean)
        torch.testing.assert_close(got["whole"], mean)
        assert got["all_equal"] == [False, True, True]  # a per-rank test would say True, True, True
        grads.append(got["grad"])
    # each rank's gradient is its share of the global mean: mask / global token count
    torch.testing.assert_close(torch.cat(grads), mask / mask.sum())
    assert float(std) == pytest.approx(statistics.stdev(values.tolist()))


def test_the_speed_benchmark_runs_and_agrees_with_its_loop_reference():
    """A smoke run of benchmarks/helpers.py at a small size (its timings are not checked)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "helpers.py"
    spec = importlib.util.spec_from_file_location("benchmark_helpers", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.run(5_000, [50, 2_000], tokens=10, repeats=1)
    loops = [r for r in report["results"] if "max_abs_diff_vs_vectorised" in r]
    assert len(loops) == 2 and max(r["max_abs_diff_vs_vectorised"] for r in loops) < 1e-12
    assert "| group_normalize | 5000 | 2000 |" in bench.markdown(report)


@pytest.mark.parametrize("scale_by_std", [True, False])
@pytest.mark.parametrize("size", [2, 3, 7, 12, 33, 64])
@pytest.mark.parametrize("value", [7.782482, 0.1, 1.0 / 3.0, 123.4, 9999.123, -4321.77, 1e4])
def test_constant_groups_get_exactly_zero_at_any_scale(size, value, scale_by_std):
    """A group whose rewards are all equal has no signal: exactly 0, not the rounding residue of its
    float32 mean divided by std + epsilon (12 x 7.782482 used to give -0.574)."""
    varied = torch.tensor([0.0, 1.0, 0.5])
    rewards = torch.cat([torch.full((size,), value), varied, torch.full((2,), value * 3)])
    index = torch.cat([torch.zeros(size, dtype=torch.long), torch.ones(3, dtype=torch.long), torch.full((2,), 2)])
    order = torch.randperm(rewards.numel(), generator=torch.Generator().manual_seed(size))
    out = ops.group_normalize(rewards[order], index[order], 3, scale_by_std=scale_by_std, epsilon=1e-6)
    constant = (index[order] != 1)
    assert torch.equal(out[constant], torch.zeros(int(constant.sum())))
    expected = varied - varied.mean()
    if scale_by_std:
        expected = expected / (varied.std() + 1e-6)
    back = torch.empty_like(out)
    back[order] = out
    assert torch.allclose(back[size:size + 3], expected, atol=1e-6)


def test_constant_groups_flags_exact_equality_only():
    values = torch.tensor([1.0, 1.0, 2.0, 2.0 + 1e-6, 5.0])
    index = torch.tensor([0, 0, 1, 1, 2])
    assert ops.constant_groups(values, index, 4).tolist() == [True, False, True, True]  # 1 member / empty: constant


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("by_score", [False, True])
def test_group_ranks_match_a_loop(seed, by_score):
    index, values, G = uneven_groups(seed)
    values = values.round(decimals=0) if by_score else None  # ties: broken by batch position
    ranks = ops.group_ranks(index, G, values)
    for g in range(G):
        rows = [i for i in range(len(index)) if int(index[i]) == g]
        expected = sorted(rows, key=lambda i: (float(values[i]), i)) if by_score else rows
        assert [int(ranks[i]) for i in expected] == list(range(len(rows)))


def test_group_ranks_of_a_grouped_batch_are_positions():
    index = torch.tensor([0, 0, 0, 1, 2, 2])
    assert ops.group_ranks(index, 3).tolist() == [0, 1, 2, 0, 0, 1]


def test_token_log_probs_and_entropy_at_a_temperature():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # p = (1/4, 3/4) at temperature 1
    tokens = torch.tensor([[1]])
    log_probs, entropy = ops.token_log_probs(logits, tokens, entropy=True)
    assert log_probs.item() == pytest.approx(math.log(0.75))
    assert entropy.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    # temperature 2 halves the logits: p(token 1) = sqrt(3) / (1 + sqrt(3)); no entropy asked
    log_probs, entropy = ops.token_log_probs(logits, tokens, temperature=2.0)
    assert log_probs.item() == pytest.approx(math.log(math.sqrt(3) / (1 + math.sqrt(3)))) and entropy is None
