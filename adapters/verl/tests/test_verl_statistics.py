"""Old-policy log-probs at other temperatures on verl (:mod:`grpo_plugins_verl.statistics`): which passes run,
how their rows reach the advantage stage, and what the capability check allows. verl's own ``fit()`` with the
passes: ``tests/e2e/test_verl_statistics.py``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from grpo_plugins import Composition, CompositionError, Method, Needs
from grpo_plugins_verl.advantage import extra_fields
from grpo_plugins_verl.capabilities import verl_capabilities
from grpo_plugins_verl.statistics import FIELD, TemperaturePasses, add_field, run_passes
from grpo_plugins_verl.testing import run_config


class Hot(Method):
    """Reads the old policy's log-probs at 1 (the sampling temperature) and 1.5."""

    name = "toy_hot"

    def needs(self):
        return Needs(batch_fields={FIELD}, temperatures={1.5, 1.0})


class Cold(Method):
    name = "toy_cold"

    def needs(self):
        return Needs(batch_fields={FIELD}, temperatures={0.5, 1.5})


class AtSampling(Method):
    """Reads the old policy's log-probs at the sampling temperature only."""

    name = "toy_at_sampling"

    def needs(self):
        return Needs(batch_fields={FIELD}, temperatures={1.0})


class Plain(Method):
    name = "toy_plain"


class NoWorkers:
    """A worker group that must not be called."""

    def __getattr__(self, name):
        raise AssertionError(f"the actor workers were called ({name}) though no method reads {FIELD}")


def trainer_of(methods, passes=None, extras=None, temperature=1.0):
    config = OmegaConf.create({"actor_rollout_ref": {"rollout": {"temperature": temperature}}})
    runtime = SimpleNamespace(composition=Composition(methods), extras=extras)
    return SimpleNamespace(config=config, grpo_plugins=runtime, actor_rollout_wg=NoWorkers(), temperature_passes=passes)


def test_requested_temperatures_are_the_union_over_methods_sorted():
    assert Composition([Hot(), Cold()]).temperatures() == (0.5, 1.0, 1.5)
    assert Composition([Plain()]).temperatures() == ()


def test_without_a_method_reading_them_nothing_runs_and_nothing_changes():
    extras = {"old_log_probs": torch.randn(2, 3)}
    trainer = trainer_of([Plain()], extras=dict(extras))
    assert run_passes(trainer, batch=None) is None  # the workers are not called
    add_field(trainer, ["a", "b"])
    assert trainer.grpo_plugins.extras.keys() == extras.keys()
    # only the sampling temperature: verl's own old log-probs, no extra pass either
    assert run_passes(trainer_of([AtSampling()]), batch=None) is None


def test_the_sampling_temperature_is_verls_old_log_probs_and_the_others_the_passes_in_the_stage_order():
    old = torch.tensor([[-1.0, -2.0], [-3.0, -4.0], [-5.0, -6.0]])
    passes = TemperaturePasses(["k0", "k1", "k2"], {1.5: torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])})
    trainer = trainer_of([Hot()], passes, extras={"old_log_probs": old})
    add_field(trainer, ["k2", "k0", "k1"])  # the stage's rows in another order
    at = trainer.grpo_plugins.extras[FIELD]
    assert sorted(at) == [1.0, 1.5] and at[1.0] is old
    assert torch.equal(at[1.5], torch.tensor([[0.5, 0.6], [0.1, 0.2], [0.3, 0.4]]))
    assert trainer.temperature_passes is None  # used once


def test_a_row_or_a_temperature_the_passes_did_not_cover_is_a_clear_error():
    passes = TemperaturePasses(["k0", "k1"], {1.5: torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="rows \\['k9'\\]"):
        passes.aligned(["k0", "k9"])
    trainer = trainer_of([Cold()], passes, extras={"old_log_probs": torch.zeros(2, 2)})
    with pytest.raises(CompositionError, match=r"temperature\(s\) \[0.5\], read by \['toy_cold'\]"):
        add_field(trainer, ["k0", "k1"])


def test_the_stage_keeps_each_temperature_to_its_rows_and_width():
    """verl's padding rows are left out; a pass's width (its longest response) is fitted to the batch's."""
    values = {0.5: torch.arange(6.0).view(3, 2), 1.5: -torch.arange(9.0).view(3, 3)}
    fields = extra_fields({FIELD: values}, torch.tensor([0, 2]), torch.ones(3, 3))
    assert torch.equal(fields[FIELD][0.5], torch.tensor([[0.0, 1.0, 0.0], [4.0, 5.0, 0.0]]))
    assert torch.equal(fields[FIELD][1.5], -torch.tensor([[0.0, 1.0, 2.0], [6.0, 7.0, 8.0]]))


def test_capabilities_provide_them_with_the_trainer_and_verls_old_log_prob_pass():
    methods = [Hot()]
    assert Composition(methods).capability_problems(verl_capabilities(run_config())) == []
    bypass = Composition(methods).capability_problems(verl_capabilities(run_config("algorithm.rollout_correction.bypass_mode=True")))
    assert len(bypass) == 1 and f"'{FIELD}'" in bypass[0] and "bypass_mode=True" in bypass[0]
    without_trainer = Composition(methods).capability_problems(verl_capabilities(None))
    assert len(without_trainer) == 1 and "trainer_mode=grpo_plugins" in without_trainer[0]
