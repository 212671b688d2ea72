"""Mistakes that would otherwise train silently: a plugin config given to plain TRL, a batch whose every
completion is masked, and the configurations the adapter's own documentation shows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from trl import GRPOTrainer

from grpo_plugins.testing import BatchRecorder, FirstPrompts
from grpo_plugins import LossInputs, Method, hookimpl
from grpo_plugins_trl import PluginGRPOConfig, PluginGRPOTrainer
from grpo_plugins_trl.testing import arithmetic_dataset, exact_answer_reward, tiny_grpo_run, tiny_model, tiny_tokenizer

ADAPTER = Path(__file__).resolve().parents[1]


def build(trainer_cls, args):
    return trainer_cls(model=tiny_model(), reward_funcs=exact_answer_reward, args=args,
                       train_dataset=arithmetic_dataset(8), processing_class=tiny_tokenizer())


def config(tmp_path, **kwargs):
    return PluginGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, per_device_train_batch_size=4,
                            num_generations=4, report_to="none", **kwargs)


# --------------------------------------------------------------------------- a plugin config in plain TRL
def test_plain_grpotrainer_refuses_a_config_with_methods(tmp_path):
    args = config(tmp_path, grpo_plugins=["ngrpo"])
    with pytest.raises(ValueError, match=r"grpo_plugins=\['ngrpo'\].*only grpo_plugins_trl.PluginGRPOTrainer"):
        build(GRPOTrainer, args)
    assert build(PluginGRPOTrainer, args).composition.names == ["ngrpo", "grpo"]
    with pytest.raises(ValueError, match="PluginGRPOTrainer"):  # still refused after a PluginGRPOTrainer took it
        build(GRPOTrainer, args)
    build(GRPOTrainer, config(tmp_path, grpo_plugins=None))  # no methods: nothing is lost


# --------------------------------------------------------------------------- every completion masked

class UnitGate(Method):
    name = "unit_gate"

    @hookimpl
    def gate_loss(self, inputs: LossInputs):
        return inputs.log_probs.new_ones(inputs.log_probs.shape)


# the end-of-sequence token can never be sampled, so every completion is truncated, and masked
ALL_TRUNCATED = dict(mask_truncated_completions=True, generation_kwargs={"suppress_tokens": [3]}, max_steps=2)


def step_losses(trainer):
    return [row["loss"] for row in trainer.state.log_history if "loss" in row and "train_runtime" not in row]


@pytest.mark.parametrize("with_loss_hook", [False, True], ids=["trl_loss", "adapter_loss"])
def test_a_batch_with_every_completion_masked_is_skipped_like_trl_does(with_loss_hook):
    vanilla = tiny_grpo_run(None, trainer_cls=GRPOTrainer, **ALL_TRUNCATED)
    assert step_losses(vanilla) == [0.0, 0.0]
    recorder = BatchRecorder()
    trainer = tiny_grpo_run(["ngrpo", recorder] + ([UnitGate()] if with_loss_hook else []), **ALL_TRUNCATED)
    assert step_losses(trainer) == [0.0, 0.0]
    assert [row.get("plugins/skipped_empty_batches") for row in trainer.state.log_history[:2]] == [1.0, 1.0]
    assert recorder.batches == []  # the methods skipped the batches: nothing to observe


# --------------------------------------------------------------------------- documented configurations
def documented_method_lists() -> list[list]:
    """Every method list the adapter's README and PluginGRPOConfig's help show."""
    from grpo_plugins_trl.trainer import PluginGRPOConfig as Config

    texts = [(ADAPTER / "README.md").read_text(), Config.__dataclass_fields__["grpo_plugins"].metadata["help"]]
    found = []
    for text in texts:
        for snippet in re.findall(r"grpo_plugins=(\[.*?\])[,)]", text) + re.findall(r"e\.g\. (\[.*\])\.", text):
            found.append(eval(snippet, {}))  # Python literals of the documentation
        for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.S):
            value = yaml.safe_load(block)
            if isinstance(value, dict) and "grpo_plugins" in value:
                found.append(value["grpo_plugins"])
    return found


def test_every_documented_configuration_builds_a_trainer():
    lists = documented_method_lists()
    assert len(lists) >= 3
    for methods in lists:
        trainer = tiny_grpo_run(methods, max_steps=1, loss_type="dapo")
        assert trainer.composition.user_methods


# --------------------------------------------------------------------------- prompt ids vs dataset indices
def test_a_prompt_id_column_that_is_not_the_row_index_is_refused_with_a_round_planner(tmp_path):
    from grpo_plugins import CompositionError

    shifted = arithmetic_dataset(8).map(lambda row: {"prompt_id": row["prompt_id"] + 100})
    with pytest.raises(CompositionError, match=r"\['first_prompts'\] plan the rounds by dataset row index, but the "
                                               r"training dataset's 'prompt_id' column is not the row index \(row 0 "
                                               r"has prompt_id=100\)"):
        PluginGRPOTrainer(model=tiny_model(), reward_funcs=exact_answer_reward, args=config(tmp_path),
                          train_dataset=shifted, processing_class=tiny_tokenizer(), plugins=[FirstPrompts()])
    trainer = PluginGRPOTrainer(model=tiny_model(), reward_funcs=exact_answer_reward, args=config(tmp_path),
                                train_dataset=shifted, processing_class=tiny_tokenizer(), plugins=["unlikeliness"])
    assert trainer.composition.names == ["unlikeliness", "grpo"]  # no planner: any prompt_id column keys the groups
    build(PluginGRPOTrainer, config(tmp_path, grpo_plugins=None))  # the row-index column of arithmetic_dataset
    assert PluginGRPOTrainer(model=tiny_model(), reward_funcs=exact_answer_reward, args=config(tmp_path),
                             train_dataset=arithmetic_dataset(8), processing_class=tiny_tokenizer(),
                             plugins=[FirstPrompts()]).plans_rounds
