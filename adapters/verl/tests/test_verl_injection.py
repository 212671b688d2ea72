"""Injected rows on verl (``inject_rows``, :mod:`grpo_plugins_verl.injection`): the capability, the settings and
methods it cannot run with, and the TransferQueue sample an injected row becomes. The rows' path through
verl's ``fit()`` is in ``e2e/test_verl_injection.py``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from grpo_plugins import Composition, CompositionError, LossTerm, Method, Needs, hookimpl
from grpo_plugins.injection import INJECTED_KEY, InjectedRow, completion_tokens, kind_code
from grpo_plugins_verl.capabilities import check_run, verl_capabilities
from grpo_plugins_verl.injection import Injection, add_field, injected_sample

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "verl" / "make_tiny_assets.py"


def verl_config(*overrides):
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(overrides))


class Injector(Method):
    name = "toy_injector"

    @hookimpl
    def inject_rows(self, batch):
        return []


class StepReader(Method):
    name = "toy_step_reader"

    def needs(self):
        return Needs(batch_fields={"steps"})


class Pairwise(Method):
    name = "toy_pairwise"

    def needs(self):
        return Needs(loss_fields={"group_index"}, features={"whole_groups"})

    @hookimpl
    def loss_objectives(self, inputs):
        return {"pairs": LossTerm(inputs.log_probs, normaliser="group")}


def problems(methods, config=None):
    return Composition(methods).capability_problems(verl_capabilities(config))


def test_row_injection_is_provided_with_the_grpo_plugins_trainer_only():
    assert problems([Injector()], verl_config()) == []
    found = problems([Injector()])  # verl's own trainer: no step of the adapter's to add rows to
    assert len(found) == 1 and "'row_injection'" in found[0] and "trainer_mode=grpo_plugins" in found[0]


@pytest.mark.parametrize("override, setting", [
    ("algorithm.rollout_correction.bypass_mode=True", "bypass_mode=True"),
    ("reward.reward_model.enable=True", "enable_resource_pool"),
])
def test_settings_without_row_injection_are_named(override, setting):
    found = problems([Injector()], verl_config(override))
    assert len(found) == 1 and "method 'toy_injector' needs trainer feature 'row_injection'" in found[0]
    assert setting in found[0]


def test_methods_whose_data_injected_rows_lack_are_refused_at_start_up():
    with pytest.raises(CompositionError) as error:
        check_run(Composition([Injector(), StepReader(), Pairwise()]), verl_config())
    text = str(error.value)
    assert "['toy_injector'] inject rows" in text
    assert "['toy_step_reader'] reading batch field 'steps'" in text and "['toy_pairwise'] needing 'whole_groups'" in text
    check_run(Composition([StepReader()]), verl_config())  # without an injector: nothing refused here


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("tokenizers")
    spec = importlib.util.spec_from_file_location("make_tiny_assets", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_tokenizer()


def test_completions_are_tokenised_as_generated_ones_end(tokenizer):
    eos = tokenizer.eos_token_id
    rows = [InjectedRow(0, "47"), InjectedRow(0, (5, 6, 7)), InjectedRow(1, "12 + 13 is 25 and more")]
    text_ids = tokenizer("47", add_special_tokens=False)["input_ids"]
    tokens = completion_tokens(rows, tokenizer, limit=6)
    assert tokens[0] == [*text_ids, eos]  # text: end-of-sequence token appended
    assert tokens[1] == [5, 6, 7]  # token ids: as they are
    assert len(tokens[2]) == 6 and eos not in tokens[2]  # cut at rollout.response_length
    assert tokenizer.decode(tokens[0], skip_special_tokens=True) == "47"


def agent_loop_sample() -> dict:
    """A sampled row as verl's agent loop writes it (prompt of 4 tokens, response of 3)."""
    prompts, responses = torch.tensor([11, 12, 13, 14]), torch.tensor([21, 22, 23])
    return {
        "prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses]),
        "attention_mask": torch.ones(7, dtype=torch.int64), "position_ids": torch.arange(7),
        "response_mask": torch.ones(3, dtype=torch.int64), "loss_mask": torch.ones(3, dtype=torch.int64),
        "rm_scores": torch.tensor([0.0, 0.0, 0.5]), "rollout_log_probs": torch.tensor([-1.0, -2.0, -3.0]),
        "extra_fields": {"reward_extra_info": {"acc": 0.0, "digits": 0.5}, "min_global_steps": 3},
        "raw_prompt": [{"role": "user", "content": "what is 1 + 2 ?"}], "data_source": "tiny", "num_turns": 2,
    }


def test_an_injected_row_is_its_group_prompt_with_the_given_completion_and_reward():
    source = agent_loop_sample()
    sample = injected_sample(source, [31, 32, 33, 34, 35], reward=1.5, reward_info={})
    assert torch.equal(sample["prompts"], source["prompts"])
    assert torch.equal(sample["responses"], torch.tensor([31, 32, 33, 34, 35]))
    assert torch.equal(sample["input_ids"], torch.tensor([11, 12, 13, 14, 31, 32, 33, 34, 35]))
    assert torch.equal(sample["attention_mask"], torch.ones(9, dtype=torch.int64))
    assert torch.equal(sample["position_ids"], torch.arange(9))
    assert torch.equal(sample["response_mask"], torch.ones(5, dtype=torch.int64))
    assert torch.equal(sample["loss_mask"], sample["response_mask"])
    assert torch.equal(sample["rm_scores"], torch.tensor([0.0, 0.0, 0.0, 0.0, 1.5]))  # verl: reward on the last token
    assert torch.equal(sample["rollout_log_probs"], torch.zeros(5))  # set to the old log-probs after verl's pass
    assert sample["extra_fields"] == {"reward_extra_info": {}, "min_global_steps": 3}  # given reward: no components
    assert sample["raw_prompt"] == source["raw_prompt"] and sample["data_source"] == "tiny"
    assert source["extra_fields"]["reward_extra_info"] == {"acc": 0.0, "digits": 0.5}  # the source is untouched
    assert torch.equal(source["responses"], torch.tensor([21, 22, 23]))


def test_each_row_kind_reaches_the_advantage_stage_row_data():
    class Trainer:
        grpo_plugins = type("Runtime", (), {"extras": {}})()

    trainer = Trainer()
    trainer.injection = Injection(trainer)
    trainer.injection.codes = {"u1_inj0_0": kind_code("demonstration"), "u2_inj1_0": kind_code("anchor")}
    add_field(trainer, ["u1_0_0", "u1_inj0_0", "pad3_0_0", "u2_inj1_0"])
    codes = trainer.grpo_plugins.extras["row_data"][INJECTED_KEY]
    assert codes.tolist() == [0, kind_code("demonstration"), 0, kind_code("anchor")]
    trainer.injection = None
    trainer.grpo_plugins.extras = {}
    add_field(trainer, ["u1_0_0"])  # no injection: the stage's row_data is left alone
    assert trainer.grpo_plugins.extras == {}
