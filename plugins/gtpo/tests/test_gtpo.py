"""GTPO: the card's worked examples by hand, conflict detection against a loop reference, edge cases,
the unclipped loss, and a real TRL run."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_plugins import BatchError, Composition, GRPOBatch, LossInputs, Method, hookimpl
from grpo_plugin_gtpo import conflict_masks, entropy_rule, reinforce_loss

THINK, A, B, ANS, C, D, E, PAD = 1, 2, 3, 9, 4, 5, 6, 0


def group_batch(ids, lengths, rewards, prompt_ids=None, surprisal=None) -> GRPOBatch:
    """One batch from explicit token ids, lengths and rewards; ``surprisal`` sets -old_log_probs per row."""
    ids = torch.tensor(ids)
    n, t = ids.shape
    mask = (torch.arange(t) < torch.tensor(lengths)[:, None]).float()
    surprisal = torch.full((n,), 0.1) if surprisal is None else torch.tensor(surprisal)
    return GRPOBatch(
        prompt_ids=torch.tensor(prompt_ids if prompt_ids is not None else [0] * n),
        rewards=torch.tensor(rewards, dtype=torch.float32),
        completion_ids=ids * mask.long(),
        completion_mask=mask,
        old_log_probs=-surprisal[:, None] * mask,
    )


def card_batch(**kwargs) -> GRPOBatch:
    ids = [[THINK, A, B, ANS], [THINK, C, ANS, PAD], [THINK, D, E, ANS]]
    return group_batch(ids, [4, 3, 4], [1.0, 0.0, 1.0], **kwargs)


def test_card_worked_example_conflict_weights():
    batch = Composition(["gtpo"]).run_advantage_stage(card_batch())
    # A = r - mean = [1/3, -2/3, 1/3]; mean entropy 0.1 <= 0.7 -> A' = A - 0.1 * 0.1
    assert batch.advantages.tolist() == pytest.approx([1 / 3 - 0.01, -2 / 3 - 0.01, 1 / 3 - 0.01], abs=1e-6)
    # <think> at position 0 and </ans> as last token conflict: doubled in positives, dropped in the negative
    weights = batch.token_weights * batch.completion_mask
    assert weights.tolist() == [[2, 1, 1, 2], [0, 1, 0, 0], [2, 1, 1, 2]]
    assert batch.row_data["gtpo_conflicts"].tolist() == [2, 2, 2]


def test_conflict_tokens_keep_the_completion_length_as_normaliser():
    """The released code's loss: sum_t -(A delta_t) / |o| per completion, then the mean over completions.
    The weights multiply the policy loss; a conflict token of a negative completion (weight 0) still
    counts in |o| (the adapters' mask_tokens semantics)."""
    comp = Composition(["gtpo"])
    batch = comp.run_advantage_stage(card_batch())
    mask = batch.completion_mask
    log_probs = torch.zeros(3, 4, requires_grad=True)
    inputs = LossInputs(log_probs=log_probs, old_log_probs=torch.zeros(3, 4),
                        advantages=batch.advantages[:, None].expand(3, 4), mask=mask, row_data=dict(batch.row_data))
    per_token = comp.run_loss_stage(inputs, lambda i: torch.zeros_like(i.log_probs)).policy * batch.token_weights
    loss = ((per_token * mask).sum(1) / mask.sum(1)).mean()
    loss.backward()
    a_pos, a_neg = 1 / 3 - 0.01, -2 / 3 - 0.01
    # rows: -a_pos (2+1+1+2)/4, -a_neg (0+1+0)/3 (not /1), -a_pos (2+1+1+2)/4
    assert loss.item() == pytest.approx((-a_pos * 6 / 4 - a_neg / 3 - a_pos * 6 / 4) / 3, abs=1e-6)
    assert log_probs.grad[1].tolist() == pytest.approx([0.0, -a_neg / 9, 0.0, 0.0], abs=1e-6)
    assert log_probs.grad[0].tolist() == pytest.approx([-a_pos * w / 12 for w in (2, 1, 1, 2)], abs=1e-6)


def test_card_worked_example_entropy_rule():
    ids = [[A, B], [C, D], [D, E], [E, A]]
    batch = group_batch(ids, [2, 2, 2, 2], [1.0, 0.0, 0.0, 0.0], surprisal=[0.2, 0.9, 0.5, 0.7])
    out = Composition(["gtpo"]).run_advantage_stage(batch)
    # A = [0.75, -0.25, -0.25, -0.25]; H = [0.2, 0.9, 0.5, 0.7]
    assert out.advantages.tolist() == pytest.approx([0.73, 0.0, -0.30, -0.32], abs=1e-6)
    assert entropy_rule(torch.tensor([0.75, -0.25]), torch.tensor([0.7, 0.7001])).tolist() == pytest.approx(
        [0.68, 0.0], abs=1e-6)


def test_doubly_flagged_positive_token_weighs_four():
    # one token long: it is both the first and the last token of each completion
    batch = Composition(["gtpo"]).run_advantage_stage(group_batch([[A], [A], [B]], [1, 1, 1], [1.0, 0.0, 0.0]))
    assert (batch.token_weights * batch.completion_mask).flatten().tolist() == [4, 0, 1]


def reference_conflicts(ids, mask, adv, index):
    """Direct transcription of the card's definition, one completion and one position at a time."""
    n, t = ids.shape
    fwd = torch.zeros(n, t, dtype=torch.bool)
    bwd = torch.zeros(n, t, dtype=torch.bool)
    real = [[c for c in range(t) if mask[i, c] > 0] for i in range(n)]
    for i in range(n):
        if adv[i] == 0:
            continue
        opposite = [j for j in range(n) if index[j] == index[i] and adv[j] * adv[i] < 0]
        for c in real[i]:  # prefix run
            if not any(mask[j, c] > 0 and ids[j, c] == ids[i, c] for j in opposite):
                break
            fwd[i, c] = True
        for c in reversed(real[i]):  # suffix run, positions counted from the last real token
            s = real[i][-1] - c
            hit = any(real[j] and real[j][-1] - s >= 0 and mask[j, real[j][-1] - s] > 0
                      and ids[j, real[j][-1] - s] == ids[i, c] for j in opposite)
            if not hit:
                break
            bwd[i, c] = True
    return fwd, bwd


@pytest.mark.parametrize("block", [1, 3, 64])
def test_vectorised_detection_matches_the_definition(block):
    gen = torch.Generator().manual_seed(7)
    for _ in range(25):
        n, t = 11, 7
        ids = torch.randint(0, 3, (n, t), generator=gen)
        mask = (torch.rand(n, t, generator=gen) > 0.2).float()  # holes too, not only right padding
        adv = torch.randint(-1, 2, (n,), generator=gen).float()
        index = torch.randint(0, 3, (n,), generator=gen)
        expected = reference_conflicts(ids, mask, adv, index)
        got = conflict_masks(ids, mask, adv, index, int(index.max()) + 1, block=block)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_zero_variance_group_one_and_uneven_groups_get_no_conflicts():
    ids = [[A, B], [A, B], [A, B], [A, C], [A, B], [A, B]]
    # group 0: all correct (A = 0); group 1: a single completion; group 2: [1, 0, 0] uneven
    batch = group_batch(ids, [2] * 6, [1.0, 1.0, 1.0, 0.0, 0.0, 1.0], prompt_ids=[0, 0, 1, 2, 2, 2])
    out = Composition(["gtpo"]).run_advantage_stage(batch)
    weights = out.token_weights
    assert torch.all(weights[:3] == 1)  # zero-variance group and the group of one are untouched
    # group 2: positive [A,B] vs negatives [A,C], [A,B]: position 0 forward, last token B backward
    assert weights[3:].tolist() == [[0, 1], [0, 0], [4, 4]]


def test_all_tokens_masked_in_a_row_and_per_token_advantages():
    batch = card_batch()
    batch.completion_mask[1] = 0
    out = Composition(["gtpo"]).run_advantage_stage(batch)
    # the masked negative shares nothing; its advantage is not shifted by an entropy (H = 0)
    assert torch.all(out.token_weights == 1)
    assert out.advantages[1].item() == pytest.approx(-2 / 3, abs=1e-6)
    forward, backward = conflict_masks(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3),
                                       torch.tensor([1.0, -1.0]), torch.zeros(2, dtype=torch.long), 1)
    assert not forward.any() and not backward.any()


