"""Loss objectives, whole groups and the reference-model hint on verl (real verl pieces, CPU)."""

from __future__ import annotations

import pickle

import pytest
import torch

from grpo_plugins import CompositionError, LossTerm, LossTotals
from grpo_plugins.objectives import contiguous_group_order, incomplete_groups
from grpo_plugins_verl.objectives import (
    GROUP_INDEX, GROUP_SIZE, check_micro_batch, group_fields, objective_loss, run_context, whole_group_order,
)
from grpo_plugins_verl.testing import run_config


def test_group_fields_put_each_completion_on_its_verl_row_and_padding_in_groups_of_one():
    group_index = torch.tensor([1, 0, 1, 0, 1, 2])  # sizes 2, 3, 1
    sizes = torch.tensor([2, 3, 1])
    rows = torch.tensor([4, 0, 2, 7, 1, 3])  # verl rows 5 and 6 are padding
    fields = group_fields(group_index, sizes, rows, 8)
    assert fields[GROUP_INDEX].tolist() == [0, 1, 1, 2, 1, 8, 9, 0]
    assert fields[GROUP_SIZE].tolist() == [2, 3, 3, 1, 3, 1, 1, 2]


def test_whole_group_order_gives_each_rank_whole_balanced_groups():
    groups = torch.tensor([2, 0, 1, 3, 0, 2, 1, 3, 3, 2, 1, 0])  # 4 groups of 3, scattered as verl balances rows
    sizes = torch.full((12,), 3)
    workloads = [float(w) for w in (5, 1, 9, 2, 1, 5, 9, 2, 2, 5, 9, 1)]  # group work: 15, 3, 27, 6
    order = whole_group_order(groups, sizes, workloads, dp_size=2, group_size=3, methods=["toy"])
    assert sorted(order) == list(range(12))
    ordered = groups[order].view(2, 2, 3)  # rank, group, row
    assert bool((ordered == ordered[:, :, :1]).all())  # each group's rows together
    assert sorted(ordered[:, :, 0].flatten().tolist()) == [0, 1, 2, 3]
    work = {0: 3, 1: 27, 2: 15, 3: 6}
    per_rank = [sum(work[int(g)] for g in rank[:, 0]) for rank in ordered]
    assert sorted(per_rank) == [21, 30]  # 15 + 6 and 27 + 3: the balanced split of groups
    for rank in ordered:  # rows of a group keep their order
        for group in rank[:, 0].tolist():
            rows = [i for i in order if int(groups[i]) == group]
            assert rows == sorted(rows)


def test_whole_group_order_shuffles_groups_not_rows_with_a_seeded_generator():
    groups = torch.arange(8).repeat_interleave(2)
    sizes = torch.full((16,), 2)
    first = whole_group_order(groups, sizes, [1.0] * 16, 1, 2, ["toy"], torch.Generator().manual_seed(3))
    again = whole_group_order(groups, sizes, [1.0] * 16, 1, 2, ["toy"], torch.Generator().manual_seed(3))
    plain = whole_group_order(groups, sizes, [1.0] * 16, 1, 2, ["toy"])
    assert first == again and plain == list(range(16)) and first != plain
    pairs = groups[first].view(8, 2)
    assert bool((pairs[:, 0] == pairs[:, 1]).all())


@pytest.mark.parametrize("sizes, dp", [([3, 3, 1], 1), ([3, 3, 3], 2)])
def test_whole_group_order_refuses_groups_it_cannot_keep_whole(sizes, dp):
    groups = torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))
    with pytest.raises(CompositionError, match=r"method\(s\) \['copg'\] need whole groups.*rollout.n=3"):
        whole_group_order(groups, torch.tensor(sizes).repeat_interleave(torch.tensor(sizes)), [1.0] * len(groups), dp, 3, ["copg"])


def test_a_micro_batch_with_part_of_a_group_is_refused_naming_the_methods():
    check_micro_batch(torch.tensor([4, 4, 9]), torch.tensor([2, 2, 1]), ["disco"])
    assert incomplete_groups(torch.tensor([4, 4, 9]), torch.tensor([3, 3, 1])).tolist() == [True, True, False]
    with pytest.raises(CompositionError, match=r"\['disco'\].*2 of its 3 rows.*use_dynamic_bsz=False"):
        check_micro_batch(torch.tensor([4, 4, 9]), torch.tensor([3, 3, 1]), ["disco"])


def test_contiguous_group_order_follows_the_given_group_order():
    order = contiguous_group_order(torch.tensor([1, 0, 1, 2, 0]), torch.tensor([2, 0, 1]))
    assert order.tolist() == [3, 1, 4, 0, 2]


def terms(values: torch.Tensor, per_sequence: torch.Tensor) -> dict[str, LossTerm]:
    return {"toy/token": LossTerm(values, "token"), "toy/sequence": LossTerm(values, "sequence"),
            "toy/group": LossTerm(per_sequence, "group"), "toy/sum": LossTerm(values, "sum")}


