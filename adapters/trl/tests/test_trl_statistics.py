"""Old-policy statistics in the TRL adapter: old_entropies and old_log_probs_at, filled only when a method
reads them, from TRL's own old pass when it runs one, else from one extra forward."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402

from grpo_plugins import Method, Needs, hookimpl  # noqa: E402
from grpo_plugins_trl import statistics  # noqa: E402
from grpo_plugins_trl.testing import tiny_grpo_run  # noqa: E402


class ReadsStatistics(Method):
    """Records the statistics fields it is given."""

    name = "reads_statistics"

    def __init__(self, config=None, temperatures=(0.7, 1.0)):
        super().__init__(config)
        self.temperatures = tuple(temperatures)
        self.seen = []

    def needs(self):
        fields = {"old_entropies"} | ({"old_log_probs_at"} if self.temperatures else set())
        return Needs(batch_fields=fields, temperatures=set(self.temperatures))

    @hookimpl
    def adjust_advantages(self, batch, advantages):
        self.seen.append((batch.old_entropies.clone(), {t: v.clone() for t, v in batch.old_log_probs_at.items()},
                          batch.completion_mask.clone()))
        return advantages


class ReadsNothing(Method):
    name = "reads_nothing"

    @hookimpl
    def adjust_advantages(self, batch, advantages):
        assert batch.old_entropies is None and batch.old_log_probs_at == {}
        return advantages


def test_fields_absent_without_a_reader():
    trainer = tiny_grpo_run([ReadsNothing()], max_steps=1)
    assert trainer.last_plugin_batch.old_entropies is None


@pytest.mark.parametrize("spg", [2, 4])  # 2: fully on-policy (extra forward); 4: TRL runs its old pass
def test_entropies_and_temperatures_from_one_forward(spg):
    method = ReadsStatistics()
    tiny_grpo_run([method], max_steps=1, steps_per_generation=spg)
    entropies, at, mask = method.seen[0]
    real = mask > 0
    assert set(at) == {0.7, 1.0} and entropies.shape == mask.shape
    assert bool((entropies[real] > 0).all()) and bool((entropies[~real] == 0).all())
    # sharper distribution at 0.7: the sampled tokens' log-probs move, and stay <= 0
    assert bool((at[0.7][real] <= 0).all()) and not torch.allclose(at[0.7][real], at[1.0][real])


def test_three_routes_agree():
    """TRL's fused head (its old pass, the extra entropy pass) and the unfused temperature pass give the same
    entropies, and log-probs at args.temperature equal TRL's old log-probs."""
    trainer = tiny_grpo_run([ReadsStatistics()], max_steps=1, train=False)
    trainer.model.train()
    torch.manual_seed(0)
    n, width = 4, 5
    out = {"prompt_ids": torch.randint(4, 16, (n, 3)), "prompt_mask": torch.ones(n, 3, dtype=torch.long),
           "completion_ids": torch.randint(4, 16, (n, width)),
           "completion_mask": (torch.arange(width) < torch.tensor([5, 3, 1, 4])[:, None]).long()}
    fused = statistics.entropy_pass(trainer, out)
    at, unfused = statistics.temperature_pass(trainer, out, (1.0,), want_entropy=True)
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    attention = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    with torch.no_grad():
        old, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, width, batch_size=4)
    real = out["completion_mask"].bool()
    assert torch.allclose(fused[real], unfused[real], atol=1e-5)
    assert torch.allclose(at[1.0][real], old[real], atol=1e-5)


def test_requested_collects_temperatures():
    from grpo_plugins import Composition

    comp = Composition([ReadsStatistics(temperatures=(0.8, 1.2))])
    assert statistics.requested(comp) == (True, (0.8, 1.2))


def test_entropies_come_from_trls_old_pass_when_it_runs(monkeypatch):
    """gradient_accumulation_steps < steps_per_generation: TRL computes old log-probs, and the entropies come
    from that pass (no extra forward); they equal the extra pass's entropies on the same batch."""

    def no_extra_pass(*args, **kwargs):
        raise AssertionError("an extra entropy forward ran although TRL's old pass provides the entropies")

    method = ReadsStatistics(temperatures=())
    monkeypatch.setattr(statistics, "entropy_pass", no_extra_pass)
    trainer = tiny_grpo_run([method], max_steps=1, steps_per_generation=4)
    entropies, _, mask = method.seen[0]
    assert bool((entropies[mask > 0] > 0).all())
