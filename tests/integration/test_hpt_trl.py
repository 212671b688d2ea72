"""HPT in TRL's GRPOTrainer: demonstrations injected for failed prompts and trained with the SFT loss,
GRPO on the others; alone and composed with SAPO, tiny CPU runs."""

import math

import pytest

pytest.importorskip("trl")
pytest.importorskip("grpo_plugin_hpt")

from grpo_plugins.injection import INJECTED_KEY, kind_code  # noqa: E402
from grpo_plugins.testing import BatchRecorder  # noqa: E402
from grpo_plugins_trl.testing import arithmetic_dataset, tiny_grpo_run  # noqa: E402

DEMONSTRATION = kind_code("demonstration")


def dataset():
    data = arithmetic_dataset(32, 0)
    return data.add_column("solution", list(data["answer"]))


def even_prompts_solved(completions, prompt_id, **kwargs):
    """1 for every completion of an even prompt id, 0 for an odd one: half the prompts in RL mode, half in SFT."""
    return [float(p % 2 == 0) for p in prompt_id]


def logged(trainer, key):
    return [row[key] for row in trainer.state.log_history if key in row]


def test_hpt_alone_trains_demonstrations_of_failed_prompts_with_the_sft_loss():
    """The random model fails every prompt: each group gets its demonstration, the rollouts are removed, and the
    step's loss is c_sft x the mean negative log-likelihood of the demonstration tokens under the policy."""
    recorder = BatchRecorder(needs=("old_log_probs",))
    trainer = tiny_grpo_run([{"hpt": {"sft_coef": 0.5}}, recorder], dataset=dataset(), max_steps=2)
    for step, batch in enumerate(recorder.batches):
        demonstration = batch.row_data[INJECTED_KEY] == DEMONSTRATION
        groups = batch.prompt_ids[~demonstration].unique(sorted=True)
        assert batch.prompt_ids[demonstration].sort().values.tolist() == groups.tolist()  # one per failed prompt
        assert batch.row_data["hpt_policy_weight"].eq(0).all()  # every rollout removed
        mask = batch.completion_mask[demonstration] > 0
        nll = -batch.old_log_probs[demonstration][mask].mean()
        assert logged(trainer, "plugins/hpt/sft")[step] == pytest.approx(0.5 * float(nll), rel=1e-4)
    assert logged(trainer, "loss") == pytest.approx(logged(trainer, "plugins/hpt/sft"), rel=1e-4)  # no policy loss
    assert logged(trainer, "plugins/hpt/sft_prompts") == [1.0, 1.0]
    assert logged(trainer, "injection/demonstration") == [2.0, 2.0]


def test_hpt_switches_per_prompt_and_renormalises_the_rl_rows():
    recorder = BatchRecorder()
    trainer = tiny_grpo_run(["hpt", recorder], dataset=dataset(), max_steps=3, reward_funcs=even_prompts_solved)
    mixed = 0
    for batch in recorder.batches:
        demonstration = batch.row_data[INJECTED_KEY] == DEMONSTRATION
        assert (batch.prompt_ids[demonstration] % 2 == 1).all()  # only failed (odd) prompts get one
        odd = batch.prompt_ids % 2 == 1
        assert set(batch.prompt_ids[odd & ~demonstration].tolist()) == set(batch.prompt_ids[demonstration].tolist())
        weight = batch.row_data["hpt_policy_weight"]
        assert weight[odd].eq(0).all()
        rl = ~odd
        if bool(rl.any()) and bool(odd.any()):
            mixed += 1
            tokens = batch.completion_mask.sum(-1)
            assert weight[rl] == pytest.approx(float(tokens.sum() / tokens[rl].sum()))
        assert batch.rewards[demonstration].eq(0).all()  # the demonstrations are scored by the run's reward function
    assert mixed >= 1
    assert all(math.isfinite(x) for x in logged(trainer, "loss"))


def test_hpt_with_sapo():
    pytest.importorskip("grpo_plugin_sapo", reason="the composition partner grpo-plugin-sapo is not installed")
    trainer = tiny_grpo_run(["hpt", "sapo"], dataset=dataset(), max_steps=2, reward_funcs=even_prompts_solved,
                            loss_type="sapo")
    assert trainer.composition.providers("policy_surrogate") == ["sapo"]
    assert logged(trainer, "plugins/hpt/sft") and logged(trainer, "injection/rows")
    assert all(math.isfinite(x) for x in logged(trainer, "loss"))
