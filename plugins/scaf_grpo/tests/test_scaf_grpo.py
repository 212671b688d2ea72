"""Scaf-GRPO: warm-up, tier escalation and de-escalation, prompt formats, state, and the card's numbers."""

from __future__ import annotations

import pytest
import torch

from grpo_plugins import Composition, GRPOBatch, PromptRound
from grpo_plugins.errors import BatchError, ConfigError, PluginError

ROW = {
    "prompt_id": 0,
    "hint_knowledge": ["k1.", "k2."],
    "hint_planning": ["p1.", "p2."],
    "hint_solution": "s.",
}
BASE = {"total_steps": 10, "warmup_fraction": 0.2, "chunks_per_tier": 2}  # warm-up = 2 steps


def scaf(**config) -> Composition:
    return Composition([{"scaf_grpo": {**BASE, **config}}])


def round_at(step: int, prompts: int = 1) -> PromptRound:
    return PromptRound(num_prompts=prompts, budget=4 * prompts, dataset_size=100, step=step, default_rollouts=4)


def group_batch(rewards, prompt_ids, components=None, names=()) -> GRPOBatch:
    return GRPOBatch(
        prompt_ids=torch.tensor(prompt_ids),
        rewards=torch.tensor(rewards, dtype=torch.float32),
        reward_components=None if components is None else torch.tensor(components, dtype=torch.float32),
        reward_names=tuple(names),
    )


def augment(comp: Composition, step: int, prompt="2 + 2 =", prompt_id=0, row=ROW):
    return comp.run_augment_prompts(round_at(step), torch.tensor([prompt_id]), [prompt], [row])[0]


FAIL = ([0.0, 0.0, 0.0, 0.0], [0, 0, 0, 0])
SOLVED = ([1.0, 0.0, 0.0, 0.0], [0, 0, 0, 0])


def test_card_worked_example_advantages_stay_grpo():
    comp = scaf()
    zero = comp.run_advantage_stage(group_batch(*FAIL)).advantages
    assert zero.tolist() == [0.0, 0.0, 0.0, 0.0]
    mixed = comp.run_advantage_stage(group_batch(*SOLVED)).advantages
    assert mixed.tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-4)  # unbiased std 0.5


def test_stuck_prompt_gets_a_hint_only_after_warmup():
    comp = scaf()
    for step in (1, 2):  # failures inside the 2-step warm-up do not count
        comp.run_observe(group_batch(*FAIL), step=step)
        assert augment(comp, step) == "2 + 2 ="
    comp.run_observe(group_batch(*FAIL), step=3)
    assert augment(comp, 3) == "2 + 2 =\nKnowledge Hints: k1."
    assert comp.method("scaf_grpo").stuck_of(torch.tensor([0, 1])).tolist() == [True, False]
    assert augment(comp, 3, prompt_id=1, row={**ROW, "prompt_id": 1}) == "2 + 2 ="  # other prompts unchanged


def test_escalates_through_chunks_and_tiers_then_caps():
    comp = scaf()
    seen = []
    for step in range(3, 11):
        comp.run_observe(group_batch(*FAIL), step=step)
        seen.append(augment(comp, step).split("=", 1)[1])
    assert seen == [
        "\nKnowledge Hints: k1.",
        "\nKnowledge Hints: k1. k2.",
        "\nPlanning Hints: p1.",
        "\nPlanning Hints: p1. p2.",
        "\nSolution Hints: s.",
        "\nSolution Hints: s.",  # a string cell is one chunk
        "\nSolution Hints: s.",  # capped at the highest level (3 tiers x 2 chunks)
        "\nSolution Hints: s.",
    ]
    assert comp.method("scaf_grpo").levels_of(torch.tensor([0])).tolist() == [6]


@pytest.mark.parametrize("on_solved, after", [("step_down", "\nKnowledge Hints: k1. k2."), ("clear", "")])
def test_solved_prompt_steps_down_or_clears(on_solved, after):
    comp = scaf(on_solved=on_solved)
    for step in (3, 4, 5):
        comp.run_observe(group_batch(*FAIL), step=step)
    assert augment(comp, 5).endswith("Planning Hints: p1.")
    comp.run_observe(group_batch(*SOLVED), step=6)
    assert augment(comp, 6) == "2 + 2 =" + after
    assert comp.method("scaf_grpo").stuck_of(torch.tensor([0])).tolist() == [False]


def test_chat_prompt_hint_goes_to_last_user_message_without_mutation():
    comp = scaf()
    comp.run_observe(group_batch(*FAIL), step=3)
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "Let me think."},
    ]
    out = augment(comp, 3, prompt=chat)
    assert out[1]["content"] == "What is 2 + 2?\nKnowledge Hints: k1."
    assert out[0] == chat[0] and out[2] == chat[2]
    assert chat[1]["content"] == "What is 2 + 2?"  # the input is not mutated
    parts = [{"role": "user", "content": [{"type": "text", "text": "Solve."}]}]
    out = augment(comp, 3, prompt=parts)
    assert out[0]["content"][-1] == {"type": "text", "text": "\nKnowledge Hints: k1."}


