"""D3S on the core alone: the card's worked examples, the schedule, edge cases and the property against GRPO."""

import dataclasses

import pytest
import torch

from grpo_plugins import Composition, CompositionError, GRPOBatch, TrainerCapabilities
from grpo_plugin_d3s import max_variance_subset, schedule, top_count_tokens, top_score_tokens


def test_card_sample_level_example():
    # G = 8, rewards [1,1,1,0,0,0,0,0]: A = r - 0.375; k = 4 keeps 2 positives + 2 negatives, Var 0.25 (> 0.234)
    a = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0.0]) - 0.375
    keep = max_variance_subset(a, torch.zeros(8, dtype=torch.long), 1, 0.5)
    assert keep.tolist() == [False, True, True, True, True, False, False, False]
    assert float(a[keep].var(unbiased=False)) == 0.25 > float(a.var(unbiased=False))


def test_card_token_level_example():
    # rho_t = 0.5 on 5 valid tokens scoring [.1, .9, .5 | .2, .4] keeps .9, .5, .4
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.2, 0.4, 7.0]])
    valid = torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
    assert top_score_tokens(scores, valid, 0.5).tolist() == [[False, True, True], [False, True, False]]


def test_uneven_groups_and_exhaustive_optimum():
    a = torch.tensor([3.0, 1.0, 2.0, -5.0, 0.0, 4.0, 4.0, 4.0, 0.3])
    index = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3])
    keep = max_variance_subset(a, index, 4, 0.6)
    assert keep.tolist() == [True, True, False, True, False, True, True, True, True]  # groups of 2 and 1 keep all


def test_schedule_relaxes_to_one():
    assert schedule(0.5, 0, 10) == 0.5 and schedule(0.5, 5, 10) == 0.75 and schedule(0.5, 20, 10) == 1.0


def run(rewards, prompt_ids, entropies, step=0, total=10, config=None, width=3):
    n = len(rewards)
    mask = torch.ones(n, width)
    mask[-1, -1] = 0
    ent = torch.tensor(entropies)
    ent = torch.where(mask > 0, ent, torch.tensor(float("nan")))  # NaN in padding must be ignored
    b = GRPOBatch(prompt_ids=torch.tensor(prompt_ids), rewards=torch.tensor(rewards), completion_mask=mask,
                  completion_ids=torch.ones(n, width, dtype=torch.long), old_entropies=ent, step=step, total_steps=total)
    return Composition([{"d3s": config or {}}]).run_advantage_stage(b)


def test_card_token_count_is_ceil_of_rho_n():
    # the card keeps ceil(rho_t n) tokens: n = 7, rho_t = 0.3 -> 3 (the 0.7 quantile rule would keep 2)
    scores = torch.tensor([[0.7, 0.1, 0.6, 0.2], [0.5, 0.3, 0.4, 9.0]])
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]).bool()
    assert top_count_tokens(scores, valid, 0.3).tolist() == [[True, False, True, False], [True, False, False, False]]
    assert int(top_score_tokens(scores, valid, 0.3).sum()) == 2
    # equal scores are taken in batch order: exactly ceil(0.5 * 5) = 3 of five equal scores, the first three
    assert top_count_tokens(torch.ones(1, 5), torch.ones(1, 5).bool(), 0.5).tolist() == [[True, True, True, False, False]]


def test_default_token_rule_counts_kept_tokens_renormalised():
    ent = [[1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [2.0, 2.0, 9.0]]
    b = run([1.0, 0.0, 1.0, 0.0], [0, 0, 1, 1], ent, config={"sample_rho_start": 1.0})
    # |A| = 0.7071 everywhere: scores follow the entropies; 11 real tokens -> ceil(5.5) = 6 kept: 3, 2, 2, 2 and
    # the first two of the 1.0s in batch order
    kept = b.token_weights > 0
    assert kept.tolist() == [[True, True, True], [True, False, False], [False, False, False], [True, True, False]]
    assert torch.allclose(b.token_weights[kept], torch.tensor(11 / 6))


def test_weights_through_the_composition_renormalised():
    ent = [[1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [2.0, 2.0, 9.0]]
    b = run([1.0, 0.0, 1.0, 0.0], [0, 0, 1, 1], ent, config={"sample_rho_start": 1.0, "token_selection": "quantile"})
    # |A| = 0.7071 everywhere: scores follow the entropies; 11 real tokens, quantile 0.5 = 1.0 -> 9 kept
    kept = b.token_weights > 0
    assert kept.tolist() == [[True, True, True], [True, True, True], [False, False, False], [True, True, False]]
    assert torch.allclose(b.token_weights[kept], torch.tensor(11 / 8))


def test_end_of_ramp_is_plain_grpo():
    ent = [[1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [2.0, 2.0, 9.0]]
    b = run([1.0, 0.0, 1.0, 0.0], [0, 0, 1, 1], ent, step=5, total=10)
    assert torch.equal(b.token_weights, b.token_mask)


def test_constant_groups_keep_zero_advantage_and_some_token():
    b = run([0.3, 0.3, 0.3, 0.3], [0, 0, 1, 1], [[1.0] * 3] * 4)
    assert b.advantages.abs().sum() == 0 and bool((b.token_weights > 0).any())


def test_unknown_run_length_is_a_clear_error():
    with pytest.raises(Exception, match="total_steps"):
        run([1.0, 0.0], [0, 0], [[1.0] * 3] * 2, total=None)


def test_property_drops_completions_grpo_keeps():
    ent = [[1.0] * 3] * 4
    b = run([1.0, 0.0, 0.0, 0.0], [0, 0, 0, 0], ent, config={"token_rho_start": 1.0})
    assert (b.token_weights.sum(-1) > 0).sum() == 2  # ceil(0.5 * 4) of the group train; GRPO trains all 4


def test_verl_is_refused():
    with pytest.raises(CompositionError, match="old_entropies"):
        Composition(["d3s"]).check_capabilities(TrainerCapabilities.standard("verl"))


def test_renormalise_needs_a_token_mean_loss():
    # n_real / n_kept is the mean over kept tokens only when the loss divides by the batch's token count;
    # under TRL's loss_type 'grpo' (sequence mean) it would be a plain rescale, so the pairing is refused
    def trl(aggregation):
        capabilities = TrainerCapabilities.standard("TRL GRPOTrainer", settings={"loss_aggregation": aggregation},
                                                    setting_names={"loss_aggregation": "loss_type"})
        return dataclasses.replace(capabilities, batch_fields=capabilities.batch_fields | {"old_entropies"})

    with pytest.raises(CompositionError, match=r"d3s.*loss_type = .sequence_mean.*loss_aggregation.*renormalise"):
        Composition(["d3s"]).check_capabilities(trl("sequence_mean"))
    Composition(["d3s"]).check_capabilities(trl("token_mean"))
    Composition([{"d3s": {"renormalise": False}}]).check_capabilities(trl("sequence_mean"))
