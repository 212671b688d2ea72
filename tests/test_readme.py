"""The README lists every installed method with a link to its docs page, and every file it links exists."""

import re
from pathlib import Path

from grpo_plugins.registry import discover

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FIXTURES = {"length_penalty"}  # the third-party example, named in the text below the tables


def test_every_installed_method_has_a_row():
    rows = set(re.findall(r"^\| `([a-z0-9_]+)` \|.*\[(?:plugins/[a-z0-9_]+|grpo_plugins/default\.py)\]", README, flags=re.M))
    installed = {name for name, info in discover()[0].items() if not info.distribution.startswith("grpo-plugin-fixture")}
    assert installed - FIXTURES <= rows, f"README lacks rows for {sorted(installed - FIXTURES - rows)}"
    for name in rows - {"grpo"}:
        assert f"[plugins/{name}](plugins/{name}/README.md)" in README


def test_linked_files_exist():
    links = re.findall(r"\]\(((?!https?:|#)[^)#]+)(?:#[^)]*)?\)", README)
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, f"README links to missing files: {missing}"
