"""Old-policy log-probs at other temperatures (``GRPOBatch.old_log_probs_at``) through verl's own ``fit()`` on CPU.

``dcpo`` reads them at 0.8, 1 and 1.2 with verl sampling at 1: the adapter runs the actor's
``compute_log_prob`` at 0.8 and 1.2 before verl's own pass (which gives 1), and the advantage stage sees,
for every completion token, ``log softmax(logits / tau)`` of the model that sampled it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from grpo_plugins.conformance import installed_methods
from grpo_plugins_verl.cpu_fit import compose_config, run_fit

pytestmark = pytest.mark.e2e

REWARD = Path(__file__).with_name("reward.py")
ONE_STEP = ("trainer.total_training_steps=1", "trainer.save_freq=-1", "trainer.resume_mode=disable")


def direct_log_probs(model, data, temperatures) -> dict[float, torch.Tensor]:
    """``{tau: (B, T)}`` log-probs of each row's response tokens under ``softmax(model logits / tau)``, one
    unpadded forward per row (``data``: the rows' nested ``input_ids``/``position_ids``/``response_mask``)."""
    rows, width = data["input_ids"].unbind(), int(data["response_mask"].offsets().diff().max())
    out = {tau: torch.zeros(len(rows), width) for tau in temperatures}
    with torch.no_grad():
        for i, (ids, positions, length) in enumerate(zip(rows, data["position_ids"].unbind(),
                                                         data["response_mask"].offsets().diff().tolist())):
            logits = model(input_ids=ids[None], position_ids=positions[None], use_cache=False).logits[0].float()
            response = ids[-length:]
            for tau in temperatures:
                log_p = torch.log_softmax(logits[-length - 1 : -1] / tau, dim=-1)
                out[tau][i, :length] = log_p.gather(-1, response[:, None]).squeeze(-1)
    return out


def test_old_log_probs_at_are_the_behaviour_policys_at_each_temperature(tiny_assets, ray_cluster):
    if "dcpo" not in installed_methods():
        pytest.skip("dcpo is not installed")
    import transfer_queue as tq

    config = compose_config(["dcpo"], tiny_assets, REWARD, ONE_STEP)
    passes, seen = [], {}

    def record(trainer):
        group = trainer.actor_rollout_wg
        compute = group.compute_log_prob

        def recording(batch):
            passes.append((batch.extra_info["temperature"], bool(batch.extra_info.get("calculate_entropy"))))
            return compute(batch)

        group.compute_log_prob = recording
        advantage = trainer._compute_advantage

        def checking(batch, metrics):
            data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                                   select_fields=["input_ids", "position_ids", "response_mask"])
            seen["direct"] = direct_log_probs(group.worker.actor.engine.module, data, (0.8, 1.0, 1.2))
            out = advantage(batch, metrics)
            seen["batch"], seen["rows"] = trainer.grpo_plugins.last_batch, trainer.grpo_plugins.last_rows
            return out

        trainer._compute_advantage = checking

    run_fit(config, before_fit=record)
    # the two extra passes (no entropy) before verl's own at the sampling temperature (with entropy)
    assert passes == [(0.8, False), (1.2, False), (1.0, True)]
    batch, rows = seen["batch"], seen["rows"]
    mask = batch.completion_mask > 0
    assert sorted(batch.old_log_probs_at) == [0.8, 1.0, 1.2]
    assert torch.equal(batch.old_log_probs_at[1.0], batch.old_log_probs)  # verl's own pass, no extra forward
    for tau in (0.8, 1.0, 1.2):
        expected = seen["direct"][tau][rows.cpu()][:, : mask.shape[1]]
        torch.testing.assert_close(torch.where(mask, batch.old_log_probs_at[tau], 0.0), torch.where(mask, expected, 0.0),
                                   rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batch.old_log_probs_at[0.8][mask], batch.old_log_probs_at[1.2][mask])


def test_no_extra_pass_without_a_method_reading_them(tiny_assets, ray_cluster):
    """A run whose methods read no other temperature runs verl's old-log-prob pass only, as verl does."""
    config = compose_config(["sapo"], tiny_assets, REWARD, ONE_STEP)
    passes = []

    def record(trainer):
        group = trainer.actor_rollout_wg
        compute = group.compute_log_prob

        def recording(batch):
            passes.append(dict(batch.extra_info))
            return compute(batch)

        group.compute_log_prob = recording

    run_fit(config, before_fit=record)
    assert [(info["temperature"], info["calculate_entropy"]) for info in passes] == [(1.0, True)]
