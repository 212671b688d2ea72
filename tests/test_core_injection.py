"""Injected rows, trainer-independent part (grpo_plugins.injection): the rows' checks, the kind codes,
appending rows to a batch and the spread over ranks with filler rows."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_plugins import Composition, GRPOBatch, Method, hookimpl
from grpo_plugins.errors import PluginError
from grpo_plugins.injection import (INJECTED_KEY, InjectedRow, Layout, append_rows, completion_tokens, injected_rows,
                                    kind_code, padded_tokens, parse_rows, rows_of_kind, source_rows)


def small_batch() -> GRPOBatch:
    """Two prompts (ids 7 and 9), two completions each, two reward components."""
    components = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.5]])
    return GRPOBatch(
        prompt_ids=torch.tensor([7, 7, 9, 9]), rewards=components.sum(1), reward_components=components,
        reward_names=("a", "b"), reward_weights=torch.ones(2),
        completion_ids=torch.tensor([[5, 6, 0], [5, 0, 0], [8, 8, 8], [9, 0, 0]]),
        completion_mask=torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.float32),
        old_log_probs=torch.full((4, 3), -1.0) * torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]]),
        prompts=["p7", "p7", "p9", "p9"], completions=["c", "c", "c", "c"],
        rows=[{"x": 7}, {"x": 7}, {"x": 9}, {"x": 9}],
    )


def test_kind_codes_are_stable_positive_and_distinct():
    assert kind_code("demonstration") == kind_code("demonstration") > 0
    assert kind_code("anchor") != kind_code("demonstration")
    assert InjectedRow(7, "x", "anchor").code == kind_code("anchor")


def test_parse_rows_accepts_text_token_ids_kinds_and_rewards():
    rows = parse_rows([{"prompt_id": 7, "completion": "text"},
                       {"prompt_id": torch.tensor(9), "completion": [3, 4], "kind": "anchor", "reward": 1}],
                      torch.tensor([7, 7, 9, 9]), ["m"])
    assert rows == [InjectedRow(7, "text", "injected", None), InjectedRow(9, (3, 4), "anchor", 1.0)]


@pytest.mark.parametrize("row, message", [
    ({"prompt_id": 8, "completion": "x"}, "prompt_id=8 is not a prompt of the batch"),
    ({"prompt_id": True, "completion": "x"}, "prompt_id=True"),
    ({"prompt_id": 7, "completion": ""}, "the completion is empty"),
    ({"prompt_id": 7, "completion": [1, -2]}, "completion must be non-empty text or a list of token ids"),
    ({"prompt_id": 7, "completion": "x", "reward": math.nan}, "reward must be a finite number"),
    ({"prompt_id": 7, "completion": "x", "kind": ""}, "kind must be a non-empty string"),
    ({"prompt_id": 7, "completion": "x", "weight": 2}, "unknown key(s) ['weight']"),
])
def test_parse_rows_refuses_bad_rows_naming_the_method(row, message):
    with pytest.raises(ValueError, match="inject_rows of \\['m'\\]: row 0") as error:
        parse_rows([row], torch.tensor([7, 9]), ["m"])
    assert message in str(error.value)


def test_append_rows_extends_every_per_row_field_and_marks_kinds():
    batch = small_batch()
    batch.row_data["other"] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    rows = [InjectedRow(9, "demo", "demonstration"), InjectedRow(7, (4, 4, 4, 4), "anchor", 2.5)]
    scored = torch.tensor([[1.0, 0.25], [math.nan, math.nan]])
    out = append_rows(batch, rows, [[11, 12], [4, 4, 4, 4]], scored)
    assert out.num_completions == 6 and batch.num_completions == 4  # the input batch is unchanged
    assert out.prompt_ids.tolist() == [7, 7, 9, 9, 9, 7]
    assert out.rewards.tolist() == [1.0, 1.0, 0.0, 0.5, 1.25, 2.5]  # scored: weighted sum; given: as given
    assert torch.isnan(out.reward_components[5]).all() and out.reward_components[4].tolist() == [1.0, 0.25]
    assert out.completion_ids.shape == (6, 4) and out.completion_ids[4].tolist() == [11, 12, 0, 0]
    assert out.completion_mask[4].tolist() == [1, 1, 0, 0] and out.completion_mask[5].tolist() == [1, 1, 1, 1]
    assert out.completion_mask[:4, 3].sum() == 0 and out.old_log_probs.shape == (6, 4)
    codes = out.row_data[INJECTED_KEY]
    assert codes.tolist() == [0, 0, 0, 0, kind_code("demonstration"), kind_code("anchor")]
    assert out.row_data["other"].tolist() == [1, 2, 3, 4, 0, 0]
    assert out.prompts[4:] == ["p9", "p7"] and out.rows[4:] == [{"x": 9}, {"x": 7}]
    assert injected_rows(out.row_data, out.rewards).tolist() == [False] * 4 + [True, True]
    assert rows_of_kind(out.row_data, "anchor", out.rewards).tolist() == [False] * 5 + [True]
    assert out.group_sizes.tolist() == [3, 3]  # the rows joined their prompts' groups


def test_each_injected_row_copies_the_first_row_of_its_prompt():
    prompt_ids = torch.tensor([9, 9, 7, 7, 9, 3])  # prompt 9 comes first at row 0 and again at row 4
    rows = [InjectedRow(7, "a"), InjectedRow(9, "b"), InjectedRow(3, "c"), InjectedRow(7, "d")]
    assert source_rows(prompt_ids, rows).tolist() == [2, 0, 5, 2]
    assert source_rows(prompt_ids, []).tolist() == []


def test_token_lists_are_padded_on_the_right_with_a_mask():
    ids, mask = padded_tokens([[4, 5, 6], [7], []], pad_id=1)
    assert ids.tolist() == [[4, 5, 6], [7, 1, 1], [1, 1, 1]]
    assert mask.dtype == torch.float32 and mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    wide, _ = padded_tokens([[4]], width=3)
    assert wide.tolist() == [[4, 0, 0]]


class CharTokenizer:
    """A tokenizer with the call convention of ``transformers``: one id per character, end-of-sequence 0."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}


