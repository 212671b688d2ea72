"""CAPO in real TRL runs (alone and with Unlikeliness); its update preview against the LM head's real AdamW
update; the start-up refusals."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")
pytest.importorskip("grpo_plugin_capo", reason="grpo-plugin-capo is not installed")

import torch  # noqa: E402

from grpo_plugins import CompositionError  # noqa: E402
from grpo_plugins_trl.testing import digit_overlap_reward, tiny_grpo_run  # noqa: E402

NO_MASK = {"kl_threshold": 1e9, "curvature_threshold": 1e9}


def logged(trainer, key):
    return [row[key] for row in trainer.state.log_history if key in row]


@pytest.mark.parametrize("methods", [["capo"], ["unlikeliness", "capo"]])
def test_two_steps(methods):
    pytest.importorskip("grpo_plugin_unlikeliness")
    trainer = tiny_grpo_run(methods, max_steps=2, reward_funcs=digit_overlap_reward)
    for key in ("rejected_fraction", "predicted_kl", "predicted_gain", "update_norm"):
        values = logged(trainer, f"plugins/capo/{key}")
        assert len(values) == 2 and all(torch.isfinite(torch.tensor(values)))
    assert all(0 <= f <= 1 for f in logged(trainer, "plugins/capo/rejected_fraction"))
    assert all(torch.isfinite(torch.tensor(logged(trainer, "loss"))))
    assert trainer.last_plugin_batch.update_preview.optimizer == "adam"


def test_tight_trust_region_masks_tokens_in_the_loss():
    trainer = tiny_grpo_run([{"capo": {"kl_threshold": 0.007, "curvature_threshold": 0.01}}], max_steps=1,
                            reward_funcs=digit_overlap_reward, learning_rate=1e-2)
    rejected = logged(trainer, "plugins/capo/rejected_fraction")[0]
    batch = trainer.last_plugin_batch
    mask = batch.completion_mask > 0
    assert 0 < rejected < 1
    assert float((batch.token_weights[mask] == 0).float().mean()) == pytest.approx(rejected)


@pytest.mark.parametrize("loss_type, aggregation", [("dapo", "token_mean"), ("grpo", "sequence_mean")])
def test_preview_equals_the_real_head_update(loss_type, aggregation):
    # an untied head, no gradient clipping, no masking: the AdamW step on the head is what CAPO previews
    trainer = tiny_grpo_run([{"capo": {**NO_MASK, "loss_aggregation": aggregation}}], max_steps=2, train=False,
                            max_grad_norm=0.0, reward_funcs=digit_overlap_reward, weight_decay=0.1, loss_type=loss_type)
    model = trainer.model
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    capo = trainer.composition.method("capo")
    seen = []
    original = trainer._run_advantage_stage

    def spy(out, n):
        original(out, n)
        batch = trainer.last_plugin_batch
        assert not batch.update_preview.tied_embeddings
        seen.append((model.lm_head.weight.detach().clone(), capo.preview_update(batch), batch.update_preview.step))

    trainer._run_advantage_stage = spy
    trainer.train()
    after = [w for w, _, _ in seen[1:]] + [model.lm_head.weight.detach().clone()]
    assert [step for _, _, step in seen] == [0, 1]  # the second preview uses AdamW's moments of the first step
    for (before, preview, _), final in zip(seen, after):
        actual = final - before
        assert float(actual.abs().max()) > 1e-4
        torch.testing.assert_close(preview, actual, rtol=1e-3, atol=2e-6)


@pytest.mark.parametrize("settings, fragment", [
    ({"loss_type": "grpo"}, "loss_type = 'sequence_mean'"),
    ({"steps_per_generation": 4}, "on_policy"),
    ({"optim": "adafactor"}, "optim='adafactor'"),
])
def test_refused_at_start_up(settings, fragment):
    with pytest.raises(CompositionError, match="capo") as error:
        tiny_grpo_run(["capo"], train=False, **settings)
    assert fragment in str(error.value)