class TokenAdvantages(Method):
    """A per-token estimator: r - group mean on every real token."""

    name = "token_advantages"

    @hookimpl
    def compute_advantages(self, batch):
        centred = batch.rewards - batch.rewards.mean()  # the test batches hold one group
        return centred[:, None] * batch.token_mask


def test_per_token_advantages_from_another_estimator():
    comp = Composition([TokenAdvantages(), {"gtpo": {"own_advantages": False}}])
    out = comp.run_advantage_stage(card_batch())
    assert out.advantages.shape == (3, 4)
    assert (out.token_weights * out.completion_mask).tolist() == [[2, 1, 1, 2], [0, 1, 0, 0], [2, 1, 1, 2]]
    assert out.advantages[0, 0].item() == pytest.approx(1 / 3 - 0.01, abs=1e-6)


def test_sampled_and_policy_entropy_paths_agree_when_the_entropies_agree():
    surprisal = [0.2, 0.9, 0.5]
    losses = []
    for source in ("sampled", "policy"):
        comp = Composition([{"gtpo": {"entropy_source": source}}])
        batch = comp.run_advantage_stage(card_batch(surprisal=surprisal))
        mask = batch.completion_mask
        weights = batch.token_weights * mask
        inputs = LossInputs(log_probs=torch.zeros(3, 4, requires_grad=True), old_log_probs=torch.zeros(3, 4),
                            advantages=_broadcast(batch.advantages, mask) * weights, mask=mask,
                            entropies=torch.tensor(surprisal)[:, None] * mask, row_data=dict(batch.row_data))
        losses.append(comp.run_loss_stage(inputs, lambda i: torch.zeros_like(i.log_probs)).policy)
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    assert losses[0][1].abs().sum() == 0  # H = 0.9 > 0.7: the negative completion is filtered out


