"""Method state: round trip, plain-type check, and checkpoint files loadable with weights_only."""

import pytest
import torch

from grpo_plugins import Composition, CompositionError, Method, PluginError, hookimpl
from grpo_plugins.testing import make_batch


class Tracker(Method):
    """A stateful method: a per-prompt running mean of rewards and a step counter."""

    name = "tracker"

    def __init__(self, config=None):
        super().__init__(config)
        self.means = torch.zeros(4)
        self.steps = 0
        self.history: list[float] = []

    @hookimpl
    def observe(self, batch, step):
        self.means = 0.5 * self.means + 0.5 * batch.rewards[:4]
        self.steps = step
        self.history.append(float(batch.rewards.mean()))

    def state_dict(self):
        return {"means": self.means.clone(), "steps": self.steps, "history": list(self.history), "tag": ("v", 1)}

    def load_state_dict(self, state):
        self.means, self.steps, self.history = state["means"].clone(), state["steps"], list(state["history"])


class Leaky(Method):
    name = "leaky"

    def state_dict(self):
        return {"rng": torch.Generator(), "ok": 1}


def trained() -> Composition:
    composition = Composition([Tracker(), "length_penalty"])
    for step in (1, 2):
        batch = composition.run_advantage_stage(make_batch(group_sizes=(2, 2, 2), seed=step))
        composition.run_observe(batch, step)
    return composition


def test_state_dict_round_trip():
    state = trained().state_dict()
    assert set(state) == {"tracker"}  # stateless methods contribute nothing
    assert state["tracker"]["steps"] == 2 and len(state["tracker"]["history"]) == 2
    fresh = Composition([Tracker(), "length_penalty"])
    fresh.load_state_dict(state)
    restored = fresh.method("tracker")
    torch.testing.assert_close(restored.means, state["tracker"]["means"])
    assert (restored.steps, restored.history) == (2, state["tracker"]["history"])
    assert fresh.state_dict()["tracker"]["history"] == state["tracker"]["history"]


def test_save_and_load_a_file_with_weights_only(tmp_path):
    original = trained()
    path = tmp_path / "plugins.pt"
    original.save(path)
    raw = torch.load(path, weights_only=True)  # no pickled objects in the file
    assert raw["tracker"]["tag"] == ("v", 1)
    resumed = Composition([Tracker(), "length_penalty"])
    resumed.load(path)
    torch.testing.assert_close(resumed.method("tracker").means, original.method("tracker").means)
    # resumed and original continue identically
    for composition in (original, resumed):
        composition.run_observe(composition.run_advantage_stage(make_batch(group_sizes=(2, 2, 2), seed=9)), 3)
    torch.testing.assert_close(resumed.method("tracker").means, original.method("tracker").means)


def test_non_plain_state_is_rejected_naming_the_method():
    with pytest.raises(PluginError) as error:
        Composition([Leaky()]).state_dict()
    assert "method 'leaky'" in str(error.value) and "hook 'state_dict'" in str(error.value)
    assert "state['rng'] is a Generator; state may hold only tensors and plain Python values" in str(error.value)


def test_loading_state_the_run_cannot_take():
    with pytest.raises(CompositionError, match=r"state of method\(s\) \['gone'\] that this run does not enable"):
        Composition([]).load_state_dict({"gone": {"x": 1}})
    with pytest.raises(PluginError, match=r"'length_penalty'.*'load_state_dict'.*stateless but was given state \['x'\]"):
        Composition(["length_penalty"]).load_state_dict({"length_penalty": {"x": 1}})
    with pytest.raises(PluginError, match=r"'tracker'.*'load_state_dict'.*KeyError"):
        Composition([Tracker()]).load_state_dict({"tracker": {"means": torch.zeros(4)}})


def test_a_method_missing_from_the_checkpoint_starts_fresh(caplog):
    composition = Composition([Tracker()])
    composition.load_state_dict({})
    assert composition.method("tracker").steps == 0
    assert "checkpoint holds no state of method 'tracker': it starts fresh" in caplog.text


def test_an_unreadable_state_file_is_an_error_naming_the_file(tmp_path):
    truncated = tmp_path / "grpo_plugins_state.pt"
    truncated.write_bytes(b"PK\x03\x04truncated")
    with pytest.raises(CompositionError, match=r"cannot read the plugin state file .*grpo_plugins_state\.pt: .*corrupt"):
        Composition([Tracker()]).load(truncated)
    pickled = tmp_path / "pickled.pt"
    torch.save({"tracker": {"rng": torch.Generator()}}, pickled)
    with pytest.raises(CompositionError, match=r"pickled\.pt.*it holds pickled objects\)$") as error:
        Composition([Tracker()]).load(pickled)
    assert "weights_only=False" not in str(error.value)