def test_uneven_groups_and_groups_of_one():
    comp = scaf()
    # prompt 5: 3 completions, one correct; prompt 6: a single failed completion; prompt 7: 4 failures
    batch = group_batch([0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0], [5, 6, 5, 7, 5, 7, 7, 7])
    comp.run_observe(batch, step=3)
    state = comp.method("scaf_grpo")
    assert state.levels_of(torch.tensor([5, 6, 7])).tolist() == [0, 1, 1]
    assert state.stuck_of(torch.tensor([5, 6, 7])).tolist() == [False, True, True]
    assert state.prompt_ids.tolist() == [6, 7]  # solved, unhinted prompts keep no state
    assert comp.pop_metrics()["plugins/scaf_grpo/frac_groups_unsolved"] == pytest.approx(2 / 3)


def test_correctness_from_a_named_reward_component():
    comp = scaf(reward_name="correct")
    # total rewards are positive (format bonus) but no completion is correct -> stuck
    batch = group_batch([0.5, 0.5, 0.5, 0.5], [0, 0, 0, 0], components=[[0, 0.5]] * 4, names=("correct", "format"))
    comp.run_observe(batch, step=3)
    assert augment(comp, 3).endswith("k1.")
    with pytest.raises(PluginError, match="reward_name 'missing'"):
        scaf(reward_name="missing").run_observe(batch, step=3)


def test_warmup_from_the_trainers_run_length():
    comp = Composition([{"scaf_grpo": {"warmup_fraction": 0.2, "chunks_per_tier": 2}}])  # no total_steps
    with pytest.raises(PluginError, match="run length.*total_steps is None"):
        augment(comp, 0)
    with pytest.raises(PluginError, match="run length"):
        comp.run_observe(group_batch(*FAIL), step=3)
    # the trainer's 10 steps -> round(0.2 * 10) = 2 warm-up steps
    fail = GRPOBatch(prompt_ids=torch.tensor(FAIL[1]), rewards=torch.tensor(FAIL[0]), total_steps=10)
    comp.run_observe(fail, step=2)  # still inside the warm-up
    assert comp.method("scaf_grpo").levels_of(torch.tensor([0])).tolist() == [0]
    comp.run_observe(fail, step=3)
    round = PromptRound(num_prompts=1, budget=4, dataset_size=100, step=3, default_rollouts=4, total_steps=10)
    assert comp.run_augment_prompts(round, torch.tensor([0]), ["2 + 2 ="], [ROW])[0].endswith("k1.")
    # the config's total_steps overrides the trainer's: round(0.2 * 100) = 20 warm-up steps
    fixed = Composition([{"scaf_grpo": {"warmup_fraction": 0.2, "total_steps": 100}}]).method("scaf_grpo")
    assert fixed.warmup_for(10) == 20 and fixed.warmup_for(None) == 20


def test_clear_errors():
    with pytest.raises(ConfigError, match=r"'total_steps' must lie in \[0, inf\)"):
        Composition([{"scaf_grpo": {"total_steps": -1}}])
    assert Composition([{"scaf_grpo": {"warmup_steps": 50}}]).method("scaf_grpo").warmup_steps == 50
    comp = scaf()
    comp.run_observe(group_batch(*FAIL), step=3)
    with pytest.raises(PluginError, match="no hint column 'hint_knowledge'"):
        augment(comp, 3, row={"prompt_id": 0})
    bad = group_batch([0.0, float("nan"), 0.0, 0.0], [0, 0, 0, 0])
    with pytest.raises(BatchError, match="NaN"):
        comp.run_advantage_stage(bad)


@pytest.mark.parametrize("template, error", [
    ("\n{label}: {hint} {x}", "KeyError: 'x'"),
    ('Answer as {"k": 1}: {hint}', "KeyError: '\"k\"'"),
    ("{0}{hint}", "IndexError"),
])
def test_a_template_with_other_placeholders_is_refused_at_start(template, error):
    # before: accepted, then a KeyError / IndexError when a prompt first got a hint after the warm-up
    with pytest.raises(ConfigError, match=rf"scaf_grpo.*template .* cannot be filled with only {{label}} and {{hint}} "
                                          rf"\({error}.*write a literal brace as '{{{{'"):
        Composition([{"scaf_grpo": {"template": template}}])
    # literal braces written doubled are fine: "{{k}}" is the text "{k}"
    comp = Composition([{"scaf_grpo": {"template": " {{k}} {label}: {hint}", "warmup_steps": 0}}])
    comp.run_observe(group_batch(*FAIL), step=1)
    assert augment(comp, 1) == "2 + 2 = {k} Knowledge Hints: k1."


def test_state_round_trip(tmp_path):
    comp = scaf()
    for step in (3, 4, 5):
        comp.run_observe(group_batch(*FAIL), step=step)
    comp.run_observe(group_batch([0.0, 0.0], [9, 9]), step=6)
    comp.save(tmp_path / "plugins.pt")
    fresh = scaf()
    assert augment(fresh, 6) == "2 + 2 ="
    fresh.load(tmp_path / "plugins.pt")
    assert augment(fresh, 6) == augment(comp, 6) == "2 + 2 =\nPlanning Hints: p1."
    assert torch.equal(fresh.method("scaf_grpo").stuck, comp.method("scaf_grpo").stuck)
    assert fresh.method("scaf_grpo").levels_of(torch.tensor([9])).tolist() == [1]


def test_hashed_63_bit_prompt_ids_keep_sparse_state():
    comp = scaf()
    big = [2**62 + 11, 2**62 + 11, 3, 3]
    comp.run_observe(group_batch([0.0, 0.0, 1.0, 0.0], big), step=3)
    state = comp.method("scaf_grpo")
    assert state.prompt_ids.tolist() == [2**62 + 11]
    assert state.levels_of(torch.tensor([3, 2**62 + 11, 2**62])).tolist() == [0, 1, 0]