def _broadcast(advantages, mask):
    return advantages[:, None].expand_as(mask) if advantages.dim() == 1 else advantages


def test_nan_rewards_and_missing_inputs_are_clear_errors():
    batch = card_batch()
    batch.rewards[0] = float("nan")
    with pytest.raises(BatchError, match="NaN"):
        Composition(["gtpo"]).run_advantage_stage(batch)
    batch = card_batch()
    batch.old_log_probs = None
    with pytest.raises(Exception, match="old log-probs"):
        Composition([{"gtpo": {"entropy_source": "sampled"}}]).run_advantage_stage(batch)
    with pytest.raises(Exception, match="old log-probs"):  # no old log-probs and no own loss to defer to
        Composition([{"gtpo": {"unclipped_loss": False}}]).run_advantage_stage(card_batch_without_old())
    with pytest.raises(Exception):
        Composition([{"gtpo": {"entropy_source": "policy", "unclipped_loss": False}}])
    # without the entropy rule nothing else needs them
    Composition([{"gtpo": {"entropy_filter": False}}]).run_advantage_stage(card_batch_without_old())


def card_batch_without_old() -> GRPOBatch:
    batch = card_batch()
    batch.old_log_probs = None
    return batch


def test_entropy_rule_deferred_to_the_loss_with_the_policy_entropy():
    # no old log-probs (a fully on-policy trainer): 'auto' applies the rule in the loss with LossInputs.entropies
    comp = Composition(["gtpo"])
    batch = comp.run_advantage_stage(card_batch_without_old())
    assert batch.advantages.tolist() == pytest.approx([1 / 3, -2 / 3, 1 / 3], abs=1e-6)  # not shifted yet
    weights = batch.token_weights * batch.completion_mask
    # an adapter that folds the token weights into the advantages (the mask stays the completion mask)
    inputs = LossInputs(log_probs=torch.zeros(3, 4, requires_grad=True), old_log_probs=torch.zeros(3, 4),
                        advantages=batch.advantages[:, None] * weights, mask=batch.completion_mask,
                        entropies=torch.full((3, 4), 0.1), row_data=dict(batch.row_data))
    policy = comp.run_loss_stage(inputs, lambda i: torch.zeros_like(i.log_probs)).policy
    expected = -(torch.tensor([1 / 3, -2 / 3, 1 / 3]) - 0.01)[:, None] * weights
    assert torch.allclose(policy, expected, atol=1e-6)
    # the card's entropy example, now through the loss: A' = [0.73, 0, -0.30, -0.32]
    ids = [[A, B], [C, D], [D, E], [E, A]]
    plain = group_batch(ids, [2] * 4, [1.0, 0.0, 0.0, 0.0])
    plain.old_log_probs = None
    batch = comp.run_advantage_stage(plain)
    entropies = torch.tensor([0.2, 0.9, 0.5, 0.7])[:, None].expand(4, 2)
    inputs = LossInputs(log_probs=torch.zeros(4, 2, requires_grad=True), old_log_probs=torch.zeros(4, 2),
                        advantages=batch.advantages[:, None].expand(4, 2), mask=torch.ones(4, 2),
                        entropies=entropies, row_data=dict(batch.row_data))
    policy = comp.run_loss_stage(inputs, lambda i: torch.zeros_like(i.log_probs)).policy
    assert policy[:, 0].tolist() == pytest.approx([-0.73, 0.0, 0.30, 0.32], abs=1e-6)
    assert comp.pop_metrics()["plugins/gtpo/frac_high_entropy"] == pytest.approx(0.25)