def test_completion_tokens_end_text_like_a_rollout_and_take_ids_as_they_are():
    rows = [InjectedRow(7, "ab"), InjectedRow(7, (5, 6, 7, 8)), InjectedRow(9, "abcdef")]
    assert completion_tokens(rows, CharTokenizer()) == [[97, 98, 0], [5, 6, 7, 8], [97, 98, 99, 100, 101, 102, 0]]
    assert completion_tokens(rows, CharTokenizer(), limit=3) == [[97, 98, 0], [5, 6, 7], [97, 98, 99]]


def test_without_injection_no_row_is_injected():
    batch = small_batch()
    assert not injected_rows(batch.row_data, batch.rewards).any()
    assert not rows_of_kind(batch.row_data, "anchor", batch.rewards).any()


def test_an_unscored_row_without_reward_is_refused_at_the_advantage_stage():
    batch = append_rows(small_batch(), [InjectedRow(7, "x")], [[3]])  # no reward, not scored: NaN
    assert math.isnan(float(batch.rewards[-1]))
    with pytest.raises(Exception, match="NaN|finite|reward"):
        Composition([]).run_advantage_stage(batch)


@pytest.mark.parametrize("rows, world, splits, per_rank, fillers", [
    (10, 1, 2, 10, 0), (9, 1, 2, 10, 1), (9, 2, 2, 6, 3), (8, 2, 1, 4, 0), (5, 4, 1, 2, 3), (1, 1, 3, 3, 2),
])
def test_layout_spreads_rows_evenly_in_whole_splits(rows, world, splits, per_rank, fillers):
    layout = Layout(rows, world, splits)
    assert (layout.per_rank, layout.fillers) == (per_rank, fillers)
    assert layout.per_rank % splits == 0 and layout.per_rank * world == rows + fillers
    spans = [layout.real_rows(r) for r in range(world)]
    assert spans[0][0] == 0 and spans[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, rank-major; fillers at the end


def test_layout_refuses_empty_batches():
    with pytest.raises(ValueError):
        Layout(0)


class Injector(Method):
    name = "injector"

    @hookimpl
    def inject_rows(self, batch):
        return [{"prompt_id": int(batch.prompt_ids[0]), "completion": "x", "kind": "demo"}]


class BadInjector(Method):
    name = "bad_injector"

    @hookimpl
    def inject_rows(self, batch):
        return [{"completion": "x"}]


def test_inject_rows_hook_concatenates_and_checks_the_output_contract():
    batch = small_batch()
    assert Composition([Injector()]).run_inject_rows(batch) == [{"prompt_id": 7, "completion": "x", "kind": "demo"}]
    with pytest.raises(PluginError, match="bad_injector.*prompt_id"):
        Composition([BadInjector()]).run_inject_rows(batch)
