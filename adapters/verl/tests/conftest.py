"""Fixtures of every verl adapter test."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def clean_runtime(monkeypatch):
    """Each test starts with no method list in the environment and none configured, and leaves none."""
    pytest.importorskip("verl")
    import grpo_plugins_verl
    from grpo_plugins_verl.testing import isolate

    isolate(monkeypatch)
    yield
    grpo_plugins_verl.configure(None)