def test_distinct_from_grpo_and_unclipped_gradient():
    grpo = Composition([]).run_advantage_stage(card_batch())
    assert grpo.token_weights is None  # GRPO weighs every token 1; GTPO shields the shared format tokens
    # the loss: value -A, gradient -A * d log pi, even far outside any clip range
    log_probs = torch.tensor([[-0.1, -3.0]], requires_grad=True)
    old = torch.tensor([[-2.0, -0.1]])  # ratios e^1.9 and e^-2.9: PPO would clip both
    inputs = LossInputs(log_probs=log_probs, old_log_probs=old, advantages=torch.tensor([[0.5, -0.5]]),
                        mask=torch.ones(1, 2))
    parts = Composition(["gtpo"]).run_loss_stage(inputs, lambda i: torch.zeros_like(i.log_probs))
    assert parts.policy.tolist()[0] == pytest.approx([-0.5, 0.5])
    parts.policy.sum().backward()
    assert log_probs.grad.tolist()[0] == pytest.approx([-0.5, 0.5])
    assert torch.equal(reinforce_loss(log_probs, inputs.advantages), parts.policy)


def test_options_switch_hooks_and_conflict_normalisation():
    comp = Composition([{"gtpo": {"own_advantages": False, "unclipped_loss": False}}])
    assert comp.providers("compute_advantages") == ["grpo"] and comp.providers("policy_surrogate") == []
    norm = Composition([{"gtpo": {"normalize_by_conflicts": True}}])
    batch = norm.run_advantage_stage(card_batch())
    inputs = LossInputs(log_probs=torch.zeros(3, 4, requires_grad=True), old_log_probs=torch.zeros(3, 4),
                        advantages=batch.advantages[:, None].expand(3, 4), mask=batch.completion_mask,
                        row_data={"gtpo_conflicts": torch.tensor([2.0, 0.0, 3.0])})
    parts = norm.run_loss_stage(inputs, lambda i: torch.zeros_like(i.log_probs))
    expected = -batch.advantages[:, None] / torch.tensor([[2.0], [1.0], [3.0]])
    assert torch.allclose(parts.policy, expected.expand(3, 4) * batch.completion_mask)  # padding is 0


