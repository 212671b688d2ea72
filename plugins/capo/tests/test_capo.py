"""CAPO on the core alone: the card's worked example, the previewed update against a real AdamW step of a
linear head, the closed-form head gradient against autograd, edge cases and the property against GRPO.
The old policy is the core's reference model (:class:`grpo_plugins.probe.LinearProbe`) or a hand-built chunk."""

import pytest
import torch

from grpo_plugins import BatchError, Composition, CompositionError, GRPOBatch, TrainerCapabilities
from grpo_plugins.probe import LinearProbe, ProbeChunk
from grpo_plugin_capo import PROBE, curvature_mask, head_gradient, logit_change_statistics, loss_coefficients


def test_card_worked_example():
    # V = 2, p = [.5, .5] (zero head); dW maps h = [1, 0] to dz = [1, -1] and h = [.1, 0] to [.1, -.1]; y = 0
    chunk = ProbeChunk(rows=torch.arange(1), completion_ids=torch.zeros(1, 2, dtype=torch.long),
                       completion_mask=torch.ones(1, 2), group_index=torch.zeros(1, dtype=torch.long), num_groups=1,
                       hidden_states=torch.tensor([[[1.0, 0.0], [0.1, 0.0]]]), head_weight=torch.zeros(2, 2))
    stats = logit_change_statistics(chunk, torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    torch.testing.assert_close(stats["fisher"], torch.tensor([[1.0, 0.01]]))
    advantages = torch.tensor([[-1.0, 1.0]])
    torch.testing.assert_close(advantages * stats["first_order"], torch.tensor([[-1.0, 0.1]]))  # g
    keep, kl, curvature = curvature_mask(stats["fisher"], advantages, torch.ones(1, 2), 0.1, 1.0, "token")
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.005]]))
    torch.testing.assert_close(curvature, torch.tensor([[1.0, -0.01]]))
    assert keep.tolist() == [[0.0, 1.0]]  # KL 0.5 > 0.1: rejected; the second token is kept
    keep_rows, _, _ = curvature_mask(stats["fisher"], advantages, torch.ones(1, 2), 0.6, 1.0, "sequence")
    assert keep_rows.tolist() == [[1.0, 1.0]]  # the sums 0.505 <= 0.6 and 0.99 <= 1 keep the completion


def random_batch(seed=0, sizes=(3, 5, 2, 4), width=6, nan_padding=False, constant=False):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.repeat_interleave(torch.arange(len(sizes)) * 5 + 2, torch.tensor(sizes))
    ids = ids[torch.randperm(ids.numel(), generator=gen)]
    n = ids.numel()
    lengths = torch.randint(1, width + 1, (n,), generator=gen)
    lengths[0] = width
    mask = (torch.arange(width) < lengths[:, None]).float()
    tokens = torch.randint(0, 60, (n, width), generator=gen)
    if nan_padding:
        tokens = torch.where(mask > 0, tokens, 61)
    rewards = torch.ones(n) if constant else torch.randint(0, 2, (n,), generator=gen).float()
    return GRPOBatch(prompt_ids=ids, rewards=rewards, completion_ids=tokens, completion_mask=mask)


def run(batch, config=None, model=None, **preview):
    composition = Composition([{"capo": config or {}}])
    (model or LinearProbe(max_positions=16, temperature=0.7)).attach(batch, composition.needs()["capo"].probes,
                                                                     default_rows=3, **preview)
    return composition.run_advantage_stage(batch), composition


