"""Every distribution of the repository builds without build isolation on the setuptools it asks for."""

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECTS = sorted(
    p for p in ROOT.rglob("pyproject.toml") if not {".venv", "node_modules", "build"} & set(p.relative_to(ROOT).parts)
)


@pytest.mark.parametrize("path", PYPROJECTS, ids=lambda p: str(p.parent.relative_to(ROOT)) or ".")
def test_build_requirement_supports_the_license_string(path):
    data = tomllib.loads(path.read_text())
    requires = data["build-system"]["requires"]
    setuptools = [r for r in requires if r.replace(" ", "").startswith("setuptools")]
    assert setuptools, f"{path}: build-system.requires names no setuptools"
    if isinstance(data["project"].get("license"), str):  # a PEP 639 SPDX string needs setuptools >= 77
        match = re.search(r">=\s*(\d+)", setuptools[0])
        assert match and int(match.group(1)) >= 77, f"{path}: a license string needs 'setuptools>=77', got {setuptools[0]!r}"
