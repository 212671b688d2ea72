"""TW-GRPO in real TRL runs (alone and with Unlikeliness), and the TRL old-policy probe against TRL's own
old log-probs and against the weights computed from the full ``(N, T, V)`` distributions."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")
pytest.importorskip("grpo_plugin_tw_grpo", reason="grpo-plugin-tw-grpo is not installed")

import torch  # noqa: E402

from grpo_plugin_tw_grpo import position_weights  # noqa: E402
from grpo_plugins_trl.testing import digit_overlap_reward, tiny_grpo_run  # noqa: E402


def logged(trainer, key):
    return [row[key] for row in trainer.state.log_history if key in row]


@pytest.mark.parametrize("methods", [["tw_grpo"], ["unlikeliness", "tw_grpo"]])
def test_two_steps(methods):
    pytest.importorskip("grpo_plugin_unlikeliness")
    trainer = tiny_grpo_run(methods, max_steps=2, reward_funcs=digit_overlap_reward, loss_type="dapo")
    weights = logged(trainer, "plugins/tw_grpo/mean_weight")
    assert len(weights) == 2 and all(1.0 <= w <= 1.7 for w in weights)
    assert all(torch.isfinite(torch.tensor(logged(trainer, "loss"))))
    batch = trainer.last_plugin_batch
    w, mask = batch.token_weights, batch.completion_mask
    assert bool((w[mask > 0] >= 1).all()) and bool((w[mask > 0] <= 1.7 + 1e-6).all())
    assert float(w[mask > 0].max()) > 1.5  # the most divergent position of a group gets (close to) alpha
    # members of a group share the weight of each position where both have a token
    rows = (batch.prompt_ids == batch.prompt_ids[0]).nonzero().flatten()
    both = (mask[rows[0]] > 0) & (mask[rows[1]] > 0)
    torch.testing.assert_close(w[rows[0]][both], w[rows[1]][both])


def test_probe_matches_trl_old_log_probs_and_full_vocabulary_weights():
    # gradient_accumulation_steps < steps_per_generation: TRL runs its own old-log-prob pass
    trainer = tiny_grpo_run(["tw_grpo"], max_steps=1, steps_per_generation=4, gradient_accumulation_steps=2,
                            reward_funcs=digit_overlap_reward, train=False)
    seen = {}
    original = trainer._run_advantage_stage

    def spy(out, n):  # the probe reads the live model: use it at the advantage stage, before the update
        original(out, n)
        batch = seen["batch"] = trainer.last_plugin_batch
        seen["old"] = out["old_per_token_logps"].detach().clone()
        seen["probe"] = batch.probes["tw_grpo"].map(lambda chunk: {
            "log_probs": chunk.log_probs().gather(-1, chunk.completion_ids.unsqueeze(-1)).squeeze(-1),
            "full": chunk.log_probs()})

    trainer._run_advantage_stage = spy
    trainer.train()
    batch, out = seen["batch"], seen["probe"]
    probe = batch.probes["tw_grpo"]
    mask = batch.completion_mask > 0
    torch.testing.assert_close(out["log_probs"][mask], seen["old"][mask], rtol=1e-5, atol=1e-5)
    # the chunked, blocked weights equal the reference code's formula on the whole (N, T, V) tensor
    full, index = out["full"], batch.group_index
    vocab = full.shape[-1]
    expected = torch.zeros_like(batch.token_weights)
    for g in range(batch.num_groups):
        rows = (index == g).nonzero().flatten()
        logps = torch.where(mask[rows].unsqueeze(-1), full[rows], torch.tensor(-float(torch.log(torch.tensor(vocab)))))
        diff = (logps.mean(0, keepdim=True) - logps).clamp(-11, 11)
        divergence = (torch.exp(diff) - diff - 1).sum(-1).mean(0)
        weights = position_weights(divergence[None], mask[rows].any(0)[None], 1.7)[0]
        expected[rows] = torch.where(mask[rows], weights, 0.0)
    torch.testing.assert_close(batch.token_weights, expected, rtol=1e-5, atol=1e-5)
    # one decoder forward per chunk of whole groups (per_device_train_batch_size = 4 rows = one group)
    assert probe.forward_calls == batch.num_groups


def test_probe_refused_on_verl_without_the_grpo_plugins_trainer():
    """The probe runs on the actor workers through the ``grpo_plugins`` trainer; verl's policy loss registered
    alone (``verl_capabilities(None)``) cannot provide it."""
    pytest.importorskip("grpo_plugins_verl")
    from grpo_plugins import Composition
    from grpo_plugins_verl.capabilities import verl_capabilities

    problems = Composition(["tw_grpo"]).capability_problems(verl_capabilities())
    assert any("old_policy_probe" in p and "tw_grpo" in p for p in problems)