def test_head_gradient_equals_autograd():
    model = LinearProbe(max_positions=16, temperature=0.7)
    batch = random_batch()
    batch.advantages = torch.randn(batch.num_completions)
    mask = batch.completion_mask
    coefficients = loss_coefficients(batch.advantages, mask, "token_mean", mask.sum(), torch.tensor(16.0))
    request = Composition(["capo"]).needs()["capo"].probes[PROBE]
    ours = model.probe(batch, PROBE, request, default_rows=3).sum(
        lambda chunk: head_gradient(chunk, coefficients[chunk.rows]))["grad"]
    weight = model.head.clone().requires_grad_(True)
    logits = model.hidden_states(batch.prompt_ids, batch.completion_ids) @ weight.T / 0.7
    log_probs = torch.log_softmax(logits, -1).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
    (coefficients * log_probs).sum().backward()
    torch.testing.assert_close(ours, weight.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_preview_is_the_real_adamw_step_of_the_head(aggregation):
    model = LinearProbe(max_positions=16, temperature=0.7)
    batch = random_batch()
    staged, composition = run(batch, {"kl_threshold": 1e9, "curvature_threshold": 1e9, "loss_aggregation": aggregation},
                              model=model, learning_rate=0.05, weight_decay=0.1)
    capo = composition.method("capo")
    preview = capo.preview_update(staged)
    # the same loss through autograd and one real torch.optim.AdamW step on the head
    weight = torch.nn.Parameter(model.head.clone())
    optimizer = torch.optim.AdamW([weight], lr=0.05, weight_decay=0.1)
    mask = staged.completion_mask
    logits = model.hidden_states(staged.prompt_ids, staged.completion_ids) @ weight.T / 0.7
    log_probs = torch.log_softmax(logits, -1).gather(-1, staged.completion_ids.unsqueeze(-1)).squeeze(-1)
    terms = torch.where(mask > 0, -staged.advantages[:, None] * log_probs, 0.0)
    loss = terms.sum() / mask.sum() if aggregation == "token_mean" else (terms.sum(1) / mask.sum(1)).mean()
    loss.backward()
    before = weight.detach().clone()
    optimizer.step()
    torch.testing.assert_close(preview, weight.detach() - before, rtol=1e-4, atol=1e-7)


def test_preview_uses_the_optimiser_state():
    fresh, _ = run(random_batch(), {"kl_threshold": 1e9, "curvature_threshold": 1e9})
    warm, composition = run(random_batch(), {"kl_threshold": 1e9, "curvature_threshold": 1e9}, step=3, state_seed=1)
    first = Composition(["capo"]).method("capo").preview_update(fresh)
    assert not torch.allclose(first, composition.method("capo").preview_update(warm))


def test_tight_thresholds_mask_tokens_and_sequences():
    staged, composition = run(random_batch(), {"kl_threshold": 0.01}, learning_rate=0.05)
    metrics = composition.pop_metrics()
    keep = staged.completion_mask > 0
    w = staged.token_weights[keep]
    assert set(w.unique().tolist()) == {0.0, 1.0}
    assert metrics["plugins/capo/rejected_fraction"] == pytest.approx(float((w == 0).float().mean()))
    rows, _ = run(random_batch(), {"kl_threshold": 0.03, "granularity": "sequence"}, learning_rate=0.05)
    per_row = rows.token_weights
    assert bool(((per_row == 0).all(1) | (per_row == 1).all(1)).all())  # whole completions kept or dropped
    assert 0 < int((per_row == 0).all(1).sum()) < per_row.shape[0]


def test_negative_advantages_are_rejected_first():
    # curvature c = -A q > 0 only where A < 0: with curvature_threshold 0 and no KL limit, exactly those go
    staged, _ = run(random_batch(), {"kl_threshold": 1e9, "curvature_threshold": 0.0}, learning_rate=0.05)
    keep = staged.completion_mask > 0
    negative = (staged.advantages[:, None] < 0).expand_as(keep)
    assert bool((staged.token_weights[keep & negative] == 0).all())
    assert bool((staged.token_weights[keep & ~negative] == 1).all())


def test_loose_thresholds_are_plain_grpo():
    staged, _ = run(random_batch(), {"kl_threshold": 1e9, "curvature_threshold": 1e9})
    plain = Composition().run_advantage_stage(random_batch())
    torch.testing.assert_close(staged.advantages, plain.advantages)
    assert bool((staged.token_weights == 1).all())


def test_constant_groups_move_nothing_and_reject_nothing():
    staged, composition = run(random_batch(constant=True), {"kl_threshold": 0.0, "curvature_threshold": 0.0})
    assert bool((staged.advantages == 0).all()) and bool((staged.token_weights == 1).all())
    assert composition.pop_metrics()["plugins/capo/update_norm"] == 0.0


def test_nan_and_junk_in_padding_are_ignored():
    clean, _ = run(random_batch(seed=4), {"kl_threshold": 0.01}, learning_rate=0.05)
    padded, _ = run(random_batch(seed=4, nan_padding=True), {"kl_threshold": 0.01}, learning_rate=0.05)
    keep = clean.completion_mask > 0
    torch.testing.assert_close(padded.token_weights[keep], clean.token_weights[keep])


def test_rejecting_every_token_is_an_error_naming_capo():
    with pytest.raises(BatchError, match="capo"):
        run(random_batch(), {"kl_threshold": 0.0}, learning_rate=0.05)


def test_nan_rewards_are_refused():
    batch = random_batch()
    batch.rewards[1] = float("nan")
    with pytest.raises(BatchError, match="finite|NaN"):
        run(batch)


def test_needs_and_refusals():
    composition = Composition(["capo"])
    needs = composition.needs()["capo"]
    assert needs.probes[PROBE].update_preview and {"old_policy_probe", "update_preview"} <= needs.features
    caps = TrainerCapabilities.standard("a trainer", settings={"on_policy": False, "loss_aggregation": "token_mean"})
    problems = composition.capability_problems(caps)
    for fragment in ("old_policy_probe", "update_preview", "on_policy"):
        assert any(fragment in p and "'capo'" in p for p in problems)
    with pytest.raises(CompositionError, match="kl_threshold"):
        Composition([{"capo": {"kl_threshold": -1.0}}])