def test_stateless_round_trip(tmp_path):
    comp = Composition(["gtpo"])
    assert comp.state_dict() == {}
    comp.save(tmp_path / "state.pt")
    comp.load(tmp_path / "state.pt")


def trl():
    """The TRL adapter's test kit (the test is skipped where grpo-plugins-trl is not installed)."""
    return pytest.importorskip("grpo_plugins_trl.testing", reason="the TRL adapter (grpo-plugins-trl) is not installed")


def test_real_trl_run_alone_and_composed():
    # TRL keeps old log-probs (needed by the entropy rule) when it reuses a generation: num_iterations=2.
    # The random tiny model's entropy (~2.7 nats) is above 0.7; raise the cut-off so the run has signal.
    gtpo = {"gtpo": {"entropy_threshold": 10.0}}
    trainer = trl().tiny_grpo_run([gtpo], max_steps=2, num_iterations=2)
    rows = [r for r in trainer.state.log_history if "plugins/gtpo/frac_conflict_tokens" in r]
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
    assert all(r["plugins/gtpo/mean_entropy"] > 0 for r in rows)
    # fully on-policy (TRL keeps no old log-probs): the rule uses the policy's entropy in the loss
    on_policy = trl().tiny_grpo_run([gtpo], max_steps=1)
    rows = [r for r in on_policy.state.log_history if "plugins/gtpo/mean_entropy" in r]
    assert rows and all(math.isfinite(r["loss"]) and r["plugins/gtpo/mean_entropy"] > 0 for r in rows)
    pytest.importorskip("grpo_plugin_ngrpo", reason="the composition partner grpo-plugin-ngrpo is not installed")
    composed = trl().tiny_grpo_run(
        ["ngrpo", {"gtpo": {"entropy_threshold": 10.0, "own_advantages": False, "unclipped_loss": False}}],
        max_steps=2, num_iterations=2)
    rows = [r for r in composed.state.log_history if "plugins/gtpo/frac_conflict_tokens" in r]
    assert rows and all(math.isfinite(r["loss"]) and r["loss"] != 0 for r in rows)


def test_loss_stage_needs_are_declared_and_a_missing_deferred_advantage_is_an_error():
    from grpo_plugins import TrainerCapabilities

    from grpo_plugin_gtpo import GTPO, GTPOConfig

    assert GTPO().needs().loss_fields == {"entropies", "row_data"}  # 'auto' may defer the rule to the loss
    assert GTPO(GTPOConfig(entropy_source="sampled")).needs().loss_fields == frozenset()
    assert GTPO(GTPOConfig(entropy_source="sampled", normalize_by_conflicts=True)).needs().loss_fields == {"row_data"}
    assert GTPO(GTPOConfig(entropy_filter=False)).needs().loss_fields == frozenset()
    lacking = TrainerCapabilities.standard("a trainer").without("entropies", "row_data", because="no loss fields")
    problems = Composition([{"gtpo": {"entropy_source": "policy"}}]).capability_problems(lacking)
    assert any("'gtpo' needs loss field 'entropies'" in p for p in problems)
    assert any("'gtpo' needs loss field 'row_data'" in p for p in problems)
    # a loss micro-batch that lost row_data: a clear error, not the rule silently skipped
    inputs = LossInputs(log_probs=torch.zeros(1, 2, requires_grad=True), old_log_probs=torch.zeros(1, 2),
                        advantages=torch.ones(1, 2), mask=torch.ones(1, 2), entropies=torch.zeros(1, 2))
    with pytest.raises(Exception, match=r"gtpo.*row_data\['gtpo_advantage'\].*missing"):
        Composition([{"gtpo": {"entropy_source": "policy"}}]).run_loss_stage(inputs, lambda i: torch.zeros_like(i.log_probs))
