"""The old-policy probe and the update preview of the core (grpo_plugins.probe): chunk planning, streaming,
logits blocks and top-k, the optimiser previews against torch's own optimisers, and the needs they imply."""

from pathlib import Path

import pytest
import torch

from grpo_plugins import CompositionError, GRPOBatch, Method, Needs, hookimpl
from grpo_plugins.composition import Composition
from grpo_plugins.probe import LinearProbe, OldPolicyProbe, ProbeRequest, UpdatePreview, plan_chunks


def test_plan_chunks_rows_and_whole_groups():
    index = torch.tensor([2, 0, 1, 0, 2, 1, 1, 3])
    assert [c.tolist() for c in plan_chunks(index, ProbeRequest(max_rows=3), 8)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    # whole groups in order of first appearance (2, 0, 1, 3), packed while they fit in 4 rows
    chunks = plan_chunks(index, ProbeRequest(whole_groups=True, max_rows=4), 8)
    assert [c.tolist() for c in chunks] == [[0, 4, 1, 3], [2, 5, 6, 7]]
    # a group larger than the bound is a chunk of its own
    assert [c.tolist() for c in plan_chunks(index, ProbeRequest(whole_groups=True, max_rows=2), 8)] == [
        [0, 4], [1, 3], [2, 5, 6], [7]]


def batch_of(sizes=(3, 2, 4), width=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    ids = ids[torch.randperm(ids.numel(), generator=gen)]
    n = ids.numel()
    mask = (torch.arange(width) < torch.randint(1, width + 1, (n,), generator=gen)[:, None]).float()
    return GRPOBatch(prompt_ids=ids, rewards=torch.zeros(n), completion_ids=torch.randint(0, 30, (n, width), generator=gen),
                     completion_mask=mask)


def test_map_sum_and_cache_against_the_whole_batch():
    model, batch = LinearProbe(vocab_size=40, max_positions=8), batch_of()
    request = ProbeRequest(whole_groups=True, max_rows=4)
    probe = model.probe(batch, "p", request)
    full = torch.log_softmax(model.hidden_states(batch.prompt_ids, batch.completion_ids) @ model.head.T, -1)
    out = probe.map(lambda chunk: {"log_probs": chunk.log_probs(), "group": batch.group_index[chunk.rows]})
    torch.testing.assert_close(out["log_probs"], full)
    assert out["group"].tolist() == batch.group_index.tolist()  # every row back in its place
    total = probe.sum(lambda chunk: {"tokens": chunk.completion_mask.sum()})["tokens"]
    assert float(total) == float(batch.completion_mask.sum())
    assert probe.forward_calls == 2 * len(probe.chunks)  # no cache: each pass runs the forward again
    cached = OldPolicyProbe("p", batch.num_completions, probe.chunks, probe.forward, cache_elements=10**6)
    cached.sum(lambda chunk: {"x": chunk.hidden_states.sum()})
    cached.map(lambda chunk: {"x": chunk.hidden_states[:, 0, 0]})
    assert cached.forward_calls == len(probe.chunks)
    with pytest.raises(ValueError, match="first dimension"):
        probe.map(lambda chunk: {"bad": torch.zeros(chunk.num_rows + 1)})


def test_equal_forwards_over_two_gloo_processes(tmp_path, monkeypatch):
    """Three chunks on two ranks: rank 0 owns two, rank 1 one. With ``equal_forwards`` each rank runs two
    forwards (rank 1 runs its chunk again and discards it), so a forward taking part in a collective (FSDP's
    parameter gathers; here an all_reduce) does not hang; the results equal one process's."""
    import socket

    import torch.multiprocessing as mp

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "fixtures"))
    from probe_gloo_worker import probe_batch, rank_main  # importable by the spawned processes

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    model, batch = LinearProbe(vocab_size=40, max_positions=8), probe_batch()
    single = model.probe(batch, "p", ProbeRequest(whole_groups=True, max_rows=3))
    assert len(single.chunks) == 3
    expected = single.map(lambda chunk: {"log_probs": chunk.log_probs()})["log_probs"]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    for got in ranks:
        torch.testing.assert_close(got["map"], expected)
        assert float(got["sum"]) == float(batch.completion_mask.sum())
    assert [got["forwards"] for got in ranks] == [4, 4]  # map and sum: two forwards each on both ranks
    assert [got["plain_forwards"] for got in ranks] == [2, 1]  # without the option: the round-robin share


