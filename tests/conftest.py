"""Shared fixtures of the core tests."""

from pathlib import Path

import pytest

FIXTURE_DISTS = Path(__file__).parent / "fixtures" / "dists"


@pytest.fixture
def install_fixture_dists(monkeypatch):
    """``install_fixture_dists("twins")`` puts the throwaway distributions of ``tests/fixtures/dists/twins``
    on ``sys.path`` for one test: their ``*.dist-info/entry_points.txt`` are found by real discovery."""

    def install(*names: str) -> None:
        for name in names:
            monkeypatch.syspath_prepend(str(FIXTURE_DISTS / name))

    return install