def test_micro_batch_shares_on_every_rank_add_up_to_the_term_over_the_mini_batch():
    """verl's batch info (global tokens, global rows, dp size) as ``ppo_loss`` reads it: summed over the
    micro-batches of each rank and averaged over ranks (DDP / FSDP), the shares give each term over the
    whole mini-batch, value and gradient."""
    gen = torch.Generator().manual_seed(0)
    rows, width, n = 12, 5, 3
    lengths = torch.randint(1, width + 1, (rows,), generator=gen)
    mask = (torch.arange(width) < lengths[:, None]).float()
    values = torch.randn(rows, width, generator=gen).requires_grad_(True)
    per_sequence = torch.randn(rows, generator=gen).requires_grad_(True)
    group_size = torch.full((rows,), n)
    info = {"dp_size": 2, "batch_num_tokens": int(mask.sum()), "global_batch_size": rows}
    totals = LossTotals(tokens=float(mask.sum()), sequences=float(rows), groups=float(rows // n))
    expected = {name: term.reduce(mask, totals, group_size) for name, term in terms(values, per_sequence).items()}
    expected_grad = torch.autograd.grad(sum(expected.values()), [values, per_sequence])
    shares: dict[str, torch.Tensor] = {}
    total = 0.0
    for rank in range(2):  # rows 0-5 on rank 0, 6-11 on rank 1, micro-batches of one group
        for start in range(rank * 6, rank * 6 + 6, n):
            part = slice(start, start + n)
            loss, parts = objective_loss(terms(values[part], per_sequence[part]), mask[part], info, group_size[part], n)
            total = total + loss / info["dp_size"]  # the gradient average over ranks
            for name, value in parts.items():
                shares[name] = shares.get(name, 0.0) + value.detach() / info["dp_size"]
    for name, value in expected.items():
        torch.testing.assert_close(shares[name], value.detach(), rtol=1e-6, atol=1e-7)
    grad = torch.autograd.grad(total, [values, per_sequence])
    for ours, theirs in zip(grad, expected_grad):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_without_global_batch_info_the_micro_batch_counts_normalise():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    values = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 5.0, 6.0]])
    total, shares = objective_loss(terms(values, torch.tensor([1.0, 3.0])), mask, {}, None, 2)
    assert shares["toy/token"].item() == pytest.approx(7 / 3) and shares["toy/sequence"].item() == pytest.approx(2.75)
    assert shares["toy/group"].item() == pytest.approx(2.0) and shares["toy/sum"].item() == 7.0
    assert objective_loss({}, mask, {}, None, 2) == (0.0, {})


def test_setup_context_carries_the_run_seed_and_survives_the_trip_to_the_workers():
    config = run_config("data.seed=7", "actor_rollout_ref.rollout.n=4")
    context = run_context(config, None, 32, 10, {"group_size": 4})
    assert (context.seed, context.dataset_size, context.total_steps, context.trainer) == (7, 32, 10, "verl")
    assert pickle.loads(pickle.dumps(context)) == context
    assert run_context(run_config(), None, None, None, {}).seed == 1  # data.seed unset: the prompt sampler's seed


def test_the_reference_model_hint_leaves_loss_and_gradient_unchanged_bit_for_bit():
    """``use_kl_loss=True`` with ``kl_loss_coef=0`` (what the refusal of a method reading reference
    log-probs suggests) adds ``0 x KL`` to the loss: the same loss and gradient, bit for bit."""
    from grpo_plugins_verl.testing import verl_loss_on_batch

    gen = torch.Generator().manual_seed(1)
    n, t = 8, 5
    lengths = torch.randint(1, t + 1, (n,), generator=gen)
    mask = (torch.arange(t) < lengths[:, None]).long()
    old = torch.where(mask > 0, -torch.rand(n, t, generator=gen) * 3, 0.0)
    batch = dict(prompt_ids=torch.arange(2).repeat_interleave(4), rewards=torch.rand(n, generator=gen),
                 completion_ids=torch.randint(3, 16, (n, t), generator=gen) * mask, completion_mask=mask,
                 old_log_probs=old, log_probs=torch.where(mask > 0, old + 0.3 * torch.randn(n, t, generator=gen), 0.0),
                 ref_log_probs=torch.where(mask > 0, old - 0.5 * torch.rand(n, t, generator=gen), 0.0))
    for mode in ("token-mean", "seq-mean-token-mean"):
        plain = verl_loss_on_batch(["sapo"], **batch, loss_agg_mode=mode)
        hinted = verl_loss_on_batch(["sapo"], **batch, loss_agg_mode=mode, use_kl_loss=True, kl_loss_coef=0.0)
        assert torch.equal(plain.loss, hinted.loss) and torch.equal(plain.grad, hinted.grad)