def test_equal_forwards_on_one_process_changes_nothing():
    model, batch = LinearProbe(vocab_size=40, max_positions=8), batch_of()
    probe = model.probe(batch, "p", ProbeRequest(max_rows=2))
    even = OldPolicyProbe("p", batch.num_completions, probe.chunks, probe.forward, equal_forwards=True,
                          cache_elements=10**6)
    torch.testing.assert_close(even.map(lambda chunk: {"x": chunk.log_probs()})["x"],
                               probe.map(lambda chunk: {"x": chunk.log_probs()})["x"])
    even.sum(lambda chunk: {"n": chunk.completion_mask.sum()})
    assert even.forward_calls == 2 * len(probe.chunks)  # the cache is off under equal_forwards


def test_logits_blocks_and_top_k():
    model, batch = LinearProbe(vocab_size=40, max_positions=8, temperature=0.5), batch_of()
    chunk = model.chunk(batch, torch.arange(4), ProbeRequest(logits_budget=4 * 40 * 2))
    assert [(b.start, b.stop) for b in chunk.position_blocks()] == [(0, 2), (2, 4), (4, 5)]
    blocks = torch.cat([chunk.logits(b) for b in chunk.position_blocks()], dim=1)
    torch.testing.assert_close(blocks, chunk.logits())
    torch.testing.assert_close(chunk.logits(), chunk.hidden_states @ model.head.T / 0.5)
    values, ids = chunk.top_k(3, slice(1, 3))
    full = torch.log_softmax(chunk.logits(slice(1, 3)), -1)
    torch.testing.assert_close(values, full.gather(-1, ids))  # normalised over the whole vocabulary
    assert bool((values[..., 0] >= values[..., 1]).all()) and float(full.max(-1).values.sub(values[..., 0]).abs().max()) == 0


def adam_preview_after_real_steps(optimizer_cls, **options):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(6, 3))
    optimizer = optimizer_cls([weight], lr=0.01, **options)
    for _ in range(2):
        weight.grad = torch.randn(6, 3)
        optimizer.step()
    grad = torch.randn(6, 3)
    state, group = optimizer.state[weight], optimizer.param_groups[0]
    return weight, optimizer, grad, state, group


@pytest.mark.parametrize("cls, decoupled", [(torch.optim.AdamW, True), (torch.optim.Adam, False)])
def test_adam_preview_equals_the_optimiser_step(cls, decoupled):
    weight, optimizer, grad, state, group = adam_preview_after_real_steps(cls, weight_decay=0.1)
    preview = UpdatePreview(weight=weight.detach().clone(), learning_rate=group["lr"], step=int(state["step"]),
                            exp_avg=state["exp_avg"].clone(), exp_avg_sq=state["exp_avg_sq"].clone(),
                            betas=group["betas"], eps=group["eps"], weight_decay=0.1, decoupled_weight_decay=decoupled)
    delta = preview.step_for(grad)
    before = weight.detach().clone()
    weight.grad = grad
    optimizer.step()
    torch.testing.assert_close(delta, weight.detach() - before, rtol=1e-5, atol=2e-7)  # float32 rounding of W


def test_sgd_preview_equals_the_optimiser_step():
    weight, optimizer, grad, state, group = adam_preview_after_real_steps(torch.optim.SGD, momentum=0.9, weight_decay=0.1)
    preview = UpdatePreview(weight=weight.detach().clone(), learning_rate=0.01, optimizer="sgd", momentum=0.9,
                            momentum_buffer=state["momentum_buffer"].clone(), weight_decay=0.1)
    delta = preview.step_for(grad)
    before = weight.detach().clone()
    weight.grad = grad
    optimizer.step()
    torch.testing.assert_close(delta, weight.detach() - before, rtol=1e-5, atol=2e-7)  # float32 rounding of W


def test_needs_imply_the_features_and_refuse_bad_requests():
    needs = Needs(probes={"p": ProbeRequest(update_preview=True)})
    assert {"old_policy_probe", "update_preview"} <= needs.features
    assert Needs(probes={"p": ProbeRequest()}).features == {"old_policy_probe"}
    assert (Needs() | needs).probes == needs.probes

    class BadProbe(Method):
        name = "bad_probe"

        def needs(self):
            return Needs(probes={"p": ProbeRequest(max_rows=0)})

        @hookimpl
        def observe(self, batch, step):
            pass

    with pytest.raises(CompositionError, match="max_rows"):
        Composition([BadProbe()])
