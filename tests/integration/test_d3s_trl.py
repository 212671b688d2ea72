"""D3S in real TRL runs (alone and with NGRPO) and against TRL's own top_entropy_quantile mask."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")
pytest.importorskip("grpo_plugin_d3s", reason="grpo-plugin-d3s is not installed")

import torch  # noqa: E402

from grpo_plugins import Composition, GRPOBatch  # noqa: E402
from grpo_plugins_trl.testing import digit_overlap_reward, tiny_grpo_run  # noqa: E402


def logged(trainer, key):
    return [row[key] for row in trainer.state.log_history if key in row]


D3S = {"d3s": {"ramp_fraction": 1.0}}  # rho rises over the whole run: 0.5 at step 0, 0.75 at step 1


@pytest.mark.parametrize("methods", [[D3S], ["ngrpo", D3S]])
def test_two_steps(methods):
    pytest.importorskip("grpo_plugin_ngrpo")
    trainer = tiny_grpo_run(methods, max_steps=2, reward_funcs=digit_overlap_reward)
    assert logged(trainer, "plugins/d3s/rho_sample") == [0.5, 0.75]
    assert 0 < logged(trainer, "plugins/d3s/kept_tokens")[0] < 1
    assert all(torch.isfinite(torch.tensor(logged(trainer, "loss"))))
    batch = trainer.last_plugin_batch
    dropped = (batch.token_weights == 0) & (batch.completion_mask > 0)
    assert bool(dropped.any())  # the method's effect: real tokens left out of the loss


@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.8])
def test_equals_trl_top_entropy_quantile_when_abs_advantage_is_constant(quantile):
    """rho_s = 1, |A| the same for every completion: D3S keeps exactly TRL's high-entropy tokens."""
    trainer = tiny_grpo_run(None, train=False, top_entropy_quantile=quantile)
    torch.manual_seed(3)
    n, width = 8, 9
    mask = (torch.arange(width) < torch.randint(1, width + 1, (n,))[:, None]).float()
    entropies = torch.rand(n, width) * 3
    batch = GRPOBatch(prompt_ids=torch.arange(n) // 2, rewards=torch.tensor([1.0, 0.0] * 4), completion_mask=mask,
                      completion_ids=torch.ones(n, width, dtype=torch.long), old_entropies=entropies, total_steps=10)
    config = {"sample_rho_start": 1.0, "token_rho_start": quantile, "renormalise": False, "token_selection": "quantile"}
    batch = Composition([{"d3s": config}]).run_advantage_stage(batch)
    assert torch.allclose(batch.advantages.abs(), batch.advantages.abs()[0])
    theirs = trainer.get_high_entropy_mask(entropies, mask, 1 - quantile)
    assert torch.equal(batch.token_weights > 0, theirs)
