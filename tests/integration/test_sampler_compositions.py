"""The prompt samplers and rollout allocators CurES, GDRO and VAS composed with each other through the
core (no trainer): two providers of a single-provider hook are refused with the switch to use, and the
switches let one method sample while the other allocates."""

from __future__ import annotations

import pytest

for _plugin in ("cures", "gdro", "vas"):
    pytest.importorskip(f"grpo_plugin_{_plugin}", reason=f"grpo-plugin-{_plugin} is not installed")

from grpo_plugins import Composition, CompositionError  # noqa: E402


def test_cures_and_gdro_prompt_samplers_are_told_apart():
    with pytest.raises(CompositionError, match="'cures'.*'gdro'") as error:
        Composition(["cures", "gdro"])
    assert "switch the hook off" in str(error.value)


def test_gdro_and_cures_single_providers_are_told_apart_with_the_switch_to_use():
    with pytest.raises(CompositionError) as error:
        Composition(["gdro", "cures"])
    message = str(error.value)
    assert "'gdro'" in message and "'cures'" in message and "sample_prompts" in message and "switch the hook off" in message
    composition = Composition([{"gdro": {"use_prompt_gdro": False}}, {"cures": {"use_allocation": False}}])
    assert composition.providers("sample_prompts") == ["cures"] and composition.providers("allocate_rollouts") == ["gdro"]


def test_vas_composes_with_an_allocator_but_not_a_second_sampler():
    with pytest.raises(CompositionError, match="'vas'.*'cures'.*sample_prompts"):
        Composition(["vas", "cures"])
    composition = Composition(["vas", {"cures": {"use_sampler": False}}])  # VAS samples, CurES allocates
    assert composition.providers("sample_prompts") == ["vas"] and composition.providers("allocate_rollouts") == ["cures"]
