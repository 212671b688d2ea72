"""The conformance suite (grpo_plugins.conformance) over every installed method, and proof that it bites.

``TestEveryInstalledMethod`` runs every check against every method that discovery finds, so a method
added to ``plugins/`` (or any installed distribution) is checked without touching this file. Its
data-parallel check runs all methods in one pair of gloo processes. Then each check meets a method
broken for it (``tests/fixtures/broken_methods.py``) and must fail it, naming the method and the
check; and the plugin API's version rules are tested.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from grpo_plugins import Composition, Method, hookimpl
from grpo_plugins import api
from grpo_plugins.conformance import (
    CHECKS,
    ConformanceError,
    MethodConformance,
    Subject,
    check_data_parallel,
    installed_methods,
    run_data_parallel,
)

FIXTURES = Path(__file__).parent / "fixtures"
INSTALLED = installed_methods()


class TestEveryInstalledMethod(MethodConformance):
    @pytest.fixture(params=INSTALLED)
    def conformance_subject(self, request) -> Subject:
        return Subject(request.param)

    @pytest.fixture
    def data_parallel_cohort(self):
        return [Subject(name) for name in INSTALLED]


def test_every_plugin_and_example_distribution_is_installed_and_checked():
    root = Path(__file__).resolve().parents[1]
    names = {path.parent.name for path in root.glob("plugins/*/pyproject.toml")} | {"length_penalty", "grpo"}
    assert names <= set(INSTALLED), f"not installed, so not checked: {sorted(names - set(INSTALLED))}"


# ----------------------------------------------------------------------------- the suite catches each break
@pytest.fixture
def broken(monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))
    import broken_methods

    return broken_methods


@pytest.mark.parametrize("check", [c for c in CHECKS if c != "data_parallel"])
def test_each_check_fails_the_method_broken_for_it(broken, check, tmp_path):
    for cls in broken.BROKEN[check]:
        with pytest.raises(ConformanceError) as caught:
            CHECKS[check](Subject.of(cls), *([tmp_path] if check == "state" else []))
        message = str(caught.value)
        assert f"method '{cls.name}' fails conformance check '{check}'" in message


def test_the_broken_methods_pass_the_other_checks(broken, tmp_path):
    """Each broken method breaks only its own check (so the failures above are for the right reason)."""
    for cls in (broken.PositionBonus, broken.ForgetfulCounter, broken.UndeclaredCompletions, broken.LocalMean):
        own = next(check for check, classes in broken.BROKEN.items() if cls in classes)
        for check in ("declaration", "config", "hook_contracts", "small_groups", "nan_padding", "needs", "permutation", "state"):
            if check != own:
                CHECKS[check](Subject.of(cls), *([tmp_path] if check == "state" else []))


def test_specific_messages(broken, tmp_path):
    def message(cls, check):
        with pytest.raises(ConformanceError) as caught:
            CHECKS[check](Subject.of(cls), *([tmp_path] if check == "state" else []))
        return str(caught.value)

    assert "implements hook 'setup', which appeared in plugin API 1.1" in message(broken.TooNew, "declaration")
    assert "no docstring" in message(broken.Undocumented, "declaration")
    assert "['scale'] are not declared with option(" in message(broken.BareOption, "config")
    assert "a group of 1 completion(s) was accepted" in message(broken.AcceptsSingletons, "small_groups")
    assert "instead of exactly 0" in message(broken.UnguardedStd, "constant_groups")
    assert "changed rewards beyond its order" in message(broken.PositionBonus, "permutation")
    assert "resumed run differs from the uninterrupted run" in message(broken.ForgetfulCounter, "state")
    assert "reads batch field 'completions' without declaring it" in message(broken.UndeclaredCompletions, "needs")
    assert "padded positions changed advantages" in message(broken.PaddingLeak, "nan_padding")
    assert "must return a floating-point tensor" in message(broken.IntegerAdvantages, "hook_contracts")


def test_data_parallel_check_catches_a_statistic_not_reduced_across_ranks(broken):
    subjects = [Subject.of(broken.LocalMean), Subject.of(broken.UndeclaredCompletions)]
    results = run_data_parallel(subjects)
    with pytest.raises(ConformanceError, match="a batch-global statistic is not reduced across ranks"):
        check_data_parallel(subjects[0], results[0])
    check_data_parallel(subjects[1], results[1])  # per-row only: the same on one rank and two


def test_a_method_that_cannot_be_exercised_fails_with_a_clear_message():
    class NeedsNamedReward(Method):
        """Reads a reward component named 'accuracy' without declaring it in its example."""

        name = "needs_named_reward"

        @hookimpl
        def shape_rewards(self, batch, rewards):
            return batch.reward_components[:, list(batch.reward_names).index("accuracy")]

    with pytest.raises(ConformanceError, match=r"(?s)cannot be exercised on its example data: .*declare it in its example\(\)"):
        CHECKS["hook_contracts"](Subject.of(NeedsNamedReward))


# ----------------------------------------------------------------------------- the pytest option and the CLI
def test_pytest_option_and_cli_run_the_suite_against_an_installed_method(tmp_path):
    env_python = sys.executable
    option = subprocess.run(
        [env_python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--grpo-plugins-conformance=length_penalty",
         "-k", "not data_parallel"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert option.returncode == 0, option.stdout + option.stderr
    assert "8 passed, 1 skipped" in option.stdout  # constant groups: length_penalty computes no advantages
    cli = subprocess.run(
        [str(Path(env_python).parent / "grpo-plugins"), "test", "no_such_method"], cwd=tmp_path, capture_output=True, text=True
    )
    assert cli.returncode != 0 and "unknown method 'no_such_method'" in cli.stdout + cli.stderr


# ----------------------------------------------------------------------------- the versioned plugin API
def test_ranges():
    assert api.satisfies("1.1", ">=1.0,<2") and not api.satisfies("2.0", ">=1.0,<2")
    assert api.satisfies("1.1", "==1.1") and not api.satisfies("1.1", ">1.1")
    assert api.lowest_supported(">=1.0,<2") == (1, 0) and api.lowest_supported(">1.0") == (1, 1)
    with pytest.raises(ValueError, match="cannot read clause '~1'"):
        api.parse_range("~1")


def test_every_hook_records_the_version_it_appeared_in():
    from grpo_plugins.hooktable import TABLE

    assert {hook.name for hook in TABLE} == set(api.HOOKS_SINCE)
    for version in api.HOOKS_SINCE.values():
        assert api.parse_version(version) <= api.parse_version(api.PLUGIN_API)


def test_a_method_needing_a_newer_api_is_refused_at_start_up_naming_the_version(install_fixture_dists):
    install_fixture_dists("future_api")
    with pytest.raises(api.PluginAPIError) as caught:
        Composition(["future"])
    message = str(caught.value)
    assert "method 'future' (distribution grpo-plugin-fixture-future) supports plugin API >=1.5,<2" in message
    assert f"provides plugin API {api.PLUGIN_API}: upgrade grpo-plugins" in message


def test_a_method_object_needing_a_newer_api_is_refused_too():
    """A Method instance given straight to the run list is checked like an installed one."""

    class FromTheFuture(Method):
        """Needs plugin API 2."""

        name = "from_the_future"
        plugin_api = ">=2.0,<3"

        @hookimpl
        def shape_rewards(self, rewards):
            return rewards

    with pytest.raises(api.PluginAPIError, match=r"method 'from_the_future' \(distribution <object from .*supports plugin API >=2.0,<3"):
        Composition([FromTheFuture()])


def test_a_method_written_against_the_first_api_keeps_working():
    """Written against 1.0 (round-1 hooks only, no needs(), no example()): runs on this 1.x core."""

    class RoundOne(Method):
        """Adds one to every reward."""

        name = "round_one"
        plugin_api = ">=1.0,<2"

        @hookimpl
        def shape_rewards(self, rewards):
            return rewards + 1

    api.check_supported(RoundOne)
    for check in ("declaration", "config", "hook_contracts", "needs"):
        CHECKS[check](Subject.of(RoundOne))


def test_an_unreadable_range_is_refused():
    class Garbled(Method):
        """Garbled range."""

        name = "garbled"
        plugin_api = "version one"

    with pytest.raises(api.PluginAPIError, match="unreadable plugin_api"):
        api.check_supported(Garbled)
